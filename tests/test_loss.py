"""clip_train.loss against independent references: a float64 full-matrix implementation written
here, open_clip's ClipLoss / SigLipLoss, and (slow) a 2-process gloo run via accelerate launch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import launch
from open_clip.loss import ClipLoss, SigLipLoss

from clip_train.config import ConfigError, LossConfig
from clip_train.loss import (
    _clip_plain,
    _clip_tiled,
    all_gather_with_grad,
    contrastive_loss,
    representation_health,
    resolve_impl,
)

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


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """The benchmark still runs (it imports private pieces of loss.py): tiny sizes, no open_clip."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks/loss_memory.py"), "--quick", "--impls",
           "plain,tiled", "--batches", "256", "--per-rank", "64:512", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["global_batch"], r["local_batch"]) for r in rows] == [
        ("plain", 256, 256), ("tiled", 256, 256), ("tiled", 512, 64)]  # fmt: skip
    assert all(r["time_s"] > 0 and r["peak_extra_bytes"] > 0 for r in rows)
