"""Checks of the benchmarks: both trainers' command lines are accepted by the trainers' own
parsers and say the same thing; the A/B summary takes medians of per-round ratios; every module
the benchmarks import is installed by the set-up and every benchmark command in README.md and
docs/ is accepted; and the GPU check runs end to end in its --cpu-smoke mode (the only benchmark the
suite runs)."""

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


# ------------------------------------------------------------------------------------------------
# Every benchmark runs after `bash launch/setup.sh` (issue 13, defect 6: run_all.py died on a
# missing matplotlib, open_clip_train on a missing pandas).

BENCH = REPO / "benchmarks"
LOCAL_MODULES = {p.stem for p in BENCH.glob("*.py")}


def _imported_modules(path: Path) -> set[str]:
    """Every module a script imports, at the top or inside functions (lazy imports included)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] not in LOCAL_MODULES and n != "__future__"}


def test_every_module_the_benchmarks_import_is_installed():
    import importlib

    setup = (REPO / "launch" / "setup.sh").read_text()
    assert "-e '.[dev,bench]'" in setup  # the set-up the README shows installs the bench extra

    modules = sorted(set().union(*(_imported_modules(p) for p in BENCH.glob("*.py"))))
    assert "matplotlib.pyplot" in modules and "open_clip_train.main" in modules  # the scan works
    missing = []
    for name in modules:
        try:  # importing runs the module's own imports too (open_clip_train.data needs pandas)
            importlib.import_module(name)
        except ImportError as exn:
            missing.append(f"{name}: {exn}")
    assert not missing, ("benchmark imports missing after launch/setup.sh (add them to the extra "
                         f"it installs): {missing}")


def _help_texts() -> dict[str, str]:
    """`python benchmarks/X.py --help` of every script with a command line, in one process."""
    import json
    import subprocess

    scripts = sorted(p.name for p in BENCH.glob("*.py") if "ArgumentParser(" in p.read_text())
    program = (
        "import contextlib, io, json, runpy, sys\n"
        "out = {}\n"
        f"for name in {scripts!r}:\n"
        "    sys.argv = [name, '--help']\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            runpy.run_path(f'benchmarks/{name}', run_name='__main__')\n"
        "        except SystemExit as exit_:\n"
        "            assert exit_.code in (0, None), (name, exit_.code)\n"
        "    out[name] = buf.getvalue()\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_benchmark_commands_in_the_docs_exist_and_take_their_flags():
    import re

    helps = _help_texts()
    assert set(helps) >= {"run_all.py", "train_throughput.py", "gpu_check.py"}
    assert all("usage:" in text for text in helps.values())
    # The front page and every docs/ page (the benchmarks' figures live in docs/performance.md).
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = [(page.name, *c) for page in pages for c in re.findall(
        r"python (benchmarks/\w+\.py)((?: --[\w-]+(?:[ =][\w.,]+)?)*)", page.read_text())]
    assert len(commands) >= 6
    for page, script, flags in commands:
        name = Path(script).name
        assert name in helps, f"{page} runs {script}, which has no --help"
        for flag in re.findall(r"--[\w-]+", flags):
            assert flag in helps[name], f"{page} runs {script} {flag}, which it does not accept"


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    """benchmarks/gpu_check.py --cpu-smoke: the GPU check's own code, on the CPU with a tiny model
    (about 20 s, plus two short trainer launches for part (c))."""
    import json
    import os
    import subprocess

    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    report = json.loads(out.read_text())
    failed = [(r["check"], r["value"]) for r in report["results"] if r["status"] != "ok"]
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    rows = {r["check"]: r for r in report["results"]}
    assert report["cpu_smoke"] and report["flops_per_step"] > 0
    assert "CPU SMOKE RUN" in report["markdown"] and "| part | check |" in proc.stdout
    assert rows["uint8 batch normalised on the device vs float32 transform on the CPU"]["max_abs_diff"] == 0
    gradients = [r for r in report["results"] if r["check"].startswith("train_step")]
    assert len(gradients) == 3 and gradients[0]["rel_grad_diff_chunked"] < 1e-5  # fp32
    losses = [r for r in report["results"] if r["check"].startswith("tiled vs plain")]
    assert len(losses) == 2 and 0.01 < losses[1]["reference_loss"] < 2  # the aligned regime
    speed = [r for r in report["results"] if r["part"] == "b" and "samples_per_s" in r]
    assert [r["chunk"] for r in speed] == [8, 4, 2, None]
    assert speed[-1]["batch_dtype"] == "torch.uint8"  # real shards arrive as uint8
    trainers = [r for r in report["results"] if r["part"] == "c"]
    assert len(trainers) == 2 and "clip_train / open_clip" in trainers[1]["value"]
    assert all(r["samples_per_s"] > 0 for r in speed + trainers)
    assert len(rows) == len(report["results"])  # every check named once


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


def test_data_throughput_stage_clocks_time_every_stage_in_the_worker_and_change_no_batch(tmp_path):
    """The breakdown's clocks time what they say where it happens: in a DataLoader worker forked
    after them, every stage adds time to the shared seconds; the batches are the ones the loader
    gives without clocks; the patched functions are restored after."""
    import data_throughput as dt
    import open_clip
    import torch

    from clip_train.config import DataConfig
    from clip_train.data import build_train_loader, fast, loader, stream

    images = dt.family_images("datacomp-512", 6)
    pattern = dt.write_shards(tmp_path, images, 24, per_shard=12)

    def tokenizer(texts):
        return torch.tensor([[len(t)] for t in texts])

    def first_batch(tokenize):
        cfg = DataConfig(train=pattern, train_num_samples=24, workers=1, resampled=True, shuffle_buffer=8)
        loader = build_train_loader(cfg, transform=open_clip.image_transform(48, is_train=True),
                                    tokenizer=tokenize, local_batch_size=8, seed=0, rank=0, world_size=1)
        return next(iter(loader))[:2]

    def timed_functions():
        return (stream.group_by_keys, fast.random_resized_crop_params, fast._decode_jpeg, fast._resize,
                stream.stack_images, loader.caption_tokenizer)

    originals = timed_functions()
    images_plain, texts_plain = first_batch(tokenizer)
    with dt.stage_clocks() as clocks:
        assert all(timed is not original for timed, original in zip(timed_functions(), originals, strict=True))
        images_timed, texts_timed = first_batch(tokenizer)
        seconds = dict(zip(dt.STAGES, clocks.seconds, strict=True))
    assert torch.equal(images_plain, images_timed) and images_plain.float().std() > 0
    assert torch.equal(texts_plain, texts_timed)
    assert all(s > 0 for s in seconds.values()), seconds
    assert timed_functions() == originals
