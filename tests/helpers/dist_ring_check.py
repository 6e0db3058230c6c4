"""Multi-process check of the ring loss (`impl="ring"`), launched by tests/test_ring_loss.py with
`accelerate launch --num_processes N` (N = 2 and 4, gloo on the CPU). One launch per process
count, many measurements; prints `RESULT {json}` (rank 0) and the test asserts on the numbers.

Each process takes LOCAL rows of one fixed global batch of LOCAL * N pairs; TILE does not divide
LOCAL, so every process's columns travel in uneven chunks (3 + 3 + 1) and rows are tiled alike.
Measured, for CLIP and SigLIP:
- "exact": loss (mean over processes) and every gradient -- embeddings (this process's rows,
  times N: the gradient of the mean), logit scale, SigLIP bias (averaged over processes) --
  against a float64 full-batch reference written here, at random embeddings (logit scales 14
  and ~100) and at well-aligned pairs at logit scale ~100 (row loss ~1e-5); and against
  `impl="tiled"` (the gathered loss) on the same batch, per process;
- "locked": the image embeddings without gradient (a locked tower): the text gradient alone;
- "queue": CLIP with K queued keys (extra columns, the same on every process);
- "grad_cache": `train_step` with chunks (the two-pass gradient cache) under DDP with a toy
  model, temperature and SigLIP bias learnable, vs the float64 full-batch gradient;
- "refused": ring with hardness weighting raises a one-line ValueError.

Usage: dist_ring_check.py
"""

from __future__ import annotations

import copy
import functools
import json
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from aligned_pairs import aligned_pairs, siglip_bias  # tests/helpers, this script's folder
from toy import ToyClip, toy_batch

from clip_train.grad_cache import train_step
from clip_train.loss import contrastive_loss
from clip_train.model import DualEncoder

LOCAL = 7
TILE = 3  # chunks and row tiles of 3 + 3 + 1
EMB_DIM = 16
QUEUE = 5
SCALE_100 = float(torch.tensor(math.log(100.0) - 1e-3))  # just below the clamp, float32 value
REGIMES = {"random14": math.log(1 / 0.07), "random100": SCALE_100, "aligned100": SCALE_100}


def reference(kind, img, txt, log_scale, bias, queue_img=None, queue_txt=None):
    """float64, one process, the whole G x (G + K) matrices, textbook formulas."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scale = log_scale.exp().clamp(max=100.0)
    n = img.shape[0]
    if kind == "clip":
        cols_txt = txt if queue_txt is None else torch.cat([txt, F.normalize(queue_txt, dim=-1)])
        cols_img = img if queue_img is None else torch.cat([img, F.normalize(queue_img, dim=-1)])
        labels = torch.arange(n)
        return (F.cross_entropy(scale * img @ cols_txt.T, labels)
                + F.cross_entropy(scale * txt @ cols_img.T, labels)) / 2  # fmt: skip
    signs = 2 * torch.eye(n, dtype=img.dtype) - 1
    return -F.logsigmoid(signs * (scale * img @ txt.T + bias)).sum() / n


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def inputs(regime: str, kind: str, g: int):
    """float64 raw embeddings holding float32 values, the log scale and the SigLIP bias."""
    log_scale = torch.tensor(REGIMES[regime], dtype=torch.float64)
    if regime == "aligned100":
        margin = 18.0 if kind == "clip" else 40.0  # row loss ~1e-5 (see tests/test_loss.py)
        img, txt, _, _ = aligned_pairs(g, EMB_DIM, 100.0, seed=5, margin=margin)
        bias = siglip_bias(img, txt, 100.0)
    else:
        gen = torch.Generator().manual_seed(len(regime))
        img = torch.randn(g, EMB_DIM, generator=gen, dtype=torch.float64) * 3
        txt = (0.3 * img + torch.randn(g, EMB_DIM, generator=gen, dtype=torch.float64) * 3)
        img, txt, bias = img.float().double(), txt.float().double(), -2.0
    return img, txt, log_scale, torch.tensor(bias, dtype=torch.float64)


class Run:
    """One loss evaluation on this process's rows, with what every process computed gathered."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank
        self.rows = slice(rank * LOCAL, (rank + 1) * LOCAL)

    def __call__(self, kind, impl, img, txt, log_scale, bias, *, need_img=True, **extra):
        leaves = [img[self.rows].float().requires_grad_(need_img),
                  txt[self.rows].float().requires_grad_(),
                  log_scale.float().requires_grad_(), bias.float().requires_grad_()]  # fmt: skip
        extra = {k: v.float() for k, v in extra.items()}
        loss = contrastive_loss(*leaves[:3], leaves[3] if kind == "siglip" else None, kind=kind,
                                impl=impl, tile_size=TILE, **extra)  # fmt: skip
        wanted = [t for t in leaves if t.requires_grad]
        grads = dict(zip([id(t) for t in wanted], torch.autograd.grad(loss, wanted, allow_unused=True),
                         strict=True))  # fmt: skip
        out = {"rank_loss": loss.detach(), "loss": self.mean(loss.detach())}
        for name, t in zip(("img", "txt", "logit_scale", "logit_bias"), leaves, strict=True):
            g = grads.get(id(t))
            if g is None:
                continue
            if t.dim():  # this process's rows: the gradient of the mean is theirs / world
                parts = [torch.empty_like(g) for _ in range(self.world)]
                dist.all_gather(parts, g.contiguous())
                out[name] = torch.cat(parts) / self.world
                out[f"rank_{name}"] = g
            else:
                out[name] = self.mean(g)
        return out

    def mean(self, x):
        x = x.clone()
        dist.all_reduce(x)
        return x / self.world


def compare(got: dict, want_loss, want_grads: dict) -> dict:
    errors = {"ref_loss": float(want_loss),
              "loss": float((got["loss"].double() - want_loss).abs() / want_loss.abs())}  # fmt: skip
    for name, want in want_grads.items():
        errors[name] = rel_err(got[name], want)
    return errors


def reference_grads(kind, img, txt, log_scale, bias, names, **extra):
    leaves = {n: t.detach().clone().requires_grad_(n in names)
              for n, t in zip(("img", "txt", "logit_scale", "logit_bias"), (img, txt, log_scale, bias), strict=True)}  # fmt: skip
    loss = reference(kind, *leaves.values(), **extra)
    wanted = [leaves[n] for n in names]
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, wanted, allow_unused=True), strict=True))


def siglip_toy(logit_bias: float) -> ToyClip:
    toy = ToyClip(p=0.0)
    toy.logit_bias = torch.nn.Parameter(torch.tensor(logit_bias))
    return toy


def grad_cache_case(acc, kind: str, world: int, rank: int) -> dict:
    """train_step with 3 chunks of the local batch (chunk 3 of 7), DDP, impl=ring, against the
    float64 full-batch gradient of every parameter (temperature and SigLIP bias included)."""
    torch.manual_seed(0)
    reference_model = DualEncoder(siglip_toy(-1.0) if kind == "siglip" else ToyClip(p=0.0))
    model = acc.prepare(copy.deepcopy(reference_model))
    images, texts = toy_batch(LOCAL * world, seed=2)
    ref64 = copy.deepcopy(reference_model).double()
    out = ref64(images.double(), texts)
    reference(kind, out["image"], out["text"], out["logit_scale"], out.get("logit_bias")).backward()
    want = {n: p.grad for n, p in ref64.named_parameters()}
    loss_fn = functools.partial(contrastive_loss, kind=kind, impl="ring", tile_size=TILE)
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    train_step(model, images[mine], texts[mine], loss_fn=loss_fn, chunk_size=3, accelerator=acc)
    got = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
    errs = {n: rel_err(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    case = {"max_rel_err": errs[worst], "worst": worst, "logit_scale": errs["clip.logit_scale"]}
    if kind == "siglip":
        case["logit_bias"] = errs["clip.logit_bias"]
    del model
    return case


def main() -> None:
    acc = Accelerator(cpu=True)
    world, rank = acc.num_processes, acc.process_index
    g = LOCAL * world
    run = Run(world, rank)
    results = {"world_size": world, "backend": dist.get_backend(), "exact": {}, "vs_tiled": {}}

    for regime in REGIMES:
        for kind in ("clip", "siglip"):
            img, txt, log_scale, bias = inputs(regime, kind, g)
            names = ["img", "txt", "logit_scale"] + (["logit_bias"] if kind == "siglip" else [])
            want_loss, want_grads = reference_grads(kind, img, txt, log_scale, bias, names)
            ring = run(kind, "ring", img, txt, log_scale, bias)
            tiled = run(kind, "tiled", img, txt, log_scale, bias)
            results["exact"][f"{kind}-{regime}"] = compare(ring, want_loss, want_grads)
            results["exact"][f"{kind}-{regime}-tiled"] = compare(tiled, want_loss, want_grads)
            # Per process: the ring's local loss and gradients are the gathered loss's.
            keys = ["rank_loss", "rank_img", "rank_txt", "logit_scale"] + (["logit_bias"] if kind == "siglip" else [])
            errs = {k: rel_err(ring[k], tiled[k]) for k in keys}
            every = [None] * world
            dist.all_gather_object(every, max(errs.values()))
            results["vs_tiled"][f"{kind}-{regime}"] = {**errs, "max_over_ranks": max(every)}

    # A locked image tower: only the texts (and the temperature) get gradients.
    img, txt, log_scale, bias = inputs("random14", "clip", g)
    names = ["txt", "logit_scale"]
    want_loss, want_grads = reference_grads("clip", img, txt, log_scale, bias, names)
    got = run("clip", "ring", img, txt, log_scale, bias, need_img=False)
    results["locked"] = {**compare(got, want_loss, want_grads), "img_has_grad": "img" in got}

    # Queued keys: extra columns, the same on every process.
    gen = torch.Generator().manual_seed(9)
    queue = {k: torch.randn(QUEUE, EMB_DIM, generator=gen, dtype=torch.float64).float().double()
             for k in ("queue_img", "queue_txt")}  # fmt: skip
    names = ["img", "txt", "logit_scale"]
    want_loss, want_grads = reference_grads("clip", img, txt, log_scale, bias, names, **queue)
    kd = {"queue_img_KD": queue["queue_img"], "queue_txt_KD": queue["queue_txt"]}
    got = run("clip", "ring", img, txt, log_scale, bias, **kd)
    tiled = run("clip", "tiled", img, txt, log_scale, bias, **kd)
    results["queue"] = {**compare(got, want_loss, want_grads),
                        "vs_tiled": max(rel_err(got[k], tiled[k]) for k in ("rank_loss", "rank_img", "rank_txt"))}  # fmt: skip

    results["grad_cache"] = {kind: grad_cache_case(acc, kind, world, rank) for kind in ("clip", "siglip")}

    try:
        contrastive_loss(img[:LOCAL].float(), txt[:LOCAL].float(), 2.0, impl="ring", hardness_beta=0.5)
        results["refused"] = None
    except ValueError as err:
        results["refused"] = str(err)

    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    acc.wait_for_everyone()
    acc.free_memory()
    acc.end_training()


if __name__ == "__main__":
    main()
