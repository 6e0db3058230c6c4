"""`contrastive_loss`: the objectives (CLIP's InfoNCE, its debiased / hardness-weighted
forms, SigLIP) on either implementation, dispatched by `resolve_impl`; and the metrics logged
beside the loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clip_train.loss.gather import _rank, _world_size, all_gather_with_grad
from clip_train.loss.ring import Ring, _RingClip, _RingSigLip
from clip_train.loss.tiled import _TiledLogSumExp, _TiledSoftplusSum, _TiledSymmetricLogSumExp

# ---------------------------------------------------------------------------------------------
# The two implementations, on normalised float32 embeddings: local rows (_BD) vs columns (_CD:
# the global batch, then any extra keys). `offset` is the global index of this process's first
# row, so row i's positive is column i + offset.


def _negatives_lse(q_BD, k_CD, scale, shift_B, offset: int, impl: str, tile_size: int):
    """r_B[i] = log sum_{c != i + offset} exp(scale * <q_i, k_c> - shift_i): row i's negatives,
    relative to shift_i (see "Precision" in `tiled`). Needs C >= 2."""
    if impl == "tiled":
        return _TiledLogSumExp.apply(q_BD, k_CD, scale, shift_B, tile_size, offset)
    # In place on the product (its backward does not need it): one B x C block.
    logits_BC = ((q_BD * scale) @ k_CD.T).sub_(shift_B[:, None])
    rows_B = torch.arange(q_BD.shape[0], device=q_BD.device)
    logits_BC[rows_B, rows_B + offset] = float("-inf")
    return torch.logsumexp(logits_BC, dim=1)


def _symmetric_negatives_lse(a_BD, b_BD, scale, shift_B, impl: str, tile_size: int):
    """One process, no extra keys: (r_row_B, r_col_B) of `_TiledSymmetricLogSumExp`, both
    directions from one B x B block of logits (the text->image block is its transpose)."""
    if impl == "tiled":
        return _TiledSymmetricLogSumExp.apply(a_BD, b_BD, scale, shift_B, tile_size)
    logits_BB = (a_BD * scale) @ b_BD.T
    diagonal_BB = torch.eye(a_BD.shape[0], dtype=torch.bool, device=a_BD.device)
    col_BB = (logits_BB - shift_B[None, :]).masked_fill_(diagonal_BB, float("-inf"))
    # In place (nothing saved the product): two B x B blocks rather than three.
    row_BB = logits_BB.sub_(shift_B[:, None]).masked_fill_(diagonal_BB, float("-inf"))
    return torch.logsumexp(row_BB, dim=1), torch.logsumexp(col_BB, dim=0)


def _clip_infonce(img_BD, txt_BD, img_CD, txt_CD, scale, offset: int, impl: str, tile_size: int):
    """CLIP's symmetric InfoNCE. Row i's cross entropy, -log(e^p / sum_c e^x_c) with p its
    positive logit, is log(1 + sum_{c != pos} e^{x_c - p}) = softplus(r_i), r_i from
    `_negatives_lse` with shift p (the same positive logit scale * <img_i, txt_i> in both
    directions)."""
    positive_B = scale * (img_BD * txt_BD).sum(dim=1)
    if img_CD.shape[0] == 1:
        # One pair and nothing else: no negatives, the cross entropy is log 1 = 0.
        return positive_B.sum() * 0.0
    if img_CD is img_BD and txt_CD is txt_BD:
        r_i2t_B, r_t2i_B = _symmetric_negatives_lse(
            img_BD, txt_BD, scale, positive_B, impl, tile_size
        )
    else:
        r_i2t_B = _negatives_lse(img_BD, txt_CD, scale, positive_B, offset, impl, tile_size)
        r_t2i_B = _negatives_lse(txt_BD, img_CD, scale, positive_B, offset, impl, tile_size)
    return (F.softplus(r_i2t_B).mean() + F.softplus(r_t2i_B).mean()) / 2


def _clip_plain(img_BD, txt_BD, img_CD, txt_CD, scale, offset: int) -> torch.Tensor:
    return _clip_infonce(img_BD, txt_BD, img_CD, txt_CD, scale, offset, "plain", 0)


def _clip_tiled(img_BD, txt_BD, img_CD, txt_CD, scale, tile_size: int, offset: int = 0):
    return _clip_infonce(img_BD, txt_BD, img_CD, txt_CD, scale, offset, "tiled", tile_size)


def _clip_reweighted(
    img_BD,
    txt_BD,
    img_CD,
    txt_CD,
    scale,
    offset: int,
    *,
    tau_plus: float,
    beta: float,
    impl: str,
    tile_size: int,
) -> torch.Tensor:
    """Debiased (Chuang et al., 2020) and hard-negative weighted (Robinson et al., 2021) InfoNCE.

    For a row with positive logit p = s * cos(q, k+) and N negative logits x_j = s * cos(q, k_j)
    (the other global columns and the extra keys; s the logit scale):
        Ng   = max((N * sum_j e^{(1+beta) x_j} / sum_j e^{beta x_j} - tau+ * N * e^p) / (1 - tau+),
                   N * e^{-s})
        loss = -log(e^p / (e^p + Ng))
    which is the authors' code (DCL's `Ng` with HCL's importance weights e^{beta x_j}, normalised
    by their mean). e^{-s} is the smallest value e^{x_j} can take (cosine -1): the clamp keeps the
    debiased estimate of the negatives' mass positive. At tau+ = 0, beta = 0, Ng is the plain sum
    over negatives (the clamp cannot bind then) and this is CLIP's InfoNCE.

    Everything is computed in log space (scales of 100 overflow e^x in float32) and relative to
    the positive (see "Precision" in `tiled`): with rel = log(Ng / e^p), the loss is softplus(rel),
    and each sum is a `_negatives_lse` at scale a * s shifted by a * p (a = 1 + beta, beta),
    whose difference then involves numbers of the size of a * (x_j - p), not of a * p.
    Columns: img_CD / txt_CD are the global images / texts followed by any extra keys."""
    n_neg = img_CD.shape[0] - 1
    if n_neg < 1:
        raise ValueError(
            "the debiased / hardness-weighted loss needs at least one negative per row "
            "(a global batch of 2 or more, or a queue)"
        )
    log_n = math.log(n_neg)
    cos_B = (img_BD * txt_BD).sum(dim=1)
    positive_B = scale * cos_B
    directions = []
    for q_BD, k_CD in ((img_BD, txt_CD), (txt_BD, img_CD)):
        if beta == 0.0:
            # The weights are all 1: N * mean = the plain sum, one reduction.
            rel_B = _negatives_lse(q_BD, k_CD, scale, positive_B, offset, impl, tile_size)
        else:
            hard, weight = 1.0 + beta, beta
            rel_B = (
                log_n
                + _negatives_lse(
                    q_BD, k_CD, hard * scale, hard * positive_B, offset, impl, tile_size
                )
                - _negatives_lse(
                    q_BD, k_CD, weight * scale, weight * positive_B, offset, impl, tile_size
                )
            )
        if tau_plus > 0.0:
            # log(e^a - e^b) = a + log1p(-e^{b-a}), defined only where b < a; elsewhere the
            # estimate is <= 0 and the clamp below takes over. The placeholder -1 keeps the
            # unused branch (and so its gradient) finite.
            diff_B = math.log(tau_plus) + log_n - rel_B
            below_B = diff_B < 0
            safe_B = torch.where(below_B, diff_B, torch.full_like(diff_B, -1.0))
            debiased_B = rel_B + torch.log1p(-torch.exp(safe_B)) - math.log1p(-tau_plus)
            rel_B = torch.where(below_B, debiased_B, torch.full_like(diff_B, float("-inf")))
        # The clamp N * e^{-s}, relative to e^p.
        rel_B = torch.maximum(rel_B, log_n - scale * (1.0 + cos_B))
        directions.append(F.softplus(rel_B).mean())
    return (directions[0] + directions[1]) / 2


def _siglip_plain(img_BD, txt_GD, scale, bias, offset: int) -> torch.Tensor:
    b, g = img_BD.shape[0], txt_GD.shape[0]
    logits_BG = (img_BD * scale) @ txt_GD.T + bias
    labels_BG = -torch.ones((b, g), device=img_BD.device, dtype=img_BD.dtype)
    labels_BG[torch.arange(b), torch.arange(b) + offset] = 1.0
    return -F.logsigmoid(labels_BG * logits_BG).sum() / b


def _siglip_tiled(img_BD, txt_BD, scale, bias, txt_GD, tile_size: int, offset: int = 0):
    # -log sigmoid(y * x) = softplus(-y * x): softplus(x) for each negative pair (the kernel),
    # softplus(-x) for each positive. (softplus(x) - x for the positives, summed with the
    # negatives, would subtract numbers of the size of x, ~100 late in training.)
    negatives = _TiledSoftplusSum.apply(img_BD, txt_GD, scale, bias, tile_size, offset)
    positives = F.softplus(-(scale * (img_BD * txt_BD).sum(dim=1) + bias)).sum()
    return (negatives + positives) / img_BD.shape[0]


def _clip_ring(img_emb_BD, txt_emb_BD, scale, tile_size: int, ring, queue_img_KD=None,
               queue_txt_KD=None) -> torch.Tensor:  # fmt: skip
    """CLIP's InfoNCE as `_clip_infonce` forms it (softplus of each row's negatives relative to
    its positive), from RAW float32 embeddings, the global columns passing by on the ring;
    queued keys (unit rows, constants) are local extra columns."""
    r_i2t_B, r_t2i_B = _RingClip.apply(
        img_emb_BD, txt_emb_BD, scale, tile_size, ring, queue_img_KD, queue_txt_KD
    )
    return (F.softplus(r_i2t_B).mean() + F.softplus(r_t2i_B).mean()) / 2


def _siglip_ring(img_emb_BD, txt_emb_BD, scale, bias, tile_size: int, ring) -> torch.Tensor:
    """open_clip's SigLipLoss of this process's rows, from RAW float32 embeddings."""
    return (
        _RingSigLip.apply(img_emb_BD, txt_emb_BD, scale, bias, tile_size, ring)
        / img_emb_BD.shape[0]
    )


def _as_float32(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    # .float() keeps the autograd link to a learnable parameter (whatever its dtype).
    if isinstance(value, torch.Tensor):
        return value.float()
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _clamped_scale(logit_scale: torch.Tensor, max_logit_scale: float) -> torch.Tensor:
    """clamp(exp(logit_scale), max): CLIP clamps the inverse temperature because training became
    unstable beyond 100. Above the bound the value is the bound and the gradient is zero; AT the
    bound (where a trainer's in-place clamp of the parameter, as in open_clip, leaves it) the
    gradient still flows, so the scale can come back down. `exp(...).clamp(max=...)` would
    not: exp(float32(log 100)) is 100.0000076, just over the bound, which kills the gradient for
    good."""
    above = logit_scale > math.log(max_logit_scale)
    # exp only of what is kept: exp of a huge value would be inf, and inf * 0 a NaN gradient.
    kept = torch.where(above, torch.zeros_like(logit_scale), logit_scale)
    return torch.where(above, torch.full_like(logit_scale, max_logit_scale), kept.exp())


# "ring" is chosen, never automatic: it trades communication for memory (see docs/performance.md).
IMPLS = ("auto", "plain", "tiled", "ring")


def resolve_impl(impl: str, local_batch: int, global_batch: int, tile_size: int) -> str:
    """`auto` -> plain while the B x G block is no bigger than one tile, tiled beyond.

    Below the switch tiling saves nothing (its one tile is the block) and the plain path, pure
    autograd, was the faster one (CPU, D=512: 0.15 vs 0.28 CPU-s at B=1024). At the default
    switch, B*G = 4096^2, plain peaks at ~0.4 GiB (a 64 MiB block, a few copies; 0.3 GiB before
    the row losses were formed relative to the positive) and the two take about the same time;
    beyond it plain grows as ~4-6 blocks (4.1 GiB at 16384 before) while tiled stays near
    0.2 GiB + O(B*D) and is no slower. See benchmarks/loss_memory.py. `ring` is kept as asked
    (contrastive_loss runs it as `tiled` where there is no other process)."""
    if impl == "auto":
        return "plain" if local_batch * global_batch <= tile_size * tile_size else "tiled"
    if impl not in IMPLS:
        raise ValueError(f"impl: got {impl!r}, expected one of {', '.join(IMPLS)}")
    return impl


def contrastive_loss(
    img_emb_BD: torch.Tensor,
    txt_emb_BD: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    *,
    kind: str = "clip",
    impl: str = "auto",
    tile_size: int = 4096,
    max_logit_scale: float = 100.0,
    queue_img_KD: torch.Tensor | None = None,
    queue_txt_KD: torch.Tensor | None = None,
    debias_tau_plus: float = 0.0,
    hardness_beta: float = 0.0,
    distributed: bool = True,
) -> torch.Tensor:
    """Takes this process's LOCAL raw (unnormalised) embeddings and the raw learnable parameters
    as open_clip stores them (logit_scale is log-space: the loss uses
    clamp(exp(logit_scale), max=max_logit_scale); logit_bias for siglip). Normalises in float32,
    runs with autocast disabled, all-gathers with grad, and returns this process's loss over its
    own rows against all global columns, such that the MEAN over processes equals the
    single-process loss on the concatenated batch, and gradients after DDP/Accelerate averaging
    equal single-process gradients (encoders via the embeddings AND logit_scale/logit_bias).

    kind: "clip" (symmetric InfoNCE; a logit_bias is ignored, it cancels in the softmax) or
    "siglip" (open_clip's SigLipLoss: sum over every pair of -log sigmoid(label * logit), divided
    by the local rows; logit_bias None means 0). impl: "plain", "tiled" or "auto" (see
    `resolve_impl`), or "ring": no gather, the other processes' embeddings pass by in chunks of
    tile_size rows (memory independent of the number of processes; point-to-point traffic in
    the forward and the backward; "tiled" where there is one process or distributed=False).
    Every process must hold the same number of rows.

    clip only, all off by default:
    - queue_img_KD, queue_txt_KD: K extra keys per modality (the same on every process, e.g. a
      MoCo-style queue), used as constants (no gradient) after float32 normalisation: extra
      negative columns of the text->image and image->text rows respectively.
    - debias_tau_plus (class prior tau+ in [0, 1)) and hardness_beta (beta >= 0): the debiased /
      hard-negative weighted objective of `_clip_reweighted`; both 0 is the plain InfoNCE.

    distributed=False: the embeddings are the whole batch, nothing is gathered even under
    torch.distributed (the validation loss computes each batch on one process).
    """
    if kind not in ("clip", "siglip"):
        raise ValueError(f"kind: got {kind!r}, expected clip or siglip")
    if img_emb_BD.shape != txt_emb_BD.shape or img_emb_BD.dim() != 2:
        raise ValueError(
            f"expected two (B, D) embeddings of one shape, got "
            f"{tuple(img_emb_BD.shape)} and {tuple(txt_emb_BD.shape)}"
        )
    if tile_size <= 0:
        raise ValueError(f"tile_size must be > 0, got {tile_size}")
    queued = queue_img_KD is not None or queue_txt_KD is not None
    reweighted = debias_tau_plus != 0.0 or hardness_beta != 0.0
    if not 0.0 <= debias_tau_plus < 1.0:
        raise ValueError(f"debias_tau_plus must be in [0, 1), got {debias_tau_plus}")
    if not hardness_beta >= 0.0:
        raise ValueError(f"hardness_beta must be >= 0, got {hardness_beta}")
    if kind != "clip" and (queued or reweighted):
        raise ValueError("queued negatives, debias_tau_plus and hardness_beta need kind='clip'")
    if queued:
        if queue_img_KD is None or queue_txt_KD is None or queue_img_KD.shape != queue_txt_KD.shape:
            raise ValueError("queue_img_KD and queue_txt_KD go together, as two (K, D) tensors")
        if queue_img_KD.dim() != 2 or queue_img_KD.shape[1] != img_emb_BD.shape[1]:
            raise ValueError(
                f"queued keys must be (K, {img_emb_BD.shape[1]}), got {tuple(queue_img_KD.shape)}"
            )
    if impl == "ring" and reweighted:
        raise ValueError(
            "impl='ring' computes the plain InfoNCE / SigLIP objectives: debias_tau_plus and "
            "hardness_beta need impl='tiled' (or 'auto')"
        )
    if impl == "ring" and (not distributed or _world_size() == 1):
        impl = "tiled"  # nothing to pass around (train.py logs this once)
    device = img_emb_BD.device
    with torch.autocast(device_type=device.type, enabled=False):
        scale = _clamped_scale(_as_float32(logit_scale, device), max_logit_scale)
        if impl == "ring":
            # The ring normalises inside its kernel (see `_RingClip`): no B x D copies here.
            img_emb_BD, txt_emb_BD = img_emb_BD.float(), txt_emb_BD.float()
            if kind == "siglip":
                bias = _as_float32(0.0 if logit_bias is None else logit_bias, device)
                return _siglip_ring(img_emb_BD, txt_emb_BD, scale, bias, tile_size, Ring())
            queue_img_CD = queue_txt_CD = None
            if queued and queue_img_KD.shape[0] > 0:
                queue_img_CD = F.normalize(queue_img_KD.detach().float(), dim=-1)
                queue_txt_CD = F.normalize(queue_txt_KD.detach().float(), dim=-1)
            return _clip_ring(img_emb_BD, txt_emb_BD, scale, tile_size, Ring(), queue_img_CD,
                              queue_txt_CD)  # fmt: skip
        img_BD = F.normalize(img_emb_BD.float(), dim=-1)
        txt_BD = F.normalize(txt_emb_BD.float(), dim=-1)
        # One collective for both modalities; cheaper, and both backwards happen in one
        # all_reduce so the processes cannot disagree on the order.
        if not distributed or _world_size() == 1:
            img_GD, txt_GD = img_BD, txt_BD
        else:
            both_GD = all_gather_with_grad(torch.cat([img_BD, txt_BD], dim=1))
            img_GD, txt_GD = both_GD.split(img_BD.shape[1], dim=1)
        b, g = img_BD.shape[0], img_GD.shape[0]
        offset = _rank() * b if distributed else 0
        if kind == "clip":
            # Columns of the text->image rows (img_CD) and of the image->text rows (txt_CD).
            img_CD, txt_CD = img_GD, txt_GD
            if queued and queue_img_KD.shape[0] > 0:
                img_CD = torch.cat([img_GD, F.normalize(queue_img_KD.detach().float(), dim=-1)])
                txt_CD = torch.cat([txt_GD, F.normalize(queue_txt_KD.detach().float(), dim=-1)])
            impl = resolve_impl(impl, b, img_CD.shape[0], tile_size)
            if reweighted:
                return _clip_reweighted(
                    img_BD,
                    txt_BD,
                    img_CD,
                    txt_CD,
                    scale,
                    offset,
                    tau_plus=debias_tau_plus,
                    beta=hardness_beta,
                    impl=impl,
                    tile_size=tile_size,
                )
            return _clip_infonce(img_BD, txt_BD, img_CD, txt_CD, scale, offset, impl, tile_size)
        impl = resolve_impl(impl, b, g, tile_size)
        bias = _as_float32(0.0 if logit_bias is None else logit_bias, device)
        if impl == "plain":
            return _siglip_plain(img_BD, txt_GD, scale, bias, offset)
        return _siglip_tiled(img_BD, txt_BD, scale, bias, txt_GD, tile_size, offset)


def infonce_mi_lower_bound(loss: float, num_candidates: int) -> float:
    """log(N) - L: the InfoNCE lower bound on the mutual information between the two views (van
    den Oord et al., 2018; Poole et al., 2019), with N the candidates each row is scored against
    (the global batch plus any queued keys) and L the symmetric InfoNCE loss. It is a bound only
    for the plain InfoNCE objective (not the debiased or hardness-weighted ones), and it can
    never exceed log(N): more candidates are what allow a tighter bound. With queued keys from a
    momentum encoder the critic differs slightly between candidates, so read it as an estimate."""
    return math.log(num_candidates) - float(loss)


@torch.no_grad()
def representation_health(img_emb_BD: torch.Tensor, txt_emb_BD: torch.Tensor) -> dict[str, float]:
    """Wang & Isola (2020) on normalised embeddings of one process, no gather:
    alignment = mean ||x_i - y_i||^2 over pairs (0 is perfect), uniformity = log mean_{i != j}
    exp(-2 ||x_i - x_j||^2) over image pairs (lower is more uniform; nan for B < 2).
    O(B^2) memory: meant for a local batch."""
    x_BD = F.normalize(img_emb_BD.float(), dim=-1)
    y_BD = F.normalize(txt_emb_BD.float(), dim=-1)
    alignment = (x_BD - y_BD).pow(2).sum(dim=1).mean()
    sq_dist_P = torch.pdist(x_BD).pow(2)  # the B(B-1)/2 pairs i < j; mean over i != j is the same
    if sq_dist_P.numel() == 0:
        uniformity = float("nan")
    else:
        n = torch.tensor(float(sq_dist_P.numel()), device=x_BD.device)
        uniformity = float(torch.logsumexp(-2.0 * sq_dist_P, dim=0) - n.log())
    return {"alignment": float(alignment), "uniformity": uniformity}
