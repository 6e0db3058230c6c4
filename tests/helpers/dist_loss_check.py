"""Multi-process check of clip_train.loss, launched by tests/test_loss.py with
`accelerate launch --num_processes 2` (gloo on CPU). Writes one JSON of measured errors; the test
asserts on it, so a wrong gradient fails there with the numbers in the message.

Each rank takes its half of one fixed random batch, encodes it with tiny linear encoders (same
weights everywhere) and calls `contrastive_loss` on its local embeddings. Compared against a
float64 single-process reference on the whole batch, written independently here:
- the mean of the per-rank losses;
- gradients of the encoders' weights and of logit_scale / logit_bias averaged over ranks, once by
  hand (all_reduce / world) and once by DDP through `accelerator.prepare`;
- the same loss with a gather WITHOUT gradient (open_clip's default trick: gathered copies with
  the local slice swapped back in), which must give a wrong encoder gradient: proof that the
  comparison can fail;
- the same loss through the gather's flat-collective branch (all_gather_into_tensor /
  reduce_scatter_tensor, which NCCL takes; gloo is opted in here): bitwise the same losses and
  gradients as the list / all_reduce branch, and the collectives each branch called;
- "aligned" cases: well-aligned pairs at logit scale 90 (the late-training
  regime where a loss formed as log-sum-exp minus the positive logit is mostly rounding:
  row loss ~1e-5),
  float32-representable inputs, loss and gradients vs the float64 reference.

Usage: dist_loss_check.py OUT_JSON
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from aligned_pairs import aligned_pairs  # tests/helpers, this script's folder

import clip_train.loss.contrastive as loss_module  # where contrastive_loss looks up the gather
import clip_train.loss.gather as gather_module
from clip_train.loss import contrastive_loss

GLOBAL_BATCH = 12
IN_DIM = 10
EMB_DIM = 6
TILE = 5  # local 6 rows -> tiles 5+1, global 12 columns -> 5+5+2
LOGIT_SCALE = 2.0
LOGIT_BIAS = -1.5
CASES = [(kind, impl) for kind in ("clip", "siglip") for impl in ("plain", "tiled")]
ALIGNED_SCALE = 90.0
# The collectives of torch.distributed that the gather may call (both spellings of the flat ones:
# torch 2.14 renamed them).
COLLECTIVES = ("all_gather", "all_reduce", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter_tensor", "reduce_scatter_single")  # fmt: skip


class TinyDualEncoder(torch.nn.Module):
    """Linear image and text encoders returning what an open_clip model returns."""

    def __init__(self, w_img, w_txt, logit_scale, logit_bias=None):
        super().__init__()
        self.img = torch.nn.Parameter(w_img.clone())
        self.txt = torch.nn.Parameter(w_txt.clone())
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))
        # Only siglip uses the bias; DDP rejects a parameter that gets no gradient.
        self.logit_bias = (
            None if logit_bias is None else torch.nn.Parameter(torch.tensor(logit_bias))
        )

    def forward(self, x_img_BI, x_txt_BI):
        return x_img_BI @ self.img.T, x_txt_BI @ self.txt.T, self.logit_scale, self.logit_bias


def reference(kind, x_img, x_txt, w_img, w_txt, logit_scale, logit_bias):
    """float64, one process, the whole G x G matrix."""
    img = F.normalize(x_img @ w_img.T, dim=-1)
    txt = F.normalize(x_txt @ w_txt.T, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T
    n = logits.shape[0]
    if kind == "clip":
        labels = torch.arange(n)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    signs = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * (logits + logit_bias)).sum() / n


def gather_without_grad(x_BD):
    """The wrong way: gathered copies carry no gradient; only the local slice does."""
    parts = [torch.empty_like(x_BD) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_BD.detach().contiguous())
    parts[dist.get_rank()] = x_BD
    return torch.cat(parts, dim=0)


def rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def counting_collectives(counts: Counter):
    """Count the torch.distributed collectives called inside (by name)."""
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in saved.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def flat_collectives_on_gloo():
    """Select the gather's NCCL branch on this gloo group."""
    saved = gather_module.FLAT_COLLECTIVE_BACKENDS
    gather_module.FLAT_COLLECTIVE_BACKENDS = {*saved, "gloo"}
    try:
        yield
    finally:
        gather_module.FLAT_COLLECTIVE_BACKENDS = saved


def aligned_inputs(w_img, w_txt):
    """Raw inputs whose embeddings through the linear encoders are well-aligned pairs at logit
    scale ALIGNED_SCALE: x = e @ pinv(W^T), so that x @ W^T = e. Rounded to float32 values, so
    the float64 reference sees exactly what the float32 run sees."""
    # In 6 dimensions random parts come close to each other: a large margin for a loss ~1e-5.
    e_img, e_txt, _, _ = aligned_pairs(GLOBAL_BATCH, EMB_DIM, ALIGNED_SCALE, seed=3, margin=60.0)
    x_img = e_img @ torch.linalg.pinv(w_img.T)
    x_txt = e_txt @ torch.linalg.pinv(w_txt.T)
    return x_img.float().double(), x_txt.float().double()


def make_runner(world, rank, rows, x_img, x_txt, w_img, w_txt, logit_scale, kind, impl, names):
    """run(gather) -> (per-rank losses, grads averaged over ranks, collectives called inside the
    loss's forward + backward) with float32 copies of the parameters."""

    def run(gather):
        params = [
            w_img.float().requires_grad_(),
            w_txt.float().requires_grad_(),
            torch.tensor(logit_scale, requires_grad=True),
            torch.tensor(LOGIT_BIAS, requires_grad=True),
        ]
        original = loss_module.all_gather_with_grad
        loss_module.all_gather_with_grad = gather
        calls = Counter()
        try:
            with counting_collectives(calls):
                loss = contrastive_loss(
                    x_img[rows].float() @ params[0].T,
                    x_txt[rows].float() @ params[1].T,
                    params[2],
                    params[3] if kind == "siglip" else None,
                    kind=kind,
                    impl=impl,
                    tile_size=TILE,
                )
                loss.backward()
        finally:
            loss_module.all_gather_with_grad = original
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        grads = {}
        for name, p in zip(names, params, strict=False):
            g = p.grad.clone()
            dist.all_reduce(g)  # what DDP / Accelerate do: average over processes
            grads[name] = g / world
        return [float(x) for x in losses], grads, dict(calls)

    return run


def reference_grads(kind, x_img, x_txt, w_img, w_txt, logit_scale, names):
    ref_params = [
        w_img.clone().requires_grad_(),
        w_txt.clone().requires_grad_(),
        torch.tensor(logit_scale, dtype=torch.float64, requires_grad=True),
        torch.tensor(LOGIT_BIAS, dtype=torch.float64, requires_grad=True),
    ]
    ref = reference(kind, x_img, x_txt, *ref_params)
    ref.backward()
    return ref.item(), {n: p.grad for n, p in zip(names, ref_params, strict=False)}


def main(out_path):
    accelerator = Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    local = GLOBAL_BATCH // world
    rows = slice(rank * local, (rank + 1) * local)

    gen = torch.Generator().manual_seed(0)
    x_img = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    x_txt = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    w_img = torch.randn(EMB_DIM, IN_DIM, generator=gen, dtype=torch.float64)
    w_txt = torch.randn(EMB_DIM, IN_DIM, generator=gen, dtype=torch.float64)

    results = {"world_size": world, "backend": dist.get_backend(), "cases": {}, "aligned": {}}
    for kind, impl in CASES:
        names = ["w_img", "w_txt", "logit_scale"] + (["logit_bias"] if kind == "siglip" else [])
        ref_loss, ref_grads = reference_grads(kind, x_img, x_txt, w_img, w_txt, LOGIT_SCALE, names)
        run = make_runner(world, rank, rows, x_img, x_txt, w_img, w_txt, LOGIT_SCALE, kind, impl,
                          names)  # fmt: skip

        losses, grads, calls = run(loss_module.all_gather_with_grad)
        case = {
            "rank_losses": losses,
            "ref_loss": ref_loss,
            "loss_rel_err": abs(sum(losses) / world - ref_loss) / abs(ref_loss),
            "grad_rel_err": {n: rel_err(grads[n], ref_grads[n]) for n in names},
            "collectives": calls,
        }

        # The NCCL branch of the gather (flat collectives), run here on gloo.
        with flat_collectives_on_gloo():
            flat_losses, flat_grads, flat_calls = run(loss_module.all_gather_with_grad)
        case["flat_collectives"] = flat_calls
        case["flat_identical"] = flat_losses == losses and all(
            torch.equal(flat_grads[n], grads[n]) for n in names
        )

        nograd_losses, nograd_grads, _ = run(gather_without_grad)
        case["nograd_loss_rel_err"] = abs(sum(nograd_losses) / world - ref_loss) / abs(ref_loss)
        case["nograd_grad_rel_err"] = {n: rel_err(nograd_grads[n], ref_grads[n]) for n in names}

        # DDP through Accelerate: the real averaging path of train.py.
        model = accelerator.prepare(
            TinyDualEncoder(
                w_img.float(), w_txt.float(), LOGIT_SCALE, LOGIT_BIAS if kind == "siglip" else None
            )
        )
        img, txt, scale, bias = model(x_img[rows].float(), x_txt[rows].float())
        loss = contrastive_loss(img, txt, scale, bias, kind=kind, impl=impl, tile_size=TILE)
        accelerator.backward(loss)
        inner = accelerator.unwrap_model(model)
        ddp_grads = {
            "w_img": inner.img.grad,
            "w_txt": inner.txt.grad,
            "logit_scale": inner.logit_scale.grad,
            "logit_bias": inner.logit_bias,
        }
        if kind == "siglip":
            ddp_grads["logit_bias"] = inner.logit_bias.grad
        case["ddp_grad_rel_err"] = {n: rel_err(ddp_grads[n], ref_grads[n]) for n in names}
        results["cases"][f"{kind}-{impl}"] = case

    # Late training, 2 processes: the loss of well-aligned pairs and its gradients.
    a_img, a_txt = aligned_inputs(w_img.float().double(), w_txt.float().double())
    a_w_img, a_w_txt = w_img.float().double(), w_txt.float().double()
    # Just below the scale, a float32 value (the reference sees the same number).
    a_scale = float(torch.tensor(math.log(ALIGNED_SCALE) - 1e-3))
    for impl in ("plain", "tiled"):
        names = ["w_img", "w_txt", "logit_scale"]
        ref_loss, ref_grads = reference_grads("clip", a_img, a_txt, a_w_img, a_w_txt, a_scale, names)
        run = make_runner(world, rank, rows, a_img, a_txt, a_w_img, a_w_txt, a_scale, "clip", impl,
                          names)  # fmt: skip
        losses, grads, _ = run(loss_module.all_gather_with_grad)
        results["aligned"][f"clip-{impl}"] = {
            "ref_loss": ref_loss,
            "loss_rel_err": abs(sum(losses) / world - ref_loss) / abs(ref_loss),
            "grad_rel_err": {
                n: rel_err(grads[n], ref_grads[n]) if n != "logit_scale"
                else float((grads[n].double() - ref_grads[n]).abs() / ref_grads[n].abs())
                for n in names
            },
        }  # fmt: skip

    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    accelerator.wait_for_everyone()
    # Release the DDP wrappers before the process group goes: a reducer outliving its group can
    # abort the interpreter at exit under load ("terminate called without an active exception").
    del model
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
