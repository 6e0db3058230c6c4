"""The GPU path's set-up and hot loop, on the CPU: precision choice, TF32 switch, DDP and
process-group options, exact on-device step skipping, skip counters, the frozen unused logit bias,
and a real 2-process run instrumented to show no host sync in a step that does not log."""

import json
import math
import os
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import launch_result
from test_train import TINY
from toy import ToyClip

from clip_train.config import ConfigError, load_config
from clip_train.runtime import (
    StepHealth,
    accelerator_kwargs,
    buffers_change_in_training,
    configure_matmul_precision,
    cuda_bf16_native,
    fork_can_hang,
    freeze_unused_logit_bias,
    optimizer_step,
    own_cuda_device,
    resolve_precision,
    settle_before_forks,
)


def fake_cuda(monkeypatch, native: bool):
    """torch.cuda as seen on a 4-GPU node; records which device was set and what was probed."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))

    def is_bf16_supported(including_emulation=True):
        calls.append(("probe", including_emulation))
        return native or including_emulation  # a pre-Ampere GPU emulates bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_probes_the_own_gpu_for_native_bf16(monkeypatch, native, want):
    calls = fake_cuda(monkeypatch, native)
    monkeypatch.setenv("LOCAL_RANK", "1")
    got = resolve_precision("auto", cuda=True, bf16_native=lambda: cuda_bf16_native(own_cuda_device()))
    assert got == want
    # The own device first (never a probe of cuda:0 from rank 1), then no emulated bf16.
    assert calls == [("set_device", torch.device("cuda", 1)), ("probe", False)]


def test_explicit_and_cpu_precisions_do_not_probe(monkeypatch):
    calls = fake_cuda(monkeypatch, native=False)
    assert resolve_precision("auto", cuda=False) == "no"
    assert resolve_precision("bf16", cuda=True) == "bf16"
    assert resolve_precision("fp16", cuda=True) == "fp16"
    assert calls == []


def test_tf32_switch_only_on_cuda():
    before = torch.get_float32_matmul_precision()
    try:
        configure_matmul_precision(tf32=True, cuda=False)
        assert torch.get_float32_matmul_precision() == before
        configure_matmul_precision(tf32=True, cuda=True)
        assert torch.get_float32_matmul_precision() == "high"
        configure_matmul_precision(tf32=False, cuda=True)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_ddp_and_process_group_options():
    ddp, group = accelerator_kwargs(2400)
    assert ddp.to_kwargs() == {"gradient_as_bucket_view": True}  # find_unused_parameters=False is DDP's default
    assert not ddp.find_unused_parameters
    assert group.to_kwargs()["timeout"] == timedelta(seconds=2400)  # reaches init_process_group


def test_ddp_broadcasts_buffers_only_when_training_changes_them():
    import open_clip

    from clip_train.model import resolve_model_name

    vit = open_clip.create_model(resolve_model_name("configs/models/tiny-vit.json"))
    assert len(list(vit.buffers())) > 0 and not buffers_change_in_training(vit)  # the causal mask only
    resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert buffers_change_in_training(resnet)


def test_config_knobs_are_checked():
    cfg = load_config(overrides=["train.tf32=false", "train.stop_check_every_steps=3",
                                 "train.process_group_timeout_s=60"])
    assert (cfg.train.tf32, cfg.train.stop_check_every_steps, cfg.train.process_group_timeout_s) == (False, 3, 60)
    for key in ("train.stop_check_every_steps", "train.process_group_timeout_s"):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[f"{key}=0"])


def snapshot(model, opt):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())})


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_step_changes_nothing(monkeypatch, fused):
    """The skip is exact: parameters, AdamW moments and step counts as before the skipped step;
    the fused optimizer skips on the device, without reading the flag back."""
    torch.manual_seed(0)
    model = ToyClip(p=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    wrapped = types.SimpleNamespace(optimizer=opt, step=opt.step)  # as accelerate's AcceleratedOptimizer
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    for skip in [False, True, False]:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if skip:
            next(model.parameters()).grad.fill_(float("nan"))
        before = snapshot(model, opt)
        optimizer_step(wrapped, torch.tensor(skip), scaler=None)
        if skip:
            assert_same(snapshot(model, opt), before)
        else:
            assert all(not torch.equal(p, before[0][n]) for n, p in model.named_parameters())
    assert {float(s["step"]) for s in opt.state.values()} == {2.0}
    if fused:
        assert reads == []  # (the for-loop AdamW reads its step counts itself anyway)


def test_step_health_counts_on_the_device_and_reads_at_checks():
    health = StepHealth(torch.device("cpu"), skipped_steps=4, in_a_row=0)
    one = types.SimpleNamespace(num_processes=1)
    for step, bad in enumerate([0, 1, 1, 1, 0, 0, 1], start=1):
        health.record(torch.tensor(bool(bad)), step)
    assert health.check(one, stop_requested=False) == (False, 8, 3, 1)  # worst run 3, one bad now
    health.record(torch.tensor(False), 8)
    assert health.check(one, stop_requested=True) == (True, 8, 1, 0)  # the run at the last check
    assert int(health.last_bad_step) == 7


def test_unused_logit_bias_is_frozen_for_the_clip_loss():
    clip = ToyClip(p=0.0)
    assert not freeze_unused_logit_bias(clip, "clip")  # no bias: nothing to do
    clip.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    assert not freeze_unused_logit_bias(clip, "siglip") and clip.logit_bias.requires_grad
    assert freeze_unused_logit_bias(clip, "clip") and not clip.logit_bias.requires_grad
    assert "logit_bias" in clip.state_dict()  # still saved and exported


def bias_model(tmp_path: Path) -> str:
    """tiny-vit with a SigLIP-style logit bias."""
    cfg = json.loads(Path("configs/models/tiny-vit.json").read_text())
    path = tmp_path / "tiny-vit-bias.json"
    path.write_text(json.dumps({**cfg, "init_logit_bias": -10.0}))
    return str(path)


@pytest.mark.slow
def test_two_process_hot_loop_has_no_host_sync_and_trains_a_biased_model(tmp_path, color_shards):
    """2 processes, a model with a logit bias under loss.kind=clip (crashed at step 2 before),
    chunked and unchunked; rank 0's loss is NaN at step 3. Steps 1-5 do not log: they must make
    no host sync and no collective besides the loss's gather (DDP's gradient all-reduce runs in
    C++ and is not counted); step 6 logs, checks and checkpoints."""
    results = {}
    for name, chunk in (("chunked", "train.chunk_size=3"), ("unchunked", "train.chunk_size=null")):
        out = tmp_path / name
        results[name] = launch_result([
            "tests/helpers/hot_loop_check.py", "--nan-step", "3", "--fused", *TINY, f"data.train={color_shards}",
            f"model.name={bias_model(tmp_path)}", "train.steps=6", "train.local_batch_size=6", chunk,
            "train.log_every_steps=100", "train.stop_check_every_steps=100", "data.workers=0",
            f"train.output_dir={out}"])
        res = results[name]
        quiet = [str(s) for s in range(1, 6)]
        assert {s: res["syncs"].get(s) for s in quiet} == dict.fromkeys(quiet), res["syncs"]
        assert {s: res["collectives"].get(s) for s in quiet} == dict.fromkeys(quiet), res["collectives"]
        assert res["collectives"]["6"].get("all_reduce", 0) >= 1  # the check at the logging step
        final = res["saved"]["6"]
        assert final["ranks_identical"] and final["frozen"] == ["clip.logit_bias"]
        assert final["steps"] == [[5.0], [5.0]]  # the NaN step was skipped on both processes
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["skipped_steps"] for m in metrics if "loss" in m] == [1]
    chunked, unchunked = (results[n]["saved"]["6"]["params"] for n in ("chunked", "unchunked"))
    assert chunked["clip.logit_bias"] == [-10.0]
    for n in chunked:
        a, b = torch.tensor(chunked[n]), torch.tensor(unchunked[n])
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6, n
    assert math.isfinite(sum(sum(v) for v in chunked.values()))


def test_forks_wait_for_threads_in_the_interpreter_where_a_fork_can_hang(monkeypatch):
    """CPython gh-112275 (a forked child waits for ever on a lock another thread held): the
    releases it affects, and the hook that lets threads out before a fork, registered once."""
    assert fork_can_hang((3, 11, 7)) and fork_can_hang((3, 11, 0)) and fork_can_hang((3, 10, 13))
    assert not fork_can_hang((3, 11, 8)) and not fork_can_hang((3, 12, 0)) and not fork_can_hang((3, 13, 1))
    hooks = []
    monkeypatch.setattr(os, "register_at_fork", lambda **kwargs: hooks.append(kwargs))
    settle_before_forks.cache_clear()
    try:
        first, again = settle_before_forks(), settle_before_forks()
    finally:
        settle_before_forks.cache_clear()
    assert first == again == fork_can_hang()
    assert [sorted(h) for h in hooks] == ([["before"]] if fork_can_hang() else [])
    if hooks:
        hooks[0]["before"]()  # runs: sleeps, then takes and releases the thread-list lock
