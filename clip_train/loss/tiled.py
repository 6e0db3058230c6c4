"""Tiled kernels (`impl="tiled"`): autograd Functions that walk T x C tiles of the logits,
keep an online log-sum-exp (CLIP) or a running softplus sum (SigLIP) in the forward and
recompute the tiles in the backward: peak extra memory O((B + G) * D + T * C), not O(B * G)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
