"""The ring loss (`loss.impl=ring`): exact against a float64 full-batch reference and against the
gathered `tiled` loss. Fast tests run W simulated processes as threads of this one
(tests/helpers/thread_ring.py, the kernels unchanged); the slow ones launch real gloo processes
(2 and 4, one launch each, tests/helpers/dist_ring_check.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from aligned_pairs import aligned_pairs, siglip_bias
from conftest import REPO, launch_result
from test_loss import TOL, precision_tol
from thread_ring import run_ring

from clip_train.config import ConfigError, LossConfig
from clip_train.loss import contrastive_loss
from clip_train.loss.contrastive import _clamped_scale, _clip_ring, _clip_tiled, _siglip_ring

SCALE_100 = float(torch.tensor(math.log(100.0) - 1e-3))  # just below the clamp (float32 value)


def reference(kind, img, txt, log_scale, bias):
    """float64, one process, the whole G x G matrix, textbook formulas."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = log_scale.exp().clamp(max=100.0) * img @ txt.T
    n = logits.shape[0]
    if kind == "clip":
        labels = torch.arange(n)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return -F.logsigmoid((2 * torch.eye(n, dtype=img.dtype) - 1) * (logits + bias)).sum() / n


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def ring_in_threads(kind, world, img64, txt64, log_scale64, bias64, tile):
    """Every simulated process's loss over its rows and its gradients, combined as the training
    sees them: the mean loss, each process's embedding rows' gradient / world (the gradient of
    the mean), the scale / bias gradients averaged. Also the largest message, in rows."""
    local = img64.shape[0] // world

    def one(rank, ring):
        rows = slice(rank * local, (rank + 1) * local)
        leaves = [img64[rows].float().requires_grad_(), txt64[rows].float().requires_grad_(),
                  log_scale64.float().requires_grad_(), bias64.float().requires_grad_()]  # fmt: skip
        scale = _clamped_scale(leaves[2], 100.0)
        if kind == "clip":
            loss = _clip_ring(leaves[0], leaves[1], scale, tile, ring)
            leaves.pop()
        else:
            loss = _siglip_ring(leaves[0], leaves[1], scale, leaves[3], tile, ring)
        grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), grads, max(ring.rows_sent, default=0), ring.messages

    results = run_ring(world, one)
    loss = sum(r[0] for r in results) / world
    grads = [torch.cat([r[1][n] for r in results]) / world for n in (0, 1)]
    grads += [sum(r[1][n] for r in results) / world for n in range(2, len(results[0][1]))]
    return loss, grads, max(r[2] for r in results), results[0][3]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("world,local,tile", [(3, 7, 3), (5, 4, 4), (2, 5, 16)])
@pytest.mark.parametrize("regime", ["random", "aligned100"])
def test_ring_in_threads_matches_float64_reference(kind, world, local, tile, regime):
    """Loss and every gradient (embeddings, logit scale, SigLIP bias) of W simulated processes
    vs the float64 full batch: uneven chunks (7 rows in tiles of 3), one chunk per process
    (tile >= local), several process counts; no message longer than a tile."""
    g = world * local
    if regime == "random":
        gen = torch.Generator().manual_seed(g)
        img = torch.randn(g, 16, generator=gen, dtype=torch.float64) * 3
        txt = 0.3 * img + torch.randn(g, 16, generator=gen, dtype=torch.float64) * 3
        img, txt, log_scale, bias = img.float().double(), txt.float().double(), math.log(1 / 0.07), -2.0
        tols = [TOL] * 4
    else:
        margin = 18.0 if kind == "clip" else 40.0  # row loss ~1e-3..1e-5
        img, txt, _, _ = aligned_pairs(g, 16, 100.0, seed=g, margin=margin)
        log_scale, bias = SCALE_100, siglip_bias(img, txt, 100.0)
        # The loss within TOL; the gradients carry the float32 logits' absolute error ~scale *
        # 1e-7, as plain's and tiled's do (tests/test_loss.py; measured on these inputs: up to
        # 1.4e-5 for both, 2.4e-5 ring).
        tols = [precision_tol(100.0)] * 4
    log_scale = torch.tensor(log_scale, dtype=torch.float64)
    bias = torch.tensor(bias, dtype=torch.float64)

    leaves = [t.clone().requires_grad_() for t in (img, txt, log_scale, bias)]
    if kind == "clip":
        leaves.pop()
    want = reference(kind, *leaves[:3], leaves[3] if kind == "siglip" else bias)
    want_grads = torch.autograd.grad(want, leaves)

    got, got_grads, longest, messages = ring_in_threads(kind, world, img, txt, log_scale, bias, tile)
    assert float(abs(got.double() - want.detach()) / want.detach()) < TOL, (float(got), float(want))
    for name, g_got, g_want, tol in zip(("img", "txt", "logit_scale", "logit_bias"), got_grads, want_grads, tols,
                                        strict=False):  # fmt: skip
        assert rel_err(g_got, g_want) < tol, (name, rel_err(g_got, g_want))
    assert longest == min(tile, local)
    chunks = math.ceil(local / tile)
    # Forward: each chunk makes W - 1 hops; backward: the columns again and their gradient.
    assert messages == 3 * chunks * (world - 1)


def test_ring_equals_tiled_in_threads():
    """The same numbers as the gathered tiled loss, process by process (loss, gradients)."""
    world, local, tile = 4, 6, 4
    img, txt, _, _ = aligned_pairs(world * local, 16, 100.0, seed=1, margin=14.0)
    img, txt = img.float(), txt.float()
    img_GD, txt_GD = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scale = torch.tensor(50.0)

    def one(rank, ring, impl):
        rows = slice(rank * local, (rank + 1) * local)
        s = scale.clone().requires_grad_()
        if impl == "ring":  # from the raw embeddings
            loss = _clip_ring(img[rows], txt[rows], s, tile, ring)
        else:
            loss = _clip_tiled(img_GD[rows], txt_GD[rows], img_GD, txt_GD, s, tile, rank * local)
        return loss.detach(), torch.autograd.grad(loss, s)

    ring = run_ring(world, lambda r, ring: one(r, ring, "ring"))
    tiled = [one(r, None, "tiled") for r in range(world)]
    for (l_ring, g_ring), (l_tiled, g_tiled) in zip(ring, tiled, strict=True):
        assert abs(float(l_ring - l_tiled)) <= TOL * abs(float(l_tiled))  # float32 rounding at scale 50
        # The embeddings of a gathered loss get only this process's terms here (the gather's
        # backward adds the rest); the ring's get every process's: the scale only here, the
        # whole gradients in the real-process test.
        assert rel_err(g_ring[0], g_tiled[0]) < 1e-5


def test_ring_saves_only_local_tensors():
    """Autograd keeps nothing larger than this process's rows (B x D) for the ring's backward."""
    world, local, d = 4, 8, 16
    saved = []

    def one(rank, ring):
        img = torch.randn(local, d, requires_grad=True)
        txt = torch.randn(local, d, requires_grad=True)
        scale = torch.tensor(10.0, requires_grad=True)
        hooks = (lambda t: saved.append(t.numel()) or t, lambda t: t)
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            loss = _clip_ring(img, txt, scale, 3, ring)
        loss.backward()
        return img.grad.shape

    assert run_ring(world, one) == [(local, d)] * world
    assert saved and max(saved) <= local * d


def test_one_process_ring_runs_tiled():
    """With one process (or distributed=False) the ring has nothing to pass around: it is the
    tiled loss, bitwise."""
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(9, 8, generator=gen), torch.randn(9, 8, generator=gen)
    for kind in ("clip", "siglip"):
        ring = contrastive_loss(img, txt, 2.0, -1.0, kind=kind, impl="ring", tile_size=4)
        tiled = contrastive_loss(img, txt, 2.0, -1.0, kind=kind, impl="tiled", tile_size=4)
        assert torch.equal(ring, tiled), kind


def test_ring_refusals():
    """The reweighted objectives are not ring kernels: refused in one line, by the loss and by
    the config (naming the key and the fix)."""
    img = torch.randn(4, 8)
    with pytest.raises(ValueError, match="impl='tiled'"):
        contrastive_loss(img, img, 2.0, impl="ring", hardness_beta=0.5)
    with pytest.raises(ConfigError, match=r"^loss\.impl: .*loss\.impl=tiled"):
        LossConfig(impl="ring", debias_tau_plus=0.1)
    assert LossConfig(impl="ring", kind="siglip").impl == "ring"
    with pytest.raises(ConfigError, match="loss.impl"):
        LossConfig(impl="rings")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_ring_processes_match_float64_and_tiled(nproc):
    """Real gloo processes, one launch each (tests/helpers/dist_ring_check.py): see its
    docstring for the cases."""
    res = launch_result(["tests/helpers/dist_ring_check.py"], nproc=nproc, timeout=420)
    assert res["world_size"] == nproc and res["backend"] == "gloo"
    assert len(res["exact"]) == 12 and len(res["vs_tiled"]) == 6
    for name, errs in res["exact"].items():
        aligned = "aligned" in name
        assert errs["loss"] < TOL, (name, errs)
        for key in ("img", "txt", "logit_scale", "logit_bias"):
            if key in errs:  # the float32 logits' floor at scale 100, as for plain and tiled
                assert errs[key] < (precision_tol(100.0) if aligned else TOL), (name, key, errs)
        if aligned:
            assert errs["ref_loss"] < 2e-2, (name, errs)  # the late-training regime
    for name, errs in res["vs_tiled"].items():  # per process: the ring's loss is the gather's
        tol = precision_tol(100.0) if "aligned" in name else TOL
        assert errs["max_over_ranks"] < tol and errs["rank_loss"] < TOL, (name, errs)
    locked = res["locked"]
    assert not locked["img_has_grad"] and max(locked[k] for k in ("loss", "txt", "logit_scale")) < TOL, locked
    queue = res["queue"]
    assert max(queue[k] for k in ("loss", "img", "txt", "logit_scale", "vs_tiled")) < TOL, queue
    for kind, case in res["grad_cache"].items():  # every parameter, temperature and bias included
        assert case["max_rel_err"] < TOL, (kind, case)
    assert res["refused"] and "\n" not in res["refused"]


@pytest.mark.slow
def test_ring_benchmark_smoke(tmp_path):
    """benchmarks/loss_memory.py's simulated ring rows run (it imports the private kernels)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks/loss_memory.py"), "--quick", "--impls", "ring",
           "--ring-sim", "64:64,64:256,128:256", "--ring-real", "", "--ring-ab", "", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["ring_rows"]
    assert [(r["processes"], r["global_batch"], r["local_batch"]) for r in rows] == [
        ("1 (simulated)", 64, 64), ("4 (simulated)", 256, 64), ("2 (simulated)", 256, 128)]  # fmt: skip
    assert all(r["time_s"] > 0 and r["peak_extra_bytes"] >= 0 for r in rows)
    assert result["ring_fit"] is None and result["rows"] == [] and result["ab"] == []
