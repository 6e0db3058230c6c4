"""Fast checks of the benchmark harness (the benchmarks themselves are never run by the suite):
both trainers' command lines are accepted by the trainers' own parsers and say the same thing,
and the A/B summary takes medians of per-round ratios."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import harness as h  # noqa: E402
import train_throughput  # noqa: E402


def _args_after_entry(cmd: list[str], trainer: str) -> list[str]:
    return cmd[cmd.index(trainer) + 1 :]


def test_both_trainers_accept_the_same_setting(tmp_path):
    from open_clip_train.params import parse_args

    from clip_train.config import load_config

    model, data = "configs/models/tiny-vit.json", "shards/train-{000000..000003}.tar"
    same = dict(nproc=2, global_batch=64, steps=30, chunk=8, lr=2e-3, weight_decay=0.1,
                warmup_steps=3, workers=1)
    ours = h.RunSpec("clip_train", model, data, **same)
    theirs = h.RunSpec("open_clip", model, data, **same)

    cmd = h.launch_command(ours, tmp_path)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in cmd
    cfg = load_config(None, _args_after_entry(cmd, "clip_train")[1:])  # after the `train` command
    assert (cfg.train.local_batch_size, cfg.train.chunk_size, cfg.train.steps) == (32, 8, 30)
    assert cfg.train.precision == "no" and cfg.train.log_every_steps == 10
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (2e-3, 0.1, 3)
    assert (cfg.optim.beta2, cfg.optim.eps, cfg.data.workers) == (0.98, 1e-6, 1)

    oc = parse_args(_args_after_entry(h.launch_command(theirs, tmp_path), "open_clip"))
    # Micro-batch 8 x accum-freq 4 = 32 per process; the sample count fixes the number of steps.
    assert (oc.batch_size, oc.accum_freq, oc.train_num_samples) == (8, 4, 30 * 64)
    assert (oc.lr, oc.wd, oc.warmup, oc.beta2, oc.eps, oc.workers) == (2e-3, 0.1, 3, 0.98, 1e-6, 1)
    assert oc.precision == "fp32" and oc.device == "cpu" and oc.dataset_resampled
    assert oc.local_loss and oc.gather_with_grad and oc.log_every_n_steps == 10


def _result(samples_per_s: float, cpu: float) -> h.RunResult:
    spec = {"global_batch": 64, "chunk": None}
    return h.RunResult(
        spec=spec,
        step_s=[],
        cpu_s_per_step=0.0,
        samples_per_s=samples_per_s,
        samples_per_cpu_s=cpu,
        peak_rss_gib=[1.0, 1.5],
    )


def test_summary_uses_per_round_ratios_and_markdown():
    runs = {
        (2, "clip_train"): [_result(100, 10), _result(300, 30), _result(90, 9)],
        (2, "open_clip"): [_result(50, 10), _result(200, 20), _result(100, 10)],
    }
    rows = {r["variant"]: r for r in train_throughput.summarize(runs)}
    # Per-round ratios 2.0, 1.5, 0.9 -> median 1.5 (the ratio of medians would be 100/100 = 1.0).
    assert rows["clip_train"]["ratio_vs_open_clip"] == 1.5
    assert rows["clip_train"]["peak_rss_gib"] == 1.5  # the largest process
    table = train_throughput.table(list(rows.values()), cuda=False).splitlines()
    assert table[1] == "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert "| 2 | clip_train | 64 | 100 | 1.50x |" in table[2]


def test_quality_pairs_seeds_and_checks_the_harder_prompts(tmp_path):
    import quality

    rows = [{"trainer": t, "seed": s, "zeroshot/top1": v} for t, s, v in [
        ("clip_train", 0, 0.930), ("clip_train", 1, 0.939), ("clip_train", 2, 0.955),
        ("open_clip", 0, 0.947), ("open_clip", 1, 0.950), ("open_clip", 2, 0.955), ("open_clip", 3, 0.9)]]
    p = quality.paired_summary(rows, "zeroshot/top1")
    assert p["seeds"] == [0, 1, 2]  # seed 3 has no pair
    assert p["diffs"] == [pytest.approx(-0.017), pytest.approx(-0.011), pytest.approx(0.0)]
    assert p["mean"] == pytest.approx(-0.009333, abs=1e-6) and p["sd"] == pytest.approx(0.008622, abs=1e-6)
    assert p["ci95"][0] == pytest.approx(-0.009333 - 4.303 * 0.008622 / 3**0.5, abs=1e-5)
    assert p["wins_or_ties"] == 1
    (tmp_path / "templates.txt").write_text("x\n")
    novel = Path(quality.write_novel_templates({"templates": str(tmp_path / "templates.txt")}))
    assert novel.read_text().splitlines() == quality.NOVEL_TEMPLATES
    assert quality.parse_args(["--seeds", "0,1,2,3,4", "--override", "optim.no_decay=open_clip"]).override \
        == ["optim.no_decay=open_clip"]
    spec = h.RunSpec("clip_train", "m.json", "d.tar", nproc=1, global_batch=8, steps=2,
                     overrides=("optim.no_decay=open_clip",))
    assert h.launch_command(spec, tmp_path)[-1] == "optim.no_decay=open_clip"
