"""Pure evaluation maths on float32 embeddings: zero-shot classifier and counts, retrieval recall,
alignment/uniformity, and the validation loss over fixed batches.

Shape suffixes: N images, T texts (captions; an image may have several), C classes, D embedding
dim, P prompts, Q queries and K keys in one similarity block, k top-k.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.loss import contrastive_loss

RECALL_KS = (1, 5, 10)
# Wang & Isola (2020): uniformity = log E exp(-t ||x - y||^2) over distinct pairs, with t = 2.
UNIFORMITY_T = 2.0


def build_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]],
    *,
    device: torch.device | str,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: Callable = lambda it, **_: it,
) -> torch.Tensor:
    """Zero-shot weights [D, C]: per class, the mean over templates of the normalised text
    embeddings, renormalised (open_clip's recipe), about `batch_size` prompts per forward.

    Only the encoder runs under `autocast`: normalising and averaging are float32 (autocast
    would recast them to bf16/fp16)."""
    per_batch = max(1, batch_size // len(templates))
    cols: list[torch.Tensor] = []
    starts = range(0, len(classnames), per_batch)
    for c0 in progress(starts, desc="zero-shot classifier", unit="batches", total=len(starts)):
        names = classnames[c0 : c0 + per_batch]
        prompts = [t(name) for name in names for t in templates]
        with autocast():
            emb_PD = model.encode_text(tokenizer(prompts).to(device))
        emb_CtD = F.normalize(emb_PD.float(), dim=-1).reshape(len(names), len(templates), -1)
        cols.append(F.normalize(emb_CtD.mean(dim=1), dim=-1))
    return torch.cat(cols).T


def classification_counts(
    logits_NC: torch.Tensor, labels_N: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Summable counts: top-1/top-5 hits overall and per-class top-1 hits and totals (int64)."""
    k = min(5, logits_NC.shape[1])
    topk_Nk = logits_NC.topk(k, dim=1).indices
    hit_Nk = topk_Nk == labels_N[:, None]
    top1_N = hit_Nk[:, 0]
    return {
        "top1": top1_N.sum().long().reshape(1),
        "top5": hit_Nk.any(dim=1).sum().long().reshape(1),
        "class_correct": torch.bincount(labels_N[top1_N], minlength=num_classes).long(),
        "class_total": torch.bincount(labels_N, minlength=num_classes).long(),
    }


def classification_metrics(counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """top-1, top-5 and mean per-class recall (over the classes present) from summed counts."""
    total = int(counts["class_total"].sum())
    if total == 0:
        return {"zeroshot/num_samples": 0.0}
    present = counts["class_total"] > 0
    recall_C = counts["class_correct"][present].double() / counts["class_total"][present].double()
    return {
        "zeroshot/top1": int(counts["top1"]) / total,
        "zeroshot/top5": int(counts["top5"]) / total,
        "zeroshot/mean_per_class_recall": float(recall_C.mean()),
        "zeroshot/num_samples": float(total),
    }


def chunked_topk(
    query_QD: torch.Tensor, keys_KD: torch.Tensor, k: int, chunk_size: int
) -> torch.Tensor:
    """Indices [Q, k] of the k keys with the largest dot product with each query.

    Blocks of at most chunk_size x chunk_size similarities are formed, merging a running top-k
    across key blocks, so memory stays O(chunk_size^2) for any Q and K (1M pairs fit)."""
    num_q, num_k = query_QD.shape[0], keys_KD.shape[0]
    k = min(k, num_k)
    out_Qk = torch.empty(num_q, k, dtype=torch.long, device=query_QD.device)
    for q0 in range(0, num_q, chunk_size):
        q_QD = query_QD[q0 : q0 + chunk_size]
        best_val_Qk = q_QD.new_empty(q_QD.shape[0], 0)
        best_idx_Qk = torch.empty(q_QD.shape[0], 0, dtype=torch.long, device=q_QD.device)
        for k0 in range(0, num_k, chunk_size):
            sim_QK = q_QD @ keys_KD[k0 : k0 + chunk_size].T
            idx_QK = torch.arange(k0, k0 + sim_QK.shape[1], device=q_QD.device).expand_as(sim_QK)
            val = torch.cat([best_val_Qk, sim_QK], dim=1)
            idx = torch.cat([best_idx_Qk, idx_QK], dim=1)
            best_val_Qk, pos = val.topk(min(k, val.shape[1]), dim=1)
            best_idx_Qk = idx.gather(1, pos)
        out_Qk[q0 : q0 + chunk_size] = best_idx_Qk
    return out_Qk


def retrieval_metrics(
    img_emb_ND: torch.Tensor,
    txt_emb_TD: torch.Tensor,
    txt_owner_T: torch.Tensor,
    *,
    chunk_size: int,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k both ways on normalised embeddings; text t is a caption of image txt_owner_T[t].

    Image->text: an image counts as found when any of its captions is among the top k texts.
    Text->image: a caption counts when its image is among the top k images."""
    kmax = max(ks)
    i2t_Nk = chunked_topk(img_emb_ND, txt_emb_TD, kmax, chunk_size)
    i2t_hit_Nk = (
        txt_owner_T[i2t_Nk] == torch.arange(img_emb_ND.shape[0], device=i2t_Nk.device)[:, None]
    )
    t2i_Tk = chunked_topk(txt_emb_TD, img_emb_ND, kmax, chunk_size)
    t2i_hit_Tk = t2i_Tk == txt_owner_T[:, None]
    out = {}
    for k in ks:
        out[f"retrieval/image_to_text_R@{k}"] = float(i2t_hit_Nk[:, :k].any(dim=1).double().mean())
        out[f"retrieval/text_to_image_R@{k}"] = float(t2i_hit_Tk[:, :k].any(dim=1).double().mean())
    return out


def alignment(
    img_emb_ND: torch.Tensor, txt_emb_TD: torch.Tensor, txt_owner_T: torch.Tensor
) -> float:
    """E ||f(image) - f(caption)||^2 over positive pairs (Wang & Isola 2020, alpha = 2)."""
    diff_TD = img_emb_ND[txt_owner_T].double() - txt_emb_TD.double()
    return float(diff_TD.pow(2).sum(dim=1).mean())


def uniformity(emb_ND: torch.Tensor, *, chunk_size: int, t: float = UNIFORMITY_T) -> float:
    """log of the mean of exp(-t ||x_i - x_j||^2) over pairs i != j of normalised embeddings.

    Accumulated as a log-sum-exp over similarity blocks, never the full N x N matrix."""
    n = emb_ND.shape[0]
    if n < 2:
        return float("nan")
    lse_parts: list[float] = []
    for q0 in range(0, n, chunk_size):
        q_QD = emb_ND[q0 : q0 + chunk_size]
        for k0 in range(0, n, chunk_size):
            # For unit vectors -t ||x - y||^2 = 2t x.y - 2t: the constant leaves the sum, which
            # saves two passes over every block.
            logits_QK = (q_QD @ emb_ND[k0 : k0 + chunk_size].T).mul_(2 * t)
            if q0 == k0:
                logits_QK.fill_diagonal_(-math.inf)
            # A Python float, not a 0-d tensor: thousands of small tensors kept alive between
            # the large freed blocks fragment the CPU heap (+1 GB at N = 20k, measured).
            lse_parts.append(torch.logsumexp(logits_QK, dim=(0, 1)).item())
    lse = torch.logsumexp(torch.tensor(lse_parts, dtype=torch.float64), dim=0)
    return float(lse) - 2 * t - math.log(n * (n - 1))


def validation_batch_losses(
    img_emb_ND: torch.Tensor,
    txt_emb_ND: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    **loss_kwargs,
) -> torch.Tensor:
    """The training objective on consecutive batches [j*batch_size, (j+1)*batch_size) of the
    pairs (the last may be smaller), float64 [num_batches]: this rank's batches (j % world_size
    == rank) filled in, the others 0, so that a SUM over ranks gives every batch's loss.

    A batch is computed whole on one process, from the same embeddings, by the same code: its
    value cannot depend on the number of processes. `loss_kwargs` go to contrastive_loss (kind,
    max_logit_scale, ...); a batch of one pair has no negatives and is left out (NaN)."""
    n = img_emb_ND.shape[0]
    num_batches = math.ceil(n / batch_size)
    out = torch.zeros(num_batches, dtype=torch.float64, device=img_emb_ND.device)
    for j in range(rank, num_batches, world_size):
        sl = slice(j * batch_size, (j + 1) * batch_size)
        if img_emb_ND[sl].shape[0] < 2:
            out[j] = math.nan
            continue
        loss = contrastive_loss(
            img_emb_ND[sl], txt_emb_ND[sl], logit_scale, logit_bias, distributed=False,
            **loss_kwargs,
        )
        out[j] = loss.double()
    return out


def validation_metrics(losses_J: torch.Tensor, num_samples: int, batch_size: int) -> dict[str, float]:
    """`val/loss`: mean over batches (what training logs, one batch = one step); and
    `val/loss_per_sample`: every pair weighted alike (the last, smaller batch counts for its
    size). Contrastive losses grow with the number of negatives: compare at one batch_size."""
    if num_samples == 0:
        return {"val/num_samples": 0.0}
    sizes_J = torch.full_like(losses_J, float(batch_size))
    sizes_J[-1] = num_samples - batch_size * (len(losses_J) - 1)
    ok = ~losses_J.isnan()
    return {
        "val/loss": float(losses_J[ok].mean()),
        "val/loss_per_sample": float((losses_J[ok] * sizes_J[ok]).sum() / sizes_J[ok].sum()),
        "val/num_samples": float(num_samples),
        "val/num_batches": float(int(ok.sum())),
    }
