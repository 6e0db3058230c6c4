"""The all-gather that carries gradients back to every process (`all_gather_with_grad`), and
the process-group queries the losses make."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
