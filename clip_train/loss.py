"""Contrastive losses (CLIP / SigLIP): exact, distributed, and memory-linear in the batch.

Pure functions, no module state. Each process passes its LOCAL raw embeddings; they are
normalised in float32, all-gathered WITH gradient, and the process computes the loss of its own
rows against every global column (open_clip's `local_loss=True, gather_with_grad=True`). The mean
of the per-process losses is the single-process loss on the concatenated batch, and because the
gather's backward sums the gradient from every process before slicing, the gradients averaged by
DDP/Accelerate are the single-process gradients (encoders and logit scale/bias alike).

Two implementations of the same maths:
- plain: the B x G logit block exists (fast while it is small);
- tiled: custom autograd Functions walk T x C tiles, keep an online log-sum-exp (clip) or a running
  softplus sum (siglip) in the forward, and recompute tiles in the backward. Peak extra memory is
  O((B + G) * D + T * C) instead of O(B * G).
A third, `ring`, computes what `tiled` computes without the gather: the other processes'
embeddings travel around a ring of processes in chunks, and so do the gradients owed to them;
peak extra memory O(B * D + T * C), whatever the number of processes (see "Ring kernels").
Both form each row's loss from its negatives relative to its positive logit (softplus of a
shifted log-sum-exp, see "Precision" below), so the loss keeps its relative precision when it is
~1e-6 at a logit scale of 100, where log-sum-exp minus the positive logit would be all rounding.

Options beyond the plain objective (all off by default, all composable with both
implementations and any number of processes):
- extra negatives (`queue_img_KD`, `queue_txt_KD`): K constant keys, e.g. a MoCo/ALBEF queue of
  past key embeddings (clip_train.negatives). They are extra columns: image->text rows see
  [global texts; queued texts], text->image rows see [global images; queued images].
- debiased (Chuang et al., 2020, class prior tau+) and hard-negative weighted (Robinson et al.,
  2021, hardness beta) InfoNCE: both rewrite each row's negative term; see `_clip_reweighted`.

Shape legend: B local batch (rows of this process), G global batch (world * B), K extra
(queued) keys, D embedding dim, T row tile, C column tile (or, outside the kernels, the columns
G + K a row is compared with; in the ring kernels, a chunk of one process's columns), X the
embedding dim of whatever travels the ring.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "IMPLS",
    "Ring",
    "all_gather_with_grad",
    "contrastive_loss",
    "infonce_mi_lower_bound",
    "representation_health",
    "resolve_impl",
]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# Backends whose flat-buffer collectives the gather uses: all_gather_into_tensor writes every
# rank's rows into one (G, D) buffer (no list of `world` tensors, no torch.cat), and
# reduce_scatter_tensor sums the gradient and hands each rank only its slice, moving half the
# bytes of an all_reduce. gloo has both in recent torch (checked: 2.14) but emulates the
# reduce-scatter with an all_reduce, so it keeps the list / all_reduce path (the 2-process test
# opts gloo in to check the NCCL branch against it).
FLAT_COLLECTIVE_BACKENDS: set[str] = {"nccl"}


def _device_backend(backend: str, device_type: str) -> str:
    """The backend serving `device_type` in a `dist.get_backend()` string: a plain name
    ('nccl') or, for a group with one backend per device type, 'cpu:gloo,cuda:nccl'."""
    if ":" not in backend:
        return backend
    for part in backend.split(","):
        device, _, name = part.partition(":")
        if device.strip() == device_type:
            return name.strip()
    return ""


def uses_flat_collectives(device: torch.device) -> bool:
    """Whether the gather of tensors on `device` takes the all_gather_into_tensor /
    reduce_scatter_tensor branch (see FLAT_COLLECTIVE_BACKENDS)."""
    return _device_backend(str(dist.get_backend()), device.type) in FLAT_COLLECTIVE_BACKENDS


# torch 2.14 renamed the flat collectives (the old names warn); torch >= 2.4 has the old ones.
def _all_gather_flat(out_GD: torch.Tensor, x_BD: torch.Tensor) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out_GD, x_BD)


def _reduce_scatter_flat(out_BD: torch.Tensor, grad_GD: torch.Tensor) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
        out_BD, grad_GD, op=dist.ReduceOp.SUM
    )


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: sum the incoming gradient over processes, keep
    this rank's slice. The sum is what carries the other processes' loss terms back to our
    embeddings; a gather without it (or `accelerator.gather`) silently drops them.

    Two branches with the same result (tested bitwise on gloo): flat collectives
    (all_gather_into_tensor, then reduce_scatter_tensor) where the backend runs them natively,
    else all_gather into a list and all_reduce + slice."""

    @staticmethod
    def forward(ctx, x_BD: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        b = x_BD.shape[0]
        ctx.rows = (rank * b, (rank + 1) * b)
        # Every rank decides alike (same backend), and the backward follows the forward's choice.
        ctx.flat = uses_flat_collectives(x_BD.device)
        x_BD = x_BD.contiguous()
        if ctx.flat:
            out_GD = x_BD.new_empty((world * b, *x_BD.shape[1:]))
            _all_gather_flat(out_GD, x_BD)
            return out_GD
        parts = [torch.empty_like(x_BD) for _ in range(world)]
        dist.all_gather(parts, x_BD)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_GD: torch.Tensor) -> torch.Tensor:
        start, stop = ctx.rows
        if ctx.flat:
            grad_BD = grad_GD.new_empty((stop - start, *grad_GD.shape[1:]))
            _reduce_scatter_flat(grad_BD, grad_GD.contiguous())
            return grad_BD
        # The embedding gradient is tiny next to the encoders' (G * D floats): all_reduce's
        # extra traffic does not matter where reduce-scatter is missing or emulated.
        grad_GD = grad_GD.contiguous().clone()
        dist.all_reduce(grad_GD, op=dist.ReduceOp.SUM)
        return grad_GD[start:stop]


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """(world*B, D) concatenation over processes in rank order; identity when torch.distributed
    is not initialised or world size is 1. Backward: the sum over processes of the incoming
    gradient, this rank's slice (reduce_scatter_tensor on NCCL, all_reduce + slice elsewhere).

    Every process must call it with the same shape (equal local batch sizes)."""
    if _world_size() == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD)


# ---------------------------------------------------------------------------------------------
# Tiled kernels. Only the terms that couple every row with every column live here; the positive
# (diagonal) terms are O(B * D) and stay in ordinary autograd.
#
# Precision. Late in training a row's positive logit p_i (up to the logit scale, ~100) dominates
# it and the loss is ~1e-3..1e-6. Formed as logsumexp_c(x_ic) - p_i, the loss would be the
# difference of two float32 numbers of ~100, each rounded by ~5e-6: an error as large as the
# loss itself, and its gradients would hold softmax_ii - 1 alike. So the CLIP kernels return the
# log-sum-exp of the row's NEGATIVES relative to a per-row shift (the positive logit),
#     r_i = log sum_{c != pos(i)} exp(x_ic - p_i),
# a number of moderate size whose rounding is relative to itself, and the loss is
# log(1 + e^{r_i}) = softplus(r_i) (log1p of the negatives' mass). Nothing of the size of p_i is
# ever subtracted from something of its own size.


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _tiles(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _mask_positives_(logits_TC, r0: int, r1: int, c0: int, c1: int, offset: int) -> torch.Tensor:
    """Set the positive pairs of a tile (global column = row + offset) to -inf, in place: they
    then drop out of a logsumexp and get exp(-inf) = 0 in its gradient."""
    rows_T = torch.arange(r0, r1, device=logits_TC.device)
    inside_T = (rows_T + offset >= c0) & (rows_T + offset < c1)
    rows_T = rows_T[inside_T]
    logits_TC[rows_T - r0, rows_T + offset - c0] = float("-inf")
    return logits_TC


def _shifted_logsumexp(logits_TC: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum exp(logits - shift) along `dim` (shift: one value per entry of the other dim),
    leaving the tile as it is and with one temporary tile: log sum exp(logits - m) + (m - shift),
    m the maximum. m - shift is a difference of two logits, exact where they are within a factor
    of 2 of each other (Sterbenz), and never rounded at the size of the logits themselves."""
    m = logits_TC.amax(dim=dim)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a fully masked line: -inf out
    sums = (logits_TC - m.unsqueeze(dim)).exp_().sum(dim=dim)
    return sums.log_() + (m - shift)


class _TiledLogSumExp(torch.autograd.Function):
    """r_B[i] = log sum_{c != i + offset} exp(scale * <q_i, k_c> - shift_i) without the B x C
    matrix: row i's negatives (its positive column i + offset left out), relative to shift_i.
    Every row needs at least one negative (C >= 2).

    Forward: for each row tile, merge per-column-tile logsumexps with logaddexp (online LSE).
    Backward: recompute each tile's logits; dL/dlogits_ic = g_i * w_ic =: W_ic with w the
    softmax over row i's negatives, so dq = scale * W @ k, dk = scale * W^T @ q,
    dL/dscale = sum_i <q_i, (W @ k)_i>, and dL/dshift_i = -g_i (exactly: the weights sum to 1)."""

    @staticmethod
    def forward(ctx, q_BD, k_CD, scale, shift_B, tile_size: int, offset: int):
        r_B = q_BD.new_empty(q_BD.shape[0])
        for r0, r1 in _tiles(q_BD.shape[0], tile_size):
            qs_TD = q_BD[r0:r1] * scale
            shift_T1 = shift_B[r0:r1, None]
            r_T = None
            for c0, c1 in _tiles(k_CD.shape[0], tile_size):
                logits_TC = _mask_positives_(qs_TD @ k_CD[c0:c1].T, r0, r1, c0, c1, offset)
                tile_T = torch.logsumexp(logits_TC.sub_(shift_T1), dim=1)
                r_T = tile_T if r_T is None else torch.logaddexp(r_T, tile_T)
            r_B[r0:r1] = r_T
        ctx.save_for_backward(q_BD, k_CD, scale, shift_B, r_B)
        ctx.tile_size, ctx.offset = tile_size, offset
        return r_B

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_r_B):
        q_BD, k_CD, scale, shift_B, r_B = ctx.saved_tensors
        need_q, need_k, need_scale, need_shift = ctx.needs_input_grad[:4]
        # (W @ k) without the scale factor; also yields the scale gradient, so compute it when
        # either q or scale needs a gradient.
        wk_BD = torch.zeros_like(q_BD) if (need_q or need_scale) else None
        wq_CD = torch.zeros_like(k_CD) if need_k else None
        # w_ic = exp(x_ic - (shift_i + r_i)): one subtraction per entry, rounded like a logit.
        level_B = shift_B + r_B
        for r0, r1 in _tiles(q_BD.shape[0], ctx.tile_size):
            q_TD = q_BD[r0:r1]
            qs_TD = q_TD * scale
            level_T1 = level_B[r0:r1, None]
            g_T1 = grad_r_B[r0:r1, None]
            for c0, c1 in _tiles(k_CD.shape[0], ctx.tile_size):
                k_TD = k_CD[c0:c1]
                # In place: the tile is the only T x C buffer alive.
                logits_TC = _mask_positives_(qs_TD @ k_TD.T, r0, r1, c0, c1, ctx.offset)
                w_TC = logits_TC.sub_(level_T1).exp_().mul_(g_T1)
                if wk_BD is not None:
                    wk_BD[r0:r1].addmm_(w_TC, k_TD)
                if wq_CD is not None:
                    wq_CD[c0:c1].addmm_(w_TC.T, q_TD)
        grad_scale = _dot(q_BD, wk_BD).reshape(scale.shape) if need_scale else None
        # Scale in place: no second copy of the O(B * D) accumulators.
        grad_q = wk_BD.mul_(scale) if need_q else None
        grad_k = wq_CD.mul_(scale) if need_k else None
        grad_shift = -grad_r_B if need_shift else None
        return grad_q, grad_k, grad_scale, grad_shift, None, None


class _TiledSymmetricLogSumExp(torch.autograd.Function):
    """Both directions of one square block at once (a single process: rows and columns are the
    same batch, the diagonal holds the positives). With S = scale * a @ b^T:
        r_row_B[i] = log sum_{j != i} exp(S_ij - shift_i),
        r_col_B[j] = log sum_{i != j} exp(S_ij - shift_j).
    One tile of S serves both, so forward and backward each do half the matrix products of two
    `_TiledLogSumExp` calls.

    Backward: dL/dS_ij = g_i * w_row_ij + h_j * w_col_ij =: M_ij (0 on the diagonal);
    da = scale * M @ b, db = scale * M^T @ a, dL/dscale = sum_i <a_i, (M @ b)_i>,
    dL/dshift = -(g + h)."""

    @staticmethod
    def forward(ctx, a_BD, b_BD, scale, shift_B, tile_size: int):
        r_row_B = a_BD.new_empty(a_BD.shape[0])
        r_col_B = a_BD.new_full((b_BD.shape[0],), float("-inf"))
        for r0, r1 in _tiles(a_BD.shape[0], tile_size):
            as_TD = a_BD[r0:r1] * scale
            r_T = None
            for c0, c1 in _tiles(b_BD.shape[0], tile_size):
                logits_TC = _mask_positives_(as_TD @ b_BD[c0:c1].T, r0, r1, c0, c1, 0)
                tile_T = _shifted_logsumexp(logits_TC, shift_B[r0:r1], dim=1)
                r_T = tile_T if r_T is None else torch.logaddexp(r_T, tile_T)
                tile_C = _shifted_logsumexp(logits_TC, shift_B[c0:c1], dim=0)
                torch.logaddexp(r_col_B[c0:c1], tile_C, out=r_col_B[c0:c1])
            r_row_B[r0:r1] = r_T
        ctx.save_for_backward(a_BD, b_BD, scale, shift_B, r_row_B, r_col_B)
        ctx.tile_size = tile_size
        return r_row_B, r_col_B

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_B, grad_col_B):
        a_BD, b_BD, scale, shift_B, r_row_B, r_col_B = ctx.saved_tensors
        need_a, need_b, need_scale, need_shift = ctx.needs_input_grad[:4]
        # An output that did not reach the loss has no gradient: treat it as zero.
        grad_row_B = torch.zeros_like(r_row_B) if grad_row_B is None else grad_row_B
        grad_col_B = torch.zeros_like(r_col_B) if grad_col_B is None else grad_col_B
        mb_BD = torch.zeros_like(a_BD) if (need_a or need_scale) else None
        ma_BD = torch.zeros_like(b_BD) if need_b else None
        level_row_B, level_col_B = shift_B + r_row_B, shift_B + r_col_B
        for r0, r1 in _tiles(a_BD.shape[0], ctx.tile_size):
            a_TD = a_BD[r0:r1]
            as_TD = a_TD * scale
            for c0, c1 in _tiles(b_BD.shape[0], ctx.tile_size):
                b_CD = b_BD[c0:c1]
                logits_TC = _mask_positives_(as_TD @ b_CD.T, r0, r1, c0, c1, 0)
                m_TC = (logits_TC - level_row_B[r0:r1, None]).exp_().mul_(grad_row_B[r0:r1, None])
                col_TC = logits_TC.sub_(level_col_B[None, c0:c1]).exp_()
                m_TC.add_(col_TC.mul_(grad_col_B[None, c0:c1]))
                del logits_TC, col_TC
                if mb_BD is not None:
                    mb_BD[r0:r1].addmm_(m_TC, b_CD)
                if ma_BD is not None:
                    ma_BD[c0:c1].addmm_(m_TC.T, a_TD)
        grad_scale = _dot(a_BD, mb_BD).reshape(scale.shape) if need_scale else None
        grad_a = mb_BD.mul_(scale) if need_a else None
        grad_b = ma_BD.mul_(scale) if need_b else None
        grad_shift = -(grad_row_B + grad_col_B) if need_shift else None
        return grad_a, grad_b, grad_scale, grad_shift, None


class _TiledSoftplusSum(torch.autograd.Function):
    """sum_{i, c != i + offset} softplus(scale * <q_i, k_c> + bias) without the B x G matrix:
    the SigLIP terms of every negative pair (the positives are masked out: their term,
    softplus(-x), is computed outside, see `_siglip_tiled`).

    Backward: dL/dlogits_ic = g * sigmoid(logits_ic); dq = scale * S @ k, dk = scale * S^T @ q,
    dL/dscale = sum_i <q_i, (S @ k)_i>, dL/dbias = sum S."""

    @staticmethod
    def forward(ctx, q_BD, k_GD, scale, bias, tile_size: int, offset: int):
        # Tile sums (torch's pairwise reduction, accurate in float32) are accumulated in float64:
        # up to B * G terms, each O(1). Summing with dtype=float64 would copy the whole tile.
        total = torch.zeros((), dtype=torch.float64, device=q_BD.device)
        for r0, r1 in _tiles(q_BD.shape[0], tile_size):
            qs_TD = q_BD[r0:r1] * scale
            for c0, c1 in _tiles(k_GD.shape[0], tile_size):
                logits_TC = (qs_TD @ k_GD[c0:c1].T).add_(bias)
                _mask_positives_(logits_TC, r0, r1, c0, c1, offset)
                total += F.softplus(logits_TC).sum().double()
        ctx.save_for_backward(q_BD, k_GD, scale, bias)
        ctx.tile_size, ctx.offset = tile_size, offset
        return total.to(q_BD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        q_BD, k_GD, scale, bias = ctx.saved_tensors
        need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
        pk_BD = torch.zeros_like(q_BD) if (need_q or need_scale) else None
        pq_GD = torch.zeros_like(k_GD) if need_k else None
        grad_bias = torch.zeros((), dtype=torch.float64, device=q_BD.device)
        for r0, r1 in _tiles(q_BD.shape[0], ctx.tile_size):
            q_TD = q_BD[r0:r1]
            qs_TD = q_TD * scale
            for c0, c1 in _tiles(k_GD.shape[0], ctx.tile_size):
                k_CD = k_GD[c0:c1]
                logits_TC = (qs_TD @ k_CD.T).add_(bias)
                _mask_positives_(logits_TC, r0, r1, c0, c1, ctx.offset)
                s_TC = logits_TC.sigmoid_().mul_(grad_total)
                if need_bias:
                    grad_bias += s_TC.sum().double()
                if pk_BD is not None:
                    pk_BD[r0:r1].addmm_(s_TC, k_CD)
                if pq_GD is not None:
                    pq_GD[c0:c1].addmm_(s_TC.T, q_TD)
        grad_scale = _dot(q_BD, pk_BD).reshape(scale.shape) if need_scale else None
        # Scale in place: no second copy of the O(B * D) accumulators.
        grad_q = pk_BD.mul_(scale) if need_q else None
        grad_k = pq_GD.mul_(scale) if need_k else None
        grad_bias = grad_bias.to(bias.dtype).reshape(bias.shape) if need_bias else None
        return grad_q, grad_k, grad_scale, grad_bias, None, None


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
        grad_shift_B = -(grad_i2t_B + grad_t2i_B)
        if need_scale:
            grad_scale.add_(_dot(grad_shift_B, _row_dot(img_BD, txt_BD)))
        grad_img = grad_txt = None
        if need_img:
            acc_img_BD.addcmul_(txt_BD, grad_shift_B[:, None]).mul_(scale)
            grad_img = _unit_rows_backward_(acc_img_BD, img_BD, img_norm_B, img_clamped_B)
        if need_txt:
            acc_txt_BD.addcmul_(img_BD, grad_shift_B[:, None]).mul_(scale)
            grad_txt = _unit_rows_backward_(acc_txt_BD, txt_BD, txt_norm_B, txt_clamped_B)
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
        if need_scale:
            grad_scale.add_(_dot(p_B, _row_dot(img_BD, txt_BD)))
        grad_img = grad_txt = None
        if need_img:
            acc_img_BD.addcmul_(txt_BD, p_B[:, None]).mul_(scale)
            grad_img = _unit_rows_backward_(acc_img_BD, img_BD, img_norm_B, img_clamped_B)
        if need_txt:
            acc_txt_BD.addcmul_(img_BD, p_B[:, None]).mul_(scale)
            grad_txt = _unit_rows_backward_(acc_txt_BD, txt_BD, txt_norm_B, txt_clamped_B)
        grad_scale = grad_scale.to(scale.dtype).reshape(scale.shape) if need_scale else None
        grad_bias = grad_bias.to(bias.dtype).reshape(bias.shape) if need_bias else None
        return grad_img, grad_txt, grad_scale, grad_bias, None, None


# ---------------------------------------------------------------------------------------------
# The two implementations, on normalised float32 embeddings: local rows (_BD) vs columns (_CD:
# the global batch, then any extra keys). `offset` is the global index of this process's first
# row, so row i's positive is column i + offset.


def _negatives_lse(q_BD, k_CD, scale, shift_B, offset: int, impl: str, tile_size: int):
    """r_B[i] = log sum_{c != i + offset} exp(scale * <q_i, k_c> - shift_i): row i's negatives,
    relative to shift_i (see "Precision" above). Needs C >= 2."""
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
    the positive (see "Precision" above): with rel = log(Ng / e^p), the loss is softplus(rel),
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
