"""Negatives beyond the batch (queue, momentum encoders) and the debiased / hardness-weighted
objectives: against float64 references written from the papers (tests/helpers/
negatives_reference.py), reductions to the plain loss, the ring buffer, the EMA, gradient-cache
composability, config checks, 2 processes (one launch) and exact resume through the CLI."""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from aligned_pairs import aligned_pairs
from conftest import launch_result
from negatives_reference import debiased_hard_loss, queue_infonce
from test_train import TINY, read_metrics, run_cli
from toy import ToyClip, toy_batch

from clip_train.config import ConfigError, LossConfig, load_config
from clip_train.grad_cache import chunk_slices, train_step
from clip_train.loss import contrastive_loss, infonce_mi_lower_bound
from clip_train.loss.contrastive import _clip_plain, _clip_reweighted
from clip_train.loss.tiled import _TiledLogSumExp
from clip_train.model import DualEncoder, resolve_model_name
from clip_train.negatives import (
    KeyQueue,
    MomentumEncoder,
    build_negatives,
    check_resume_matches,
    embed_dim,
)

TOL = 1e-5  # float32 implementation vs float64 reference, relative to the largest entry
SCALES = {"scale14": math.log(14.0), "scale100": math.log(100.0) - 1e-3}
# (tau+, beta): debiased only, hardness only, both, both strong
OBJECTIVES = [(0.1, 0.0), (0.0, 0.5), (0.1, 1.0), (0.3, 2.0)]


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def tolerance(logit_scale: float, beta: float = 0.0) -> float:
    """TOL at CLIP's initial scale 1/0.07, growing with the largest logit scale (1 + beta) * s:
    float32 logits carry an absolute rounding error of about that scale times 6e-8, and the loss
    and its gradients are differences of such logits (measured worst cases: 4e-6 at s = 14, 1e-5
    at s = 100, 4.5e-5 at s = 100 with beta = 2 and tau+ = 0.3, near the debiasing clamp)."""
    return TOL * max(1.0, (1.0 + beta) * math.exp(logit_scale) / 14.0)


def grad_err(name: str, got, want) -> float:
    """rel_err, except for the logit scale's gradient: a difference of O(1) terms that can be
    small, while float32 logits at scale 100 carry ~1e-5 absolute error: relative to max(1, |w|)."""
    if name != "logit_scale":
        return rel_err(got, want)
    return float((got.double() - want.double()).abs() / max(1.0, float(want.abs())))


def inputs(b=7, k=5, d=16, seed=0, logit_scale=SCALES["scale14"]):
    """Weakly correlated pairs (some rows clamp under debiasing, some do not) and K queued keys."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=g, dtype=torch.float64)
    txt = 0.4 * img + torch.randn(b, d, generator=g, dtype=torch.float64)
    queue_img = torch.randn(k, d, generator=g, dtype=torch.float64)
    queue_txt = torch.randn(k, d, generator=g, dtype=torch.float64)
    scale = torch.tensor(logit_scale, dtype=torch.float64)
    # Values that float32 holds exactly: the comparison measures the maths, not the rounding of
    # the inputs (which scale 100 alone would amplify to ~1e-5).
    return tuple(t.float().double() for t in (img, txt, scale, queue_img, queue_txt))


def grads_of(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)


# ------------------------------------------------------------------------------------------------
# The loss options against float64 references


@pytest.mark.parametrize("impl,tile", [("plain", 0), ("tiled", 3), ("tiled", 64)])
@pytest.mark.parametrize("k", [0, 5, 20])
@pytest.mark.parametrize("scale_name", SCALES)
def test_queue_matches_float64_reference(impl, tile, k, scale_name):
    img, txt, scale, q_img, q_txt = inputs(k=k, logit_scale=SCALES[scale_name])
    want, want_grads = grads_of(lambda i, t, s: queue_infonce(i, t, s, q_img, q_txt), [img, txt, scale])
    q_img32, q_txt32 = q_img.float().requires_grad_(), q_txt.float().requires_grad_()
    leaves = [img.float().requires_grad_(), txt.float().requires_grad_(), scale.float().requires_grad_()]
    got = contrastive_loss(*leaves, impl=impl, tile_size=tile or 4096, queue_img_KD=q_img32,
                           queue_txt_KD=q_txt32)
    got_grads = torch.autograd.grad(got, [*leaves, q_img32, q_txt32], allow_unused=True)
    tol = tolerance(SCALES[scale_name])
    assert rel_err(got, want) < tol
    for name, g, w in zip(("img", "txt", "logit_scale"), got_grads, want_grads, strict=False):
        assert grad_err(name, g, w) < tol, name
    assert got_grads[3] is None and got_grads[4] is None  # queued keys are constants
    if k:  # the queue really enters the loss, so the comparison can fail
        assert rel_err(contrastive_loss(*leaves, impl=impl), want) > 1e-3


@pytest.mark.parametrize("tau_plus,beta", OBJECTIVES)
@pytest.mark.parametrize("impl", ["plain", "tiled"])
@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("scale_name", SCALES)
def test_debiased_and_hard_match_float64_reference(tau_plus, beta, impl, k, scale_name):
    img, txt, scale, q_img, q_txt = inputs(k=k, seed=k + 1, logit_scale=SCALES[scale_name])
    queue = (q_img, q_txt) if k else (None, None)
    want, want_grads = grads_of(lambda i, t, s: debiased_hard_loss(i, t, s, *queue, tau_plus, beta)[0],
                                [img, txt, scale])
    got, got_grads = grads_of(
        lambda i, t, s: contrastive_loss(
            i, t, s, impl=impl, tile_size=3, debias_tau_plus=tau_plus, hardness_beta=beta,
            queue_img_KD=None if not k else q_img.float(), queue_txt_KD=None if not k else q_txt.float()),
        [img.float(), txt.float(), scale.float()])
    assert got.dtype == torch.float32
    tol = tolerance(SCALES[scale_name], beta)
    assert rel_err(got, want) < tol
    for name, g, w in zip(("img", "txt", "logit_scale"), got_grads, want_grads, strict=True):
        assert grad_err(name, g, w) < tol, name


def test_reference_cases_exercise_both_sides_of_the_clamp():
    """The debiasing clamp binds on some rows of the parametrised cases and not on others, so the
    comparisons above check both branches."""
    clamped = unclamped = 0
    for tau_plus, beta in OBJECTIVES:
        if tau_plus == 0:
            continue
        for k in (0, 5):
            for scale in SCALES.values():
                img, txt, s, q_img, q_txt = inputs(k=k, seed=k + 1, logit_scale=scale)
                queue = (q_img, q_txt) if k else (None, None)
                _, n = debiased_hard_loss(img, txt, s, *queue, tau_plus, beta)
                clamped, unclamped = clamped + n, unclamped + 2 * len(img) - n
    assert clamped > 0 and unclamped > 0, (clamped, unclamped)


def test_hardness_and_debiasing_change_the_loss():
    img, txt, scale, q_img, q_txt = inputs()
    plain = contrastive_loss(img.float(), txt.float(), scale.float())
    for tau_plus, beta in OBJECTIVES:
        other = contrastive_loss(img.float(), txt.float(), scale.float(), debias_tau_plus=tau_plus,
                                 hardness_beta=beta)
        assert abs(float(other) - float(plain)) > 1e-3, (tau_plus, beta)


# ------------------------------------------------------------------------------------------------
# Reductions to the plain loss


def test_options_off_are_the_plain_loss_bitwise():
    img, txt, scale, q_img, _ = inputs(b=9)
    args = (img.float(), txt.float(), scale.float())
    for impl in ("plain", "tiled"):
        plain = contrastive_loss(*args, impl=impl, tile_size=4)
        off = contrastive_loss(*args, impl=impl, tile_size=4, debias_tau_plus=0.0, hardness_beta=0.0)
        empty = contrastive_loss(*args, impl=impl, tile_size=4, queue_img_KD=q_img[:0].float(),
                                 queue_txt_KD=q_img[:0].float())
        assert torch.equal(plain, off) and torch.equal(plain, empty)


@pytest.mark.parametrize("impl", ["plain", "tiled"])
@pytest.mark.parametrize("k", [0, 5])
def test_reweighted_path_at_zero_is_infonce(impl, k):
    """The general debiased / hardness code path itself, at tau+ = 0 and beta = 0, gives CLIP's
    InfoNCE loss and gradients (the public function never takes it then)."""
    img, txt, scale, q_img, q_txt = inputs(b=11, k=k, seed=3)
    leaves = [F.normalize(t.float(), dim=-1).requires_grad_() for t in (img, txt)]
    s = scale.float().exp().requires_grad_()
    img_cols = torch.cat([leaves[0], F.normalize(q_img.float(), dim=-1)])
    txt_cols = torch.cat([leaves[1], F.normalize(q_txt.float(), dim=-1)])
    general = _clip_reweighted(*leaves, img_cols, txt_cols, s, 0, tau_plus=0.0, beta=0.0, impl=impl,
                               tile_size=4)
    plain = _clip_plain(*leaves, img_cols, txt_cols, s, 0)
    assert rel_err(general, plain) < 1e-6
    for a, b in zip(torch.autograd.grad(general, [*leaves, s]), torch.autograd.grad(plain, [*leaves, s]),
                    strict=True):
        assert rel_err(a, b) < 1e-5


def test_tiny_tau_and_beta_approach_the_plain_loss():
    img, txt, scale, q_img, q_txt = inputs(b=10, seed=4)
    args = (img.float(), txt.float(), scale.float())
    queue = {"queue_img_KD": q_img.float(), "queue_txt_KD": q_txt.float()}
    plain = contrastive_loss(*args, **queue)
    for impl in ("plain", "tiled"):
        near = contrastive_loss(*args, **queue, impl=impl, tile_size=3, debias_tau_plus=1e-7,
                                hardness_beta=1e-7)
        assert rel_err(near, plain) < 1e-5


def test_tiled_negatives_only_logsumexp_with_row_offset():
    """The tiled kernel leaves out column i + offset of row i (a process's rows start at
    rank * B) and subtracts the row's shift, forward and backward (the shift's gradient
    included), against a masked float64 logsumexp."""
    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(13, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(9.0, dtype=torch.float64)
    shift = torch.randn(4, generator=g, dtype=torch.float64) * 5
    weights = torch.randn(4, generator=g, dtype=torch.float64)
    offset = 6

    def reference(q, k, scale, shift):
        logits = scale * q @ k.T - shift[:, None]
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[torch.arange(4), torch.arange(4) + offset] = True
        return (torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1) * weights).sum()

    want, want_grads = grads_of(reference, [q, k, scale, shift])
    for tile in (1, 3, 5, 16):
        got, got_grads = grads_of(
            lambda a, b, s, sh, tile=tile: (
                _TiledLogSumExp.apply(a, b, s, sh, tile, offset) * weights.float()
            ).sum(),
            [q.float(), k.float(), scale.float(), shift.float()],
        )
        assert rel_err(got, want) < TOL, tile
        for g_, w in zip(got_grads, want_grads, strict=True):
            assert rel_err(g_, w) < TOL, tile


# Late training: well-aligned pairs at logit scales 50-100 (row loss ~1e-4..1e-6), where a loss
# formed as log-sum-exp minus the positive logit (numbers of ~100) is mostly rounding.
ALIGNED_SCALES = [50.0, 90.0, 100.0]
ALIGNED_LOSS_TOL = 2e-5  # relative error of the loss (measured <= 6e-6; was up to 1.0 tiled)


def aligned_inputs(scale: float, k: int, margin: float = 22.0):
    img, txt, q_img, q_txt = aligned_pairs(32, 32, scale, k=k, seed=int(scale), margin=margin)
    # Just below the scale: at float32(log 100) the clamp binds and the scale has no gradient.
    log_scale = torch.tensor(float(torch.tensor(math.log(scale) - 1e-3)), dtype=torch.float64)
    return img, txt, log_scale, q_img, q_txt


def check_aligned(got_fn, want_fn, leaves, scale: float, beta: float = 0.0) -> dict:
    want, want_grads = grads_of(want_fn, leaves)
    got, got_grads = grads_of(got_fn, [t.float() for t in leaves])
    def scalar_err(g, w):
        return float((g.double() - w).abs() / w.abs())

    errors = {"ref_loss": float(want), "loss": scalar_err(got, want)}
    for name, g, w in zip(("img", "txt", "logit_scale"), got_grads, want_grads, strict=True):
        errors[name] = rel_err(g, w) if name != "logit_scale" else scalar_err(g, w)
    assert errors["ref_loss"] < 3e-3, errors  # the regime this is about
    assert errors["loss"] < ALIGNED_LOSS_TOL, errors
    for name in ("img", "txt", "logit_scale"):
        assert errors[name] < tolerance(math.log(scale), beta), (name, errors)
    return errors


@pytest.mark.parametrize("impl", ["plain", "tiled"])
@pytest.mark.parametrize("scale", ALIGNED_SCALES)
def test_queue_well_aligned_matches_float64_reference(impl, scale):
    """Queued negatives (32 in-batch rows + 16 queued keys, tiles of 5) in the late-training
    regime: loss and gradients (embeddings, logit scale) vs the float64 reference."""
    img, txt, log_scale, q_img, q_txt = aligned_inputs(scale, k=16)
    check_aligned(
        lambda i, t, s: contrastive_loss(i, t, s, impl=impl, tile_size=5,
                                         queue_img_KD=q_img.float(), queue_txt_KD=q_txt.float()),
        lambda i, t, s: queue_infonce(i, t, s, q_img, q_txt),
        [img, txt, log_scale], scale)  # fmt: skip


@pytest.mark.parametrize("tau_plus,beta,k", [(0.0, 1.0, 0), (1e-8, 0.5, 16)])
@pytest.mark.parametrize("impl", ["plain", "tiled"])
@pytest.mark.parametrize("scale", ALIGNED_SCALES)
def test_reweighted_well_aligned_matches_float64_reference(tau_plus, beta, k, impl, scale):
    """The hardness-weighted (beta = 1) and debiased + hardness-weighted (with a queue) objectives
    in the late-training regime. tau+ is tiny there on purpose: at a realistic 0.1 the debiasing
    clamp binds on every row of well-aligned pairs, and the loss, ~N e^-2s, is below float32's
    range (the clamp's both sides are covered by test_debiased_and_hard_match_float64_reference)."""
    img, txt, log_scale, q_img, q_txt = aligned_inputs(scale, k=k)
    queue = (q_img, q_txt) if k else (None, None)
    queue32 = (q_img.float(), q_txt.float()) if k else (None, None)
    check_aligned(
        lambda i, t, s: contrastive_loss(i, t, s, impl=impl, tile_size=5, debias_tau_plus=tau_plus,
                                         hardness_beta=beta, queue_img_KD=queue32[0],
                                         queue_txt_KD=queue32[1]),
        lambda i, t, s: debiased_hard_loss(i, t, s, *queue, tau_plus, beta)[0],
        [img, txt, log_scale], scale, beta)  # fmt: skip


def test_bad_options():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="debias_tau_plus"):
        contrastive_loss(x, x, 0.0, debias_tau_plus=1.0)
    with pytest.raises(ValueError, match="hardness_beta"):
        contrastive_loss(x, x, 0.0, hardness_beta=-0.5)
    with pytest.raises(ValueError, match="kind='clip'"):
        contrastive_loss(x, x, 0.0, kind="siglip", queue_img_KD=x, queue_txt_KD=x)
    with pytest.raises(ValueError, match="go together"):
        contrastive_loss(x, x, 0.0, queue_img_KD=x)
    with pytest.raises(ValueError, match="queued keys"):
        contrastive_loss(x, x, 0.0, queue_img_KD=x[:, :3], queue_txt_KD=x[:, :3])
    with pytest.raises(ValueError, match="at least one negative"):
        contrastive_loss(x[:1], x[:1], 0.0, debias_tau_plus=0.1)


def test_mi_lower_bound():
    assert infonce_mi_lower_bound(1.5, 32 + 1024) == pytest.approx(math.log(1056) - 1.5)
    # a perfect critic (loss 0) reaches log N, the most any N candidates can certify
    assert infonce_mi_lower_bound(0.0, 16) == pytest.approx(math.log(16))


# ------------------------------------------------------------------------------------------------
# The queue


def test_ring_buffer_wraps_like_one_key_at_a_time():
    """Batches of uneven sizes (one larger than the queue): the state equals pushing each key into
    slot (index mod K), the textbook ring buffer."""
    size, dim = 10, 3
    queue = KeyQueue(size, dim)
    slots = [None] * size
    pushed = 0
    for n in (4, 4, 4, 13, 3, 10, 1):
        img = torch.arange(pushed, pushed + n, dtype=torch.float32)[:, None].expand(n, dim)
        queue.push(img, -img)
        for j in range(pushed, pushed + n):
            slots[j % size] = j
        pushed += n
        assert queue.ptr == pushed % size
        assert queue.filled == min(pushed, size)
        img_keys, txt_keys = queue.keys()
        want = torch.tensor([float(s) for s in slots if s is not None])
        assert img_keys.shape == (queue.filled, dim)
        assert torch.equal(img_keys[:, 0], want) and torch.equal(txt_keys[:, 0], -want)


def test_enqueue_normalises_and_fills_in_order():
    queue = KeyQueue(6, 4)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 4, generator=g) * 5, torch.randn(4, 4, generator=g)
    queue.enqueue(img, txt)
    img_keys, txt_keys = queue.keys()
    torch.testing.assert_close(img_keys, F.normalize(img, dim=-1))
    torch.testing.assert_close(txt_keys, F.normalize(txt, dim=-1))
    queue.enqueue(img.bfloat16(), txt.bfloat16())  # bf16 keys (autocast) are stored as float32
    assert queue.filled == 6 and queue.ptr == 2 and queue.keys()[0].dtype == torch.float32


def test_queue_state_round_trip_is_exact(tmp_path):
    queue = KeyQueue(7, 5)
    queue.push(*(F.normalize(torch.randn(9, 5), dim=-1) for _ in range(2)))
    path = tmp_path / "queue.pkl"
    torch.save(queue.state_dict(), path)  # what accelerate's save_state does
    fresh = KeyQueue(7, 5)
    fresh.load_state_dict(torch.load(path, weights_only=False))
    assert (fresh.ptr, fresh.filled) == (queue.ptr, queue.filled) == (2, 7)
    for a, b in zip(fresh.keys(), queue.keys(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="loss.queue_size"):
        KeyQueue(8, 5).load_state_dict(queue.state_dict())


# ------------------------------------------------------------------------------------------------
# The momentum encoder


def test_momentum_update_is_the_ema_formula():
    torch.manual_seed(0)
    online = ToyClip(p=0.0)
    encoder = MomentumEncoder(online, 0.9)
    before = {n: p.detach().double().clone() for n, p in encoder.model.named_parameters()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    encoder.update(online)
    for n, p in encoder.model.named_parameters():
        want = 0.9 * before[n] + 0.1 * dict(online.named_parameters())[n].detach().double()
        assert rel_err(p, want) < 1e-6, n
        assert not p.requires_grad
    # the copy is independent: training the online model does not move it
    assert not torch.equal(encoder.model.visual[1].weight, online.visual[1].weight)


def test_momentum_update_with_foreach_equals_the_per_parameter_loop():
    """`_foreach_lerp_` (one kernel per dtype/device) against the former loop of lerp_: bitwise."""
    torch.manual_seed(0)
    online = ToyClip(p=0.0)
    encoder = MomentumEncoder(online, 0.995)
    loop = copy.deepcopy(encoder.model)
    for _ in range(3):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
            for mine, theirs in zip(loop.parameters(), online.parameters(), strict=True):
                mine.lerp_(theirs, 1.0 - 0.995)
        encoder.update(online)
    for (n, got), want in zip(encoder.model.named_parameters(), loop.parameters(), strict=True):
        assert torch.equal(got, want), n
        assert not torch.equal(got, dict(online.named_parameters())[n])  # it really moved slowly


def test_momentum_keys_are_deterministic_chunked_and_leave_the_rng_alone():
    torch.manual_seed(0)
    online = ToyClip(p=0.5)  # dropout: the online towers are random in train mode
    encoder = MomentumEncoder(online, 0.99)
    images, texts = toy_batch(7, seed=2)
    rng = torch.get_rng_state()
    img_a, txt_a = encoder.encode(images, texts)
    img_b, txt_b = encoder.encode(images, texts, chunk_size=3)
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: no dropout draws
    torch.testing.assert_close(img_a, img_b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(txt_a, txt_b, rtol=1e-6, atol=1e-7)
    assert online.training and not encoder.model.training
    online.eval()
    with torch.no_grad():
        assert torch.allclose(online.encode_image(images), img_a)  # same weights at the start


def test_momentum_state_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    online = ToyClip(p=0.0)
    encoder = MomentumEncoder(online, 0.5)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(1.7)
    encoder.update(online)
    torch.save(encoder.state_dict(), tmp_path / "ema.pkl")
    fresh = MomentumEncoder(ToyClip(p=0.0), 0.5)
    fresh.load_state_dict(torch.load(tmp_path / "ema.pkl", weights_only=False))
    for (n, a), b in zip(fresh.model.state_dict().items(), encoder.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_build_negatives_follows_the_config():
    name = resolve_model_name("configs/models/tiny-vit.json")
    assert embed_dim(name) == 64
    clip = ToyClip(p=0.0)
    assert build_negatives(LossConfig(), clip, name, "cpu") == (None, None)
    queue, encoder = build_negatives(LossConfig(queue_size=12), clip, name, "cpu")
    assert queue.img_KD.shape == (12, 64) and encoder is None
    # A model open_clip's registry does not know (hf-hub:...): the dim comes from the built model.
    import open_clip

    built = open_clip.create_model(name)
    assert embed_dim("hf-hub:org/not-in-the-registry", built) == built.visual.output_dim == 64
    with pytest.raises(ConfigError, match="cannot read the embedding dim"):
        embed_dim("hf-hub:org/not-in-the-registry")
    queue, encoder = build_negatives(LossConfig(queue_size=12, momentum=0.995), clip, name, "cpu")
    assert encoder.momentum == 0.995 and encoder.model is not clip


def test_resume_needs_matching_queue_settings(tmp_path):
    for i in range(2):
        (tmp_path / f"custom_checkpoint_{i}.pkl").write_bytes(b"")
    check_resume_matches(tmp_path, registered=2)
    with pytest.raises(ConfigError, match="loss.queue_size"):
        check_resume_matches(tmp_path, registered=3)


def test_config_checks():
    cfg = LossConfig()
    assert (cfg.queue_size, cfg.momentum, cfg.debias_tau_plus, cfg.hardness_beta) == (0, 0.0, 0.0, 0.0)
    for bad, key in [({"queue_size": -1}, "loss.queue_size"), ({"queue_size": 8, "momentum": 1.0}, "loss.momentum"),
                     ({"momentum": 0.99}, "loss.momentum"), ({"debias_tau_plus": 1.0}, "loss.debias_tau_plus"),
                     ({"debias_tau_plus": -0.1}, "loss.debias_tau_plus"),
                     ({"hardness_beta": -1.0}, "loss.hardness_beta"),
                     ({"kind": "siglip", "queue_size": 8}, "loss.queue_size"),
                     ({"kind": "siglip", "hardness_beta": 0.5}, "loss.hardness_beta")]:
        with pytest.raises(ConfigError, match=key):
            LossConfig(**bad)
    cfg = load_config(None, ["loss.queue_size=1024", "loss.momentum=0.995", "loss.debias_tau_plus=0.1",
                             "loss.hardness_beta=0.5"]).loss
    assert (cfg.queue_size, cfg.momentum, cfg.debias_tau_plus, cfg.hardness_beta) == (1024, 0.995, 0.1, 0.5)


# ------------------------------------------------------------------------------------------------
# Gradient caching


def plain_accelerator():
    return types.SimpleNamespace(autocast=contextlib.nullcontext, backward=lambda loss: loss.backward(),
                                 no_sync=lambda model: contextlib.nullcontext(), scaler=None)


def model_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tau_plus,beta,impl", [(0.0, 0.0, "plain"), (0.1, 0.5, "tiled"), (0.2, 0.0, "plain")])
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_step_with_queue_equals_full_batch(tau_plus, beta, impl, chunk):
    """Dropout on: the reference encodes the same chunks in the same RNG order with graphs kept."""
    g = torch.Generator().manual_seed(7)
    q_img, q_txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    loss_fn = lambda i, t, s, b: contrastive_loss(  # noqa: E731
        i, t, s, b, impl=impl, tile_size=4, queue_img_KD=q_img, queue_txt_KD=q_txt,
        debias_tau_plus=tau_plus, hardness_beta=beta)
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.3))
    images, texts = toy_batch(8, seed=8)
    torch.manual_seed(123)
    imgs, txts = [], []
    for sl in chunk_slices(8, chunk):
        imgs.append(model.clip.encode_image(images[sl]))
        txts.append(model.clip.encode_text(texts[sl]))
    want_loss = loss_fn(torch.cat(imgs), torch.cat(txts), model.clip.logit_scale, None)
    want_loss.backward()
    want = model_grads(model)
    model.zero_grad()
    torch.manual_seed(123)
    out = train_step(model, images, texts, loss_fn=loss_fn, chunk_size=chunk, accelerator=plain_accelerator())
    assert torch.allclose(out.loss, want_loss.detach(), rtol=1e-6)
    got = model_grads(model)
    assert got.keys() == want.keys() and "clip.logit_scale" in want
    for n in want:
        assert rel_err(got[n], want[n]) < TOL, n


def test_training_with_queue_and_momentum_chunked_equals_unchunked():
    """A few steps of the trainer's order (loss with the queue, optimizer step, EMA update, keys of
    the batch from the EMA encoder in chunks, enqueue): same weights, EMA and queue."""
    batches = [toy_batch(8, seed=s) for s in range(5)]

    def run(chunk):
        torch.manual_seed(0)
        model = DualEncoder(ToyClip(p=0.0))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        queue, encoder = KeyQueue(11, 8), MomentumEncoder(model.clip, 0.8)
        for images, texts in batches:
            q_img, q_txt = queue.keys()
            loss_fn = lambda i, t, s, b, q_img=q_img, q_txt=q_txt: contrastive_loss(  # noqa: E731
                i, t, s, b, queue_img_KD=q_img, queue_txt_KD=q_txt, debias_tau_plus=0.1, hardness_beta=0.5)
            train_step(model, images, texts, loss_fn=loss_fn, chunk_size=chunk, accelerator=plain_accelerator())
            opt.step()
            opt.zero_grad()
            encoder.update(model.clip)
            queue.enqueue(*encoder.encode(images, texts, chunk_size=chunk))
        return model, queue, encoder

    (m1, q1, e1), (m2, q2, e2) = run(None), run(3)
    assert q1.filled == 11 and q1.ptr == 40 % 11
    for a, b in [*zip(m1.parameters(), m2.parameters(), strict=True),
                 *zip(e1.model.parameters(), e2.model.parameters(), strict=True), *zip(q1.keys(), q2.keys(), strict=True)]:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(e1.model.visual[1].weight, m1.clip.visual[1].weight)  # EMA lags


# ------------------------------------------------------------------------------------------------
# Multi-process and end to end


@pytest.mark.slow
def test_two_processes_losses_queue_and_ema():
    results = launch_result(["tests/helpers/dist_negatives_check.py"])
    assert results["world_size"] == 2
    assert set(results["loss"]) == {f"{o}-{i}" for o in ("queue", "debias", "hard", "both") for i in ("plain", "tiled")}
    for name, case in results["loss"].items():
        assert case["rank_losses"][0] != case["rank_losses"][1], name
        assert case["loss_rel_err"] < TOL, (name, case)
        assert case["grad_rel_err"] < TOL, (name, case)
    for mode in ("momentum", "plain_queue"):
        run = results["train"][mode]
        assert run["identical_on_ranks"], run  # bitwise: queue (keys, ptr, filled), EMA, model
        assert run["queue_filled"] == 12 and run["queue_ptr"] == (4 * 8) % 12
        assert run["max_rel_err_vs_single_process"] < 1e-5, run


def cli_args(shards: str, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, f"data.train={shards}", "train.local_batch_size=8", "train.chunk_size=4",
            f"train.output_dir={out}", *extra]


def saved(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Queue, EMA and model tensors of a checkpoint, by name."""
    from safetensors.torch import load_file

    queue = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)
    ema = torch.load(checkpoint / "custom_checkpoint_2.pkl", weights_only=False)["model"]
    return {**{f"queue.{k}": torch.as_tensor(v) for k, v in queue.items()},
            **{f"ema.{k}": v for k, v in ema.items()},
            **{f"model.{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}}


@pytest.mark.slow
def test_resume_restores_queue_and_momentum_encoder_exactly(tmp_path, color_shards):
    """A 4-step run with checkpoints at 2 and 4, and a second run resumed from the step-2
    checkpoint: at step 4 the queue (wrapped: K=12, global batch 8), the EMA weights and the model
    are bit-identical. Its metrics log the candidates and the InfoNCE bound."""
    common = ["train.steps=4", "train.checkpoint_every_steps=2", "train.keep_checkpoints=3",
              "loss.queue_size=12", "loss.momentum=0.9"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_cli(cli_args(color_shards, straight, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stale keys" not in proc.stderr
    metrics = [m for m in read_metrics(straight) if "loss" in m]
    assert [m["health/candidates"] for m in metrics] == [8, 16, 20, 20]
    for m in metrics:
        assert m["health/mi_lower_bound"] == pytest.approx(math.log(m["health/candidates"]) - m["loss"])
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    proc = run_cli(cli_args(color_shards, resumed, *common, "train.resume=latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = saved(straight / "checkpoints" / "step_00000004"), saved(resumed / "checkpoints" / "step_00000004")
    assert got.keys() == want.keys()
    assert int(got["queue.filled"]) == 12 and int(got["queue.ptr"]) == 32 % 12
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the state at step 2 differs from step 4, so a resume that lost it could not match
    early = saved(straight / "checkpoints" / "step_00000002")
    assert not torch.equal(early["queue.img_KD"], want["queue.img_KD"])
    assert not torch.equal(early["ema.visual.conv1.weight"], want["ema.visual.conv1.weight"])
    # a checkpoint with a queue does not resume into a run without one: one clear line
    proc = run_cli(cli_args(color_shards, resumed, "train.steps=6", "train.resume=latest"))
    assert proc.returncode == 2 and "loss.queue_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_plain_queue_with_debiased_hard_objective_trains(tmp_path, color_shards):
    out = tmp_path / "plain_queue"
    proc = run_cli(cli_args(color_shards, out, "train.steps=3", "loss.queue_size=12", "loss.debias_tau_plus=0.1",
                            "loss.hardness_beta=0.5", "loss.impl=tiled", "loss.tile_size=5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stale keys drift" in proc.stderr
    metrics = [m for m in read_metrics(out) if "loss" in m]
    assert [m["health/candidates"] for m in metrics] == [8, 16, 20]
    assert all(math.isfinite(m["loss"]) and "health/mi_lower_bound" not in m for m in metrics)
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000003").glob("custom_checkpoint_*")) == [
        "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"]
