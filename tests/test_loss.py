"""clip_train.loss against independent references: a float64 full-matrix implementation written
here, open_clip's ClipLoss / SigLipLoss, and (slow) a 2-process gloo run via accelerate launch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from aligned_pairs import aligned_pairs, siglip_bias
from conftest import launch
from open_clip.loss import ClipLoss, SigLipLoss

import clip_train.loss.gather as gather_module
from clip_train.config import ConfigError, LossConfig
from clip_train.loss import (
    all_gather_with_grad,
    contrastive_loss,
    representation_health,
    resolve_impl,
)
from clip_train.loss.contrastive import _clip_plain, _clip_tiled
from clip_train.loss.gather import _device_backend, uses_flat_collectives

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 implementation vs float64 reference, relative to the largest entry


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def reference_loss(kind, img_BD, txt_BD, logit_scale, logit_bias, max_logit_scale=100.0):
    """Single process, float64-capable, the whole B x B matrix, textbook formulas."""
    img = F.normalize(img_BD, dim=-1)
    txt = F.normalize(txt_BD, dim=-1)
    logits_BB = logit_scale.exp().clamp(max=max_logit_scale) * img @ txt.T
    n = logits_BB.shape[0]
    if kind == "clip":
        labels = torch.arange(n)
        return (F.cross_entropy(logits_BB, labels) + F.cross_entropy(logits_BB.T, labels)) / 2
    signs_BB = 2 * torch.eye(n, dtype=logits_BB.dtype) - 1
    return -F.logsigmoid(signs_BB * (logits_BB + logit_bias)).sum() / n


CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


def make_inputs(b, d=32, seed=0, emb_std=3.0, logit_scale=CLIP_INIT_LOGIT_SCALE, logit_bias=-2.0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=gen, dtype=torch.float64) * emb_std
    # Correlated pairs so the positives matter, as in a model that has learnt something.
    txt = 0.3 * img + torch.randn(b, d, generator=gen, dtype=torch.float64) * emb_std
    return (
        img,
        txt,
        torch.tensor(logit_scale, dtype=torch.float64),
        torch.tensor(logit_bias, dtype=torch.float64),
    )


def loss_and_grads(fn, img, txt, scale, bias, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (img, txt, scale, bias)]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), grads


CASES = [(7, 3), (64, 64), (150, 64), (257, 100), (100, 1024)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["plain", "tiled"])
@pytest.mark.parametrize("b,tile", CASES)
@pytest.mark.parametrize(
    "logit_scale", [CLIP_INIT_LOGIT_SCALE, math.log(100.0) - 1e-3], ids=["scale14", "scale100"]
)
def test_matches_float64_reference(kind, impl, b, tile, logit_scale):
    img, txt, scale, bias = make_inputs(b, seed=b, logit_scale=logit_scale)
    want, want_grads = loss_and_grads(
        lambda *a: reference_loss(kind, *a), img, txt, scale, bias, torch.float64
    )
    got, got_grads = loss_and_grads(
        lambda i, t, s, bb: contrastive_loss(i, t, s, bb, kind=kind, impl=impl, tile_size=tile),
        img,
        txt,
        scale,
        bias,
        torch.float32,
    )
    assert got.dtype == torch.float32
    assert rel_err(got, want) < TOL
    names = ["img", "txt", "logit_scale"] + (["logit_bias"] if kind == "siglip" else [])
    for name, g, w in zip(names, got_grads, want_grads, strict=False):
        assert rel_err(g, w) < TOL, name
    if kind == "clip":
        assert got_grads[3] is None  # the bias cancels in the softmax and is not used


# Late training: well-aligned pairs at logit scales 50-100, where the loss per row is ~1e-3..1e-6
# and a loss formed as logsumexp - positive logit (two float32 numbers of ~100) is all rounding.
PRECISION_SCALES = [50.0, 90.0, 100.0]
# margin ~ -log(row loss): loss ~3e-3 ("small") and ~4e-6 ("tiny") for CLIP; SigLIP, whose bias
# sits halfway between positives and negatives, needs larger margins for ~1e-3 and ~1e-5.
MARGINS = {"clip": {"small": 8.0, "tiny": 18.0}, "siglip": {"small": 24.0, "tiny": 40.0}}
# Relative error of the loss: measured <= 6e-6 on every path (was 4e-4 plain, up to 1.6 tiled).
LOSS_TOL = 2e-5


def precision_tol(scale: float, beta: float = 0.0) -> float:
    """Gradients (and the logit scale's / bias's gradient, relative to itself): TOL at CLIP's
    initial scale 14, growing with the largest logit scale (1 + beta) * scale, because the
    float32 normalisation and dot products leave logits with an absolute error ~scale * 1e-7
    that no formulation can remove (measured: <= 3.4e-5 at scale 90 with beta 0.5)."""
    return TOL * max(1.0, (1.0 + beta) * scale / 14.0)


def scalar_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs() / want.detach().abs())


def check_precision(loss_fn, reference_fn, leaves64, scale: float, beta: float = 0.0) -> dict:
    """Run `loss_fn` in float32 and `reference_fn` in float64 on the same leaves (embeddings
    first, then scalars); assert the loss and every gradient are within the stated tolerances.
    Returns the errors, which the assertion messages show."""
    want_leaves = [t.detach().clone().requires_grad_() for t in leaves64]
    want = reference_fn(*want_leaves)
    want_grads = torch.autograd.grad(want, want_leaves, allow_unused=True)
    got_leaves = [t.detach().float().requires_grad_() for t in leaves64]
    got = loss_fn(*got_leaves)
    assert got.dtype == torch.float32
    got_grads = torch.autograd.grad(got, got_leaves, allow_unused=True)
    errors = {"ref_loss": float(want.detach()), "loss": scalar_rel_err(got, want)}
    for n, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        if w is not None:
            errors[n] = rel_err(g, w) if w.dim() else scalar_rel_err(g, w)
    assert errors["loss"] < LOSS_TOL, errors
    for n in range(len(leaves64)):
        if n in errors:
            assert errors[n] < precision_tol(scale, beta), (n, errors)
    return errors


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["plain", "tiled"])
@pytest.mark.parametrize("scale", PRECISION_SCALES)
@pytest.mark.parametrize("regime", ["small", "tiny"])
def test_well_aligned_pairs_match_float64_reference(kind, impl, scale, regime):
    """Loss and gradients (embeddings, logit scale, SigLIP bias) vs the float64 full-matrix
    reference, B = 150 over several tiles of 16."""
    img, txt, _, _ = aligned_pairs(150, 64, scale, seed=int(scale), margin=MARGINS[kind][regime])
    # Just below the scale: at float32(log 100) the clamp binds and the scale has no gradient.
    log_scale = torch.tensor(float(torch.tensor(math.log(scale) - 1e-3)), dtype=torch.float64)
    bias = torch.tensor(siglip_bias(img, txt, scale), dtype=torch.float64)
    errors = check_precision(
        lambda i, t, s, bb: contrastive_loss(i, t, s, bb, kind=kind, impl=impl, tile_size=16),
        lambda i, t, s, bb: reference_loss(kind, i, t, s, bb),
        [img, txt, log_scale, bias],
        scale,
    )
    assert errors["ref_loss"] < {"small": 2e-2, "tiny": 1e-4}[regime], errors  # the regime
    assert (3 in errors) == (kind == "siglip")  # the bias has a gradient for SigLIP only


def test_one_row_without_negatives():
    """A single pair on one process has no negative: loss 0 (log 1) and zero gradients, for
    both implementations (the shifted log-sum-exp of no negatives is -inf)."""
    img, txt, scale, _ = make_inputs(1)
    for impl in ("plain", "tiled"):
        leaves = [t.float().requires_grad_() for t in (img, txt, scale)]
        loss = contrastive_loss(*leaves, impl=impl, tile_size=4)
        assert float(loss.detach()) == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(loss, leaves))


def test_flat_collectives_follow_the_backend(monkeypatch):
    """The gather takes all_gather_into_tensor / reduce_scatter_tensor on NCCL and the list /
    all_reduce branch on gloo (which emulates reduce-scatter with an all_reduce); a group with
    one backend per device type is read for the tensor's device. Both branches run on gloo in
    the 2-process test, with bitwise identical results."""
    assert _device_backend("nccl", "cuda") == "nccl"
    assert _device_backend("cpu:gloo,cuda:nccl", "cuda") == "nccl"
    assert _device_backend("cpu:gloo,cuda:nccl", "cpu") == "gloo"
    assert _device_backend("cpu:gloo", "cuda") == ""
    for backend, device, flat in [("nccl", "cuda", True), ("gloo", "cpu", False),
                                  ("cpu:gloo,cuda:nccl", "cuda", True),
                                  ("cpu:gloo,cuda:nccl", "cpu", False)]:  # fmt: skip
        monkeypatch.setattr(gather_module.dist, "get_backend", lambda backend=backend: backend)
        assert uses_flat_collectives(torch.device(device)) is flat, (backend, device)
    monkeypatch.setattr(gather_module, "FLAT_COLLECTIVE_BACKENDS", {"nccl", "gloo"})
    assert uses_flat_collectives(torch.device("cpu"))  # how the 2-process test selects it


@pytest.mark.parametrize("impl", [_clip_plain, _clip_tiled])
def test_one_process_shortcut_matches_general_path(impl):
    """With one process the loss reuses the image->text block for text->image; the general path
    (what every rank of a multi-process run takes) computes both blocks. Same values, same grads."""
    img, txt, scale, _ = make_inputs(45, seed=9)
    leaves = [F.normalize(img, dim=-1).float().requires_grad_(),
              F.normalize(txt, dim=-1).float().requires_grad_(), scale.float().requires_grad_()]  # fmt: skip
    i, t = leaves[0], leaves[1]
    last = 0 if impl is _clip_plain else 16  # offset for plain, tile size for tiled
    shortcut = impl(i, t, i, t, leaves[2].exp(), last)
    general = impl(i, t, i.clone(), t.clone(), leaves[2].exp(), last)
    assert rel_err(shortcut, general) < 1e-6
    for a, b in zip(torch.autograd.grad(shortcut, leaves), torch.autograd.grad(general, leaves),
                    strict=True):  # fmt: skip
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_single_pair(kind):
    img, txt, scale, bias = make_inputs(1)
    want = reference_loss(kind, img, txt, scale, bias)
    for impl in ("plain", "tiled"):
        got = contrastive_loss(
            img.float(), txt.float(), scale.float(), bias.float(), kind=kind, impl=impl, tile_size=4
        )
        assert abs(float(got) - float(want)) < 1e-6


def test_matches_open_clip_losses():
    img, txt, scale, bias = make_inputs(96, d=64, seed=3)
    leaves = [t.float().requires_grad_() for t in (img, txt, scale, bias)]

    def open_clip_loss(kind, i, t, s, bb):
        i, t = F.normalize(i, dim=-1), F.normalize(t, dim=-1)
        if kind == "clip":
            return ClipLoss()(i, t, s.exp())
        return SigLipLoss()(i, t, s.exp(), bb)

    for kind in ("clip", "siglip"):
        want = open_clip_loss(kind, *leaves)
        want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
        for impl in ("plain", "tiled"):
            got = contrastive_loss(*leaves, kind=kind, impl=impl, tile_size=40)
            got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
            assert rel_err(got, want) < TOL, (kind, impl)
            for g, w in zip(got_grads, want_grads, strict=True):
                if w is None:
                    assert g is None
                else:
                    assert rel_err(g, w) < TOL, (kind, impl)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["plain", "tiled"])
def test_logit_scale_clamp(kind, impl):
    img, txt, _, bias = make_inputs(20)
    kwargs = {"kind": kind, "impl": impl, "tile_size": 8, "max_logit_scale": 50.0}
    above = torch.tensor(math.log(80.0), requires_grad=True)
    # Where a trainer's in-place clamp of the parameter leaves it: float32(log 50), whose exp is
    # a hair above 50.
    at_max = torch.tensor(math.log(50.0), requires_grad=True)
    loss_above = contrastive_loss(img.float(), txt.float(), above, bias.float(), **kwargs)
    loss_at_max = contrastive_loss(img.float(), txt.float(), at_max, bias.float(), **kwargs)
    assert torch.allclose(loss_above, loss_at_max, rtol=1e-6)
    want = reference_loss(kind, img, txt, torch.tensor(math.log(50.0), dtype=torch.float64), bias)
    assert rel_err(loss_above, want) < TOL
    (grad,) = torch.autograd.grad(loss_above, [above])
    assert grad == 0.0
    huge = torch.tensor(200.0, requires_grad=True)  # exp overflows float32: no NaN may leak
    loss_huge = contrastive_loss(img.float(), txt.float(), huge, bias.float(), **kwargs)
    assert torch.allclose(loss_huge, loss_at_max, rtol=1e-6)
    assert torch.autograd.grad(loss_huge, [huge])[0] == 0.0
    # At the bound the gradient still flows, so the scale can come back down.
    (grad_at_max,) = torch.autograd.grad(loss_at_max, [at_max])
    assert grad_at_max != 0.0
    below = torch.tensor(math.log(40.0), requires_grad=True)
    (grad_below,) = torch.autograd.grad(
        contrastive_loss(img.float(), txt.float(), below, bias.float(), **kwargs), [below]
    )
    assert grad_below != 0.0  # the scale does learn below the clamp


def test_autocast_and_low_precision_inputs():
    img, txt, scale, bias = make_inputs(48, seed=5)
    img16, txt16 = img.bfloat16().requires_grad_(), txt.bfloat16().requires_grad_()
    want = reference_loss("clip", img16.double(), txt16.double(), scale, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(img16, txt16, scale.float(), kind="clip", impl="tiled", tile_size=16)
    assert got.dtype == torch.float32  # autocast did not push the maths to bf16
    assert rel_err(got, want) < TOL
    got.backward()
    assert img16.grad.dtype == torch.bfloat16 and torch.isfinite(img16.grad).all()


def test_tiled_never_saves_the_logit_block():
    """Autograd keeps only O(B*D) tensors for the tiled backward; plain keeps a B x B block."""
    b, d = 256, 8
    img, txt, scale, bias = make_inputs(b, d=d)

    def largest_saved(impl):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        leaves = [t.float().requires_grad_() for t in (img, txt, scale, bias)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for kind in ("clip", "siglip"):
                contrastive_loss(*leaves, kind=kind, impl=impl, tile_size=32)
        return max(sizes)

    assert largest_saved("plain") >= b * b
    assert largest_saved("tiled") <= 2 * b * d


def test_auto_switches_at_one_tile():
    assert resolve_impl("auto", 64, 64, tile_size=64) == "plain"
    assert resolve_impl("auto", 65, 65, tile_size=64) == "tiled"
    assert resolve_impl("auto", 4, 1024, tile_size=64) == "plain"  # as many logits as one tile
    assert resolve_impl("plain", 10**6, 10**6, tile_size=64) == "plain"
    with pytest.raises(ValueError):
        resolve_impl("fast", 1, 1, tile_size=64)
    img, txt, scale, bias = make_inputs(70)
    args = (img.float(), txt.float(), scale.float(), bias.float())
    for kind in ("clip", "siglip"):
        auto = contrastive_loss(*args, kind=kind, impl="auto", tile_size=64)
        plain = contrastive_loss(*args, kind=kind, impl="plain")
        assert rel_err(auto, plain) < TOL


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="kind"):
        contrastive_loss(x, x, 0.0, kind="infonce")
    with pytest.raises(ValueError, match="shape"):
        contrastive_loss(x, x[:3], 0.0)
    with pytest.raises(ValueError, match="tile_size"):
        contrastive_loss(x, x, 0.0, tile_size=0)


def test_all_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x


def test_loss_config_feeds_the_loss():
    cfg = LossConfig()
    img, txt, scale, _ = make_inputs(10)
    loss = contrastive_loss(
        img.float(),
        txt.float(),
        scale.float(),
        kind=cfg.kind,
        impl=cfg.impl,
        tile_size=cfg.tile_size,
        max_logit_scale=cfg.max_logit_scale,
    )
    assert torch.isfinite(loss)
    for bad in ({"kind": "infonce"}, {"impl": "fast"}, {"tile_size": 0}, {"max_logit_scale": 0}):
        with pytest.raises(ConfigError):
            LossConfig(**bad)


def test_representation_health():
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    txt = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    x, y = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    want_alignment = sum(float((x[i] - y[i]).pow(2).sum()) for i in range(40)) / 40
    pair_terms = [
        math.exp(-2 * float((x[i] - x[j]).pow(2).sum()))
        for i in range(40)
        for j in range(40)
        if i != j
    ]
    want_uniformity = math.log(sum(pair_terms) / len(pair_terms))
    got = representation_health(img.float(), txt.float() * 7.0)  # scale-free: normalised inside
    assert got["alignment"] == pytest.approx(want_alignment, rel=1e-5)
    assert got["uniformity"] == pytest.approx(want_uniformity, rel=1e-5)
    assert representation_health(img.float(), img.float())["alignment"] == pytest.approx(
        0, abs=1e-6
    )
    assert math.isnan(representation_health(img[:1], txt[:1])["uniformity"])


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    out = tmp_path / "dist_loss.json"
    proc = launch(["tests/helpers/dist_loss_check.py", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert set(result["cases"]) == {"clip-plain", "clip-tiled", "siglip-plain", "siglip-tiled"}
    for name, case in result["cases"].items():
        # Each rank has its own rows: different per-rank losses whose mean is the global loss.
        assert case["rank_losses"][0] != case["rank_losses"][1], name
        assert case["loss_rel_err"] < TOL, name
        for param, err in case["grad_rel_err"].items():
            assert err < TOL, (name, param, "all_reduce / world")
        for param, err in case["ddp_grad_rel_err"].items():
            assert err < TOL, (name, param, "DDP")
        # A gather without gradient computes the same loss but loses the other rank's gradient
        # contributions to the gathered side (texts for siglip, both towers for clip).
        assert case["nograd_loss_rel_err"] < TOL, name
        assert case["nograd_grad_rel_err"]["w_txt"] > 0.05, name
        if name.startswith("clip"):
            assert case["nograd_grad_rel_err"]["w_img"] > 0.05, name
        # The gather's NCCL branch (flat collectives), selected on gloo: bitwise the same, and
        # each branch called its own collectives (one gather forward, one reduction backward).
        assert case["flat_identical"], name
        assert case["collectives"] == {"all_gather": 1, "all_reduce": 1}, name
        assert case["flat_collectives"] in (
            {"all_gather_single": 1, "reduce_scatter_single": 1},  # torch >= 2.14
            {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1},
        ), name
    # Well-aligned pairs at logit scale 90, 2 processes: the late-training regime.
    assert set(result["aligned"]) == {"clip-plain", "clip-tiled"}
    for name, case in result["aligned"].items():
        assert case["ref_loss"] < 1e-4, (name, case)
        assert case["loss_rel_err"] < LOSS_TOL, (name, case)
        for param, err in case["grad_rel_err"].items():
            assert err < precision_tol(90.0), (name, param, case)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """The benchmark still runs (it imports private pieces of loss.py): tiny sizes, no open_clip."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks/loss_memory.py"), "--quick", "--impls",
           "plain,tiled", "--batches", "256", "--per-rank", "64:512", "--out", str(out)]  # fmt: skip
    # A fixed mmap threshold returns freed tensors to the OS at once, so that RSS follows live
    # tensors and a step's peak shows above the baseline even at these tiny sizes (glibc's dynamic
    # threshold can keep the warm-up's blocks in the heap for the step to reuse: a peak of 0).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["global_batch"], r["local_batch"]) for r in rows] == [
        ("plain", 256, 256), ("tiled", 256, 256), ("tiled", 512, 64)]  # fmt: skip
    assert all(r["time_s"] > 0 and r["peak_extra_bytes"] > 0 for r in rows)


@pytest.mark.slow
def test_precision_benchmark_smoke(tmp_path):
    """benchmarks/loss_precision.py runs (public API only) and reports errors within the tests'
    tolerances at one scale, small batch."""
    out = tmp_path / "precision.json"
    cmd = [sys.executable, str(REPO / "benchmarks/loss_precision.py"), "--scales", "90",
           "--batch", "48", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {r["path"] for r in rows} >= {"clip plain", "clip tiled", "queued tiled", "siglip tiled"}
    for r in rows:
        assert r["loss"] < LOSS_TOL, r
        assert max(v for k, v in r.items() if k in ("img", "txt", "logit_scale")) < 2e-4, r
