"""Ring kernels (`impl="ring"`): what the tiled kernels compute, without the gather; the other
processes' embeddings travel around a ring of processes in chunks (see the comment below)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from clip_train.loss.tiled import _dot, _mask_positives_, _tiles

# ---------------------------------------------------------------------------------------------
# Ring kernels (impl="ring"). No process holds the global batch: each keeps its B local rows, and
# the other processes' columns travel around the ring in chunks of at most tile_size rows, sent to
# the next process while this one computes with them (point-to-point, asynchronous). The forward
# accumulates each row's statistics chunk by chunk; the backward sends the columns around again,
# and with each chunk the gradient owed to it: every process adds its rows' contribution and
# passes it on, and after W - 1 hops it reaches the chunk's owner holding the sum over the other
# processes' losses -- what the gather's backward (an all-reduce) gives, without G x D buffers.
#
# Order (every process issues the same sequence, which NCCL needs to match messages; gloo also
# matches by tag): chunk-major, ring step-minor. At step k of chunk j, process r holds chunk j of
# process (r - k)'s columns, received from r - 1, which held it at step k - 1. Peak extra memory:
# the O(B * D) rows and gradients, two chunks of columns (the one in use and sent, the next one
# arriving), three of travelling gradients, and the T x C tiles -- nothing that grows with W.

RING_COLUMNS_TAG, RING_GRADIENTS_TAG = 24, 25


class Ring:
    """This process's neighbours on a ring over the default process group, and the one pattern
    the ring kernels communicate with: send tensors to the next process while receiving tensors
    of the same shapes from the previous one. Other transports (benchmarks/loss_memory.py
    simulates the other processes of a large ring) provide `rank`, `world` and `shift`."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def shift(self, send: list[torch.Tensor], recv: list[torch.Tensor], tag: int) -> list:
        """Start sending `send` to the next process and receiving `recv` from the previous one;
        returns the works to wait on. Tensors must be contiguous (gloo refuses views with
        strides); one batch, so that NCCL runs it as one group."""
        ops = [dist.P2POp(dist.isend, t, self.next, tag=tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, tag=tag) for t in recv]
        return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _ring_forward(ring, cols_BX: list[torch.Tensor], chunk_size: int, visit) -> None:
    """Call visit(cols_CX, c0, c1, own) once for every chunk [c0, c1) of every process's columns
    (own: this process's), the next chunk arriving while visit computes."""
    for c0, c1 in _tiles(cols_BX[0].shape[0], chunk_size):
        cur_CX = [t[c0:c1] for t in cols_BX]  # row slices of contiguous tensors: contiguous
        spares = [[torch.empty_like(t) for t in cur_CX] for _ in range(min(ring.world - 1, 2))]
        for k in range(ring.world):
            last = k == ring.world - 1  # the chunk's owner is next: nothing to send
            nxt_CX = [] if last else spares[k % 2]
            works = [] if last else ring.shift(cur_CX, nxt_CX, RING_COLUMNS_TAG)
            visit(cur_CX, c0, c1, k == 0)
            _wait(works)
            cur_CX = nxt_CX


def _ring_backward(
    ring, cols_BX: list[torch.Tensor], chunk_size: int, visit, col_grads_BX: list[torch.Tensor]
) -> None:
    """Like `_ring_forward`, with visit returning the gradient owed to the chunk's columns (one
    tensor per entry of col_grads_BX). The gradients of this process's own chunks, summed over
    every process, are added into col_grads_BX."""
    world = ring.world
    # The gradient shift in flight: its works, the tensors it sends and receives (kept alive until
    # it completes), and where the received one goes when it is this process's own chunk.
    works, sent_CX, arriving_CX, own_rows = [], [], [], None

    def land() -> None:
        nonlocal works, sent_CX, own_rows
        _wait(works)
        if own_rows is not None:
            for acc, g in zip(col_grads_BX, arriving_CX, strict=True):
                acc[own_rows[0] : own_rows[1]].add_(g)
        works, sent_CX, own_rows = [], [], None

    for c0, c1 in _tiles(cols_BX[0].shape[0], chunk_size):
        cur_CX = [t[c0:c1] for t in cols_BX]
        spares = [[torch.empty_like(t) for t in cur_CX] for _ in range(min(world - 1, 2))]
        for k in range(world):
            last = k == world - 1
            nxt_CX = [] if last else spares[k % 2]
            col_works = [] if last else ring.shift(cur_CX, nxt_CX, RING_COLUMNS_TAG)
            owed_CX = visit(cur_CX, c0, c1, k == 0)
            if k == 0:
                for acc, g in zip(col_grads_BX, owed_CX, strict=True):
                    acc[c0:c1].add_(g)
                land()  # the previous chunk's own gradient, which arrived meanwhile
            elif col_grads_BX:
                inbound_CX = arriving_CX
                land()
                if k >= 2:  # what the previous processes added up for this chunk
                    for g, inbound in zip(owed_CX, inbound_CX, strict=True):
                        g.add_(inbound)
                del inbound_CX  # not alive through the next visit: three chunks of gradients
                # Pass the running sum on and receive the next one (after the last step: this
                # process's own chunk, complete).
                sent_CX, arriving_CX = owed_CX, [torch.empty_like(g) for g in owed_CX]
                works = ring.shift(sent_CX, arriving_CX, RING_GRADIENTS_TAG)
                own_rows = (c0, c1) if last else None
            _wait(col_works)
            cur_CX = nxt_CX
    land()


_NORM_EPS = 1e-12  # F.normalize's


def _unit_rows(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.normalize(x, dim=1) (bitwise: the same norm, clamp and division), with the clamped norms
    and where the clamp bound, which its backward needs."""
    norm_B = torch.linalg.vector_norm(x_BD, dim=1)
    clamped_B = norm_B < _NORM_EPS
    norm_B = norm_B.clamp_min(_NORM_EPS)
    return x_BD / norm_B[:, None], norm_B, clamped_B


def _unit_rows_backward_(grad_BD, y_BD, norm_B, clamped_B) -> torch.Tensor:
    """In place on grad_BD (the gradient w.r.t. y = x / max(||x||, eps)): the gradient w.r.t. x,
    (g - y <g, y>) / ||x||, or g / eps where the norm was clamped. No B x D temporary."""
    dot_B = torch.einsum("bd,bd->b", grad_BD, y_BD).masked_fill_(clamped_B, 0.0)
    return grad_BD.addcmul_(y_BD, dot_B[:, None], value=-1.0).div_(norm_B[:, None])


def _row_dot(a_BD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bd,bd->b", a_BD, b_BD)  # (a * b).sum(1) without the B x D product


def _finish_backward_(grad_positive_B, scale, grad_scale, img, txt) -> tuple:
    """The end of a ring loss's backward: adds the positive pairs' terms (`grad_positive_B`: the
    loss's gradient w.r.t. each positive logit, scale * <img_i, txt_i> (+ bias)) to the unscaled
    gradients the ring accumulated and to `grad_scale` (float64; None if not needed), and returns
    the gradients w.r.t. the raw image and text embeddings (None where not needed). `img`, `txt`:
    (unit rows, their norms, clamped mask, accumulated gradient or None), as `_unit_rows` gave."""
    (img_BD, *_), (txt_BD, *_) = img, txt
    if grad_scale is not None:
        grad_scale.add_(_dot(grad_positive_B, _row_dot(img_BD, txt_BD)))
    grads = []
    for (rows_BD, norm_B, clamped_B, acc_BD), partner_BD in ((img, txt_BD), (txt, img_BD)):
        if acc_BD is None:
            grads.append(None)
            continue
        acc_BD.addcmul_(partner_BD, grad_positive_B[:, None]).mul_(scale)
        grads.append(_unit_rows_backward_(acc_BD, rows_BD, norm_B, clamped_B))
    return tuple(grads)


class _RingClip(torch.autograd.Function):
    """CLIP's two directions over the ring, from the RAW float32 embeddings of this process:
    with y = the unit rows and p_i = scale * <img_i, txt_i> each row's positive logit,
        r_i2t_B[i] = log sum_{c != i + offset} exp(scale * <img_i, txt_c> - p_i),
        r_t2i_B[i] = log sum_{c != i + offset} exp(scale * <txt_i, img_c> - p_i),
    over every process's columns, then the K queued keys (constants, already unit rows) if
    given -- as `_negatives_lse` of the gathered path computes them (the loss is softplus(r)).
    img and txt travel together: one ring for both directions.

    The normalisation and the positive logits live inside so that the backward works in place:
    per process it holds the unit rows and one gradient accumulator per modality (which becomes
    the returned gradient), nothing else of size B x D.

    Backward: per chunk, W = g_i * softmax weights over row i's negatives; this process's rows
    get scale * W @ k, the chunk's columns scale * W^T @ q (sent back to their owner), the
    positives -(g + g')_i * scale * (the other modality's row i), the scale the same terms with
    <q, k> in place of k; then the normalisation's backward."""

    @staticmethod
    def forward(
        ctx, img_emb_BD, txt_emb_BD, scale, tile_size: int, ring, queue_img_KD, queue_txt_KD
    ):
        img_BD, img_norm_B, img_clamped_B = _unit_rows(img_emb_BD)
        txt_BD, txt_norm_B, txt_clamped_B = _unit_rows(txt_emb_BD)
        shift_B = scale * _row_dot(img_BD, txt_BD)
        r_i2t_B = img_BD.new_full((img_BD.shape[0],), float("-inf"))
        r_t2i_B = torch.full_like(r_i2t_B, float("-inf"))

        def visit(cols_CX, c0, c1, own, constant=False):
            img_CD, txt_CD = cols_CX
            for r0, r1 in _tiles(img_BD.shape[0], tile_size):
                shift_T1 = shift_B[r0:r1, None]
                for q_BD, k_CD, r_B in ((img_BD, txt_CD, r_i2t_B), (txt_BD, img_CD, r_t2i_B)):
                    logits_TC = (q_BD[r0:r1] * scale) @ k_CD.T
                    if own:
                        _mask_positives_(logits_TC, r0, r1, c0, c1, 0)
                    tile_T = torch.logsumexp(logits_TC.sub_(shift_T1), dim=1)
                    torch.logaddexp(r_B[r0:r1], tile_T, out=r_B[r0:r1])

        _ring_forward(ring, [img_BD, txt_BD], tile_size, visit)
        queued = queue_img_KD is not None and queue_img_KD.shape[0] > 0
        if queued:  # extra columns, the same on every process: nothing travels
            for k0, k1 in _tiles(queue_img_KD.shape[0], tile_size):
                visit([queue_img_KD[k0:k1], queue_txt_KD[k0:k1]], k0, k1, False)
        ctx.save_for_backward(img_BD, txt_BD, img_norm_B, txt_norm_B, img_clamped_B, txt_clamped_B,
                              scale, shift_B, r_i2t_B, r_t2i_B,
                              *((queue_img_KD, queue_txt_KD) if queued else ()))  # fmt: skip
        ctx.tile_size, ctx.ring = tile_size, ring
        return r_i2t_B, r_t2i_B

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_i2t_B, grad_t2i_B):
        (img_BD, txt_BD, img_norm_B, txt_norm_B, img_clamped_B, txt_clamped_B,
         scale, shift_B, r_i2t_B, r_t2i_B, *queue_KD) = ctx.saved_tensors  # fmt: skip
        need_img, need_txt, need_scale = ctx.needs_input_grad[:3]
        grad_i2t_B = torch.zeros_like(r_i2t_B) if grad_i2t_B is None else grad_i2t_B
        grad_t2i_B = torch.zeros_like(r_t2i_B) if grad_t2i_B is None else grad_t2i_B
        # Unscaled gradients w.r.t. this process's unit rows: its rows' terms, then (added by
        # the ring) the terms of every process's rows in which they are columns.
        acc_img_BD = torch.zeros_like(img_BD) if need_img else None
        acc_txt_BD = torch.zeros_like(txt_BD) if need_txt else None
        grad_scale = torch.zeros((), dtype=torch.float64, device=img_BD.device)
        # i2t rows: images against text columns (which owe the text gradient); t2i the reverse.
        directions = (
            (img_BD, 1, shift_B + r_i2t_B, grad_i2t_B, acc_img_BD),
            (txt_BD, 0, shift_B + r_t2i_B, grad_t2i_B, acc_txt_BD),
        )

        def visit(cols_CX, c0, c1, own, constant=False):
            owed = {0: torch.zeros_like(cols_CX[0]) if need_img and not constant else None,
                    1: torch.zeros_like(cols_CX[1]) if need_txt and not constant else None}  # fmt: skip
            for r0, r1 in _tiles(img_BD.shape[0], ctx.tile_size):
                for q_BD, col, level_B, g_B, acc_BD in directions:
                    q_TD, k_CD = q_BD[r0:r1], cols_CX[col]
                    logits_TC = (q_TD * scale) @ k_CD.T
                    if own:
                        _mask_positives_(logits_TC, r0, r1, c0, c1, 0)
                    # In place: the tile is the only T x C buffer alive.
                    w_TC = logits_TC.sub_(level_B[r0:r1, None]).exp_().mul_(g_B[r0:r1, None])
                    if acc_BD is not None or need_scale:
                        wk_TD = w_TC @ k_CD
                        if need_scale:
                            grad_scale.add_(_dot(q_TD, wk_TD))
                        if acc_BD is not None:
                            acc_BD[r0:r1].add_(wk_TD)
                    if owed[col] is not None:
                        owed[col].addmm_(w_TC.T, q_TD)
            return [owed[col] for col in (0, 1) if owed[col] is not None]

        if queue_KD:
            for k0, k1 in _tiles(queue_KD[0].shape[0], ctx.tile_size):
                visit([queue_KD[0][k0:k1], queue_KD[1][k0:k1]], k0, k1, False, constant=True)
        _ring_backward(ctx.ring, [img_BD, txt_BD], ctx.tile_size, visit,
                       [acc for acc in (acc_img_BD, acc_txt_BD) if acc is not None])  # fmt: skip
        # The positive logits: d shift_i = -(g_i + g'_i).
        grad_img, grad_txt = _finish_backward_(
            -(grad_i2t_B + grad_t2i_B), scale, grad_scale if need_scale else None,
            (img_BD, img_norm_B, img_clamped_B, acc_img_BD), (txt_BD, txt_norm_B, txt_clamped_B, acc_txt_BD))
        grad_scale = grad_scale.to(scale.dtype).reshape(scale.shape) if need_scale else None
        return grad_img, grad_txt, grad_scale, None, None, None, None


class _RingSigLip(torch.autograd.Function):
    """SigLIP over the ring, from the RAW float32 embeddings of this process: the sum over its
    image rows i and every process's texts c of -log sigmoid(label * (scale * <img_i, txt_c> +
    bias)) on the unit rows, i.e. softplus(x) for the negative pairs and softplus(-x) for the
    positives. The texts travel (a process's loss is over its own image rows). Normalisation and
    positives inside, for an in-place backward as in `_RingClip`; the negative pairs' backward
    as in `_TiledSoftplusSum`, the text gradient owed to another process sent back to it."""

    @staticmethod
    def forward(ctx, img_emb_BD, txt_emb_BD, scale, bias, tile_size: int, ring):
        img_BD, img_norm_B, img_clamped_B = _unit_rows(img_emb_BD)
        txt_BD, txt_norm_B, txt_clamped_B = _unit_rows(txt_emb_BD)
        # Tile sums in float64: up to B * G terms, each O(1).
        positive_B = scale * _row_dot(img_BD, txt_BD) + bias
        total = F.softplus(-positive_B).sum().double()

        def visit(cols_CX, c0, c1, own):
            nonlocal total
            (txt_CD,) = cols_CX
            for r0, r1 in _tiles(img_BD.shape[0], tile_size):
                logits_TC = ((img_BD[r0:r1] * scale) @ txt_CD.T).add_(bias)
                if own:
                    _mask_positives_(logits_TC, r0, r1, c0, c1, 0)
                total += F.softplus(logits_TC).sum().double()

        _ring_forward(ring, [txt_BD], tile_size, visit)
        ctx.save_for_backward(img_BD, txt_BD, img_norm_B, txt_norm_B, img_clamped_B, txt_clamped_B,
                              scale, bias, positive_B)  # fmt: skip
        ctx.tile_size, ctx.ring = tile_size, ring
        return total.to(img_BD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        (img_BD, txt_BD, img_norm_B, txt_norm_B, img_clamped_B, txt_clamped_B,
         scale, bias, positive_B) = ctx.saved_tensors  # fmt: skip
        need_img, need_txt, need_scale, need_bias = ctx.needs_input_grad[:4]
        acc_img_BD = torch.zeros_like(img_BD) if need_img else None
        acc_txt_BD = torch.zeros_like(txt_BD) if need_txt else None
        grad_scale = torch.zeros((), dtype=torch.float64, device=img_BD.device)
        grad_bias = torch.zeros((), dtype=torch.float64, device=img_BD.device)

        def visit(cols_CX, c0, c1, own):
            (txt_CD,) = cols_CX
            owed_CD = torch.zeros_like(txt_CD) if need_txt else None
            for r0, r1 in _tiles(img_BD.shape[0], ctx.tile_size):
                img_TD = img_BD[r0:r1]
                logits_TC = ((img_TD * scale) @ txt_CD.T).add_(bias)
                if own:
                    _mask_positives_(logits_TC, r0, r1, c0, c1, 0)
                s_TC = logits_TC.sigmoid_().mul_(grad_total)
                if need_bias:
                    grad_bias.add_(s_TC.sum().double())
                if need_img or need_scale:
                    sk_TD = s_TC @ txt_CD
                    if need_scale:
                        grad_scale.add_(_dot(img_TD, sk_TD))
                    if need_img:
                        acc_img_BD[r0:r1].add_(sk_TD)
                if need_txt:
                    owed_CD.addmm_(s_TC.T, img_TD)
            return [] if owed_CD is None else [owed_CD]

        _ring_backward(ctx.ring, [txt_BD], ctx.tile_size, visit,
                       [] if acc_txt_BD is None else [acc_txt_BD])  # fmt: skip
        # The positives: d softplus(-x) / dx = -sigmoid(-x).
        p_B = torch.sigmoid(-positive_B).mul_(-grad_total)
        if need_bias:
            grad_bias.add_(p_B.sum().double())
        grad_img, grad_txt = _finish_backward_(
            p_B, scale, grad_scale if need_scale else None,
            (img_BD, img_norm_B, img_clamped_B, acc_img_BD), (txt_BD, txt_norm_B, txt_clamped_B, acc_txt_BD))
        grad_scale = grad_scale.to(scale.dtype).reshape(scale.shape) if need_scale else None
        grad_bias = grad_bias.to(bias.dtype).reshape(bias.shape) if need_bias else None
        return grad_img, grad_txt, grad_scale, grad_bias, None, None
