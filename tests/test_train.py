"""The training job end to end: 1 process under plain python, 2 processes under accelerate launch
(through launch/local.sh), bad input, and the refusal to run without a real process group."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch
from tensorboard_records import tensorboard_scalars
from wandb_records import history

from clip_train.train import LaunchError, check_world_size

TINY = ["model.name=configs/models/tiny-vit.json", "train.local_batch_size=16", "train.chunk_size=8",
        "train.log_every_steps=1", "optim.lr=2e-3", "optim.warmup_steps=2", "optim.weight_decay=0.0",
        "data.workers=1", "data.shuffle_buffer=64"]


def eval_args(tmp_path: Path, shards: str) -> list[str]:
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\nyellow\n")
    (tmp_path / "templates.txt").write_text("a photo of a {} square\n")
    return [f"eval.zeroshot={shards}", f"eval.classnames={tmp_path}/classes.txt",
            f"eval.templates={tmp_path}/templates.txt", f"eval.retrieval={shards}"]


def run_cli(args, timeout=240, env=None):
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "clip_train", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_single_process_training_learns_and_checkpoints(tmp_path, color_shards):
    out = tmp_path / "run"
    proc = run_cli(["train", *TINY, f"data.train={color_shards}", "train.steps=12", "wandb.enabled=true",
                    "tracking.report_to=[tensorboard]", f"train.output_dir={out}", *eval_args(tmp_path, color_shards),
                    # A named validation loss on its own cadence; zero-shot and retrieval at the end only.
                    f"eval.validation.held.data={color_shards}", "eval.validation.held.every_steps=5",
                    "eval.val_batch_size=16"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [m["step"] for m in read_metrics(out) if "val/held/loss" in m] == [5, 10, 12]
    assert [m["step"] for m in read_metrics(out) if "zeroshot/top1" in m] == [12]
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert (out / "checkpoints" / "step_00000012" / "model.safetensors").is_file()
    assert (out / "open_clip_model.pt").is_file()
    results = json.loads((out / "eval.json").read_text())
    assert 0.0 <= results["zeroshot/top1"] <= 1.0 and "retrieval/image_to_text_R@1" in results
    # The shareable folder: open_clip alone loads it (local-dir:) and its own zero-shot classifier
    # scores the held-out shards exactly as the run's evaluation did (the same predictions).
    from model_folder import open_clip_zeroshot_top1
    from safetensors.torch import load_file

    final = torch.load(out / "open_clip_model.pt", weights_only=True)
    folder = load_file(str(out / "model" / "open_clip_model.safetensors"))
    assert folder.keys() == final.keys() and all(torch.equal(folder[k], final[k]) for k in final)
    top1 = open_clip_zeroshot_top1(str(out / "model"), color_shards, ["red", "green", "blue", "yellow"],
                                   ["a photo of a {} square"])
    assert top1 == pytest.approx(results["zeroshot/top1"], abs=1e-12)
    card = (out / "model" / "README.md").read_text()
    assert "library_name: open_clip" in card and "| global batch | 16 (1 process x 16) |" in card
    assert f"| zeroshot/top1 | {results['zeroshot/top1']:.4f} |" in card and "| steps | 12 of 12 |" in card
    # `clip-train export` of the final checkpoint to a folder = the folder written at the end of
    # training (weights, config and the card's final evaluation; only the paths in the card differ).
    proc = run_cli(["export", "--config", str(out / "config.yaml"), "--checkpoint",
                    str(out / "checkpoints" / "step_00000012"), "--output", str(tmp_path / "exported")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = load_file(str(tmp_path / "exported" / "open_clip_model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert (tmp_path / "exported" / "open_clip_config.json").read_text() == \
        (out / "model" / "open_clip_config.json").read_text()
    assert f"| zeroshot/top1 | {results['zeroshot/top1']:.4f} |" in (tmp_path / "exported" / "README.md").read_text()
    # W&B (offline: no account here) received the same metrics, charted against our step.
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    rows = [r for r in history(str(run_file)) if "loss" in r]
    assert [r["train/step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == pytest.approx(losses)
    first = read_metrics(out)[0]
    for key in ("lr", "logit_scale", "temperature", "grad_norm", "samples_per_s", "data_wait_fraction",
                "health/alignment", "health/uniformity", "data/samples_read"):
        assert key in first, key
    # TensorBoard too (wandb.enabled and tracking.report_to add up), against the same step axis.
    tb_loss = tensorboard_scalars(out / "tensorboard", "loss")
    assert list(tb_loss) == list(range(1, 13)) and list(tb_loss.values()) == pytest.approx(losses, rel=1e-6)
    assert tensorboard_scalars(out / "tensorboard", "zeroshot/top1") == {12: pytest.approx(results["zeroshot/top1"])}
    # The end of training drew the report: the picture, and the page with the final numbers.
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    assert f"<td>zeroshot/top1</td><td>{results['zeroshot/top1']:.6g}</td><td>12</td>" in (out / "report.html").read_text()


@pytest.mark.slow
def test_two_processes_through_local_launch_script(tmp_path, color_shards):
    out = tmp_path / "run2"
    env = {**os.environ, "NPROC": "2", "WANDB_MODE": "offline", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "launch/local.sh", "train", *TINY, f"data.train={color_shards}",
                           "train.steps=6", "train.local_batch_size=8", "train.chunk_size=3",
                           f"train.output_dir={out}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The first line says what runs, in words.
    assert ("DDP over 2 CPU processes (full replicas, gradients all-reduced); global batch 16 (2 x 8); fp32; "
            "gradient cache on (chunks of 3 of 8 samples per process); data: fast decode, 1 loader worker per process, "
            f"uint8 batches normalised on the device; 6 steps; outputs in {out}") in proc.stderr
    metrics = read_metrics(out)
    assert len([m for m in metrics if "loss" in m]) == 6
    assert [m for m in metrics if "loss" in m][-1]["samples_seen"] == 6 * 16
    assert (out / "checkpoints" / "step_00000006").is_dir()


@pytest.mark.slow
def test_refuses_lone_processes_under_a_multi_process_launch():
    """accelerate >= 1.13 without ACCELERATE_USE_CPU (or cpu=True) on a CPU machine: 2 lone processes."""
    proc = launch(["tests/helpers/world_size_check.py"], use_cpu=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "NO" in proc.stdout  # the trap is real: accelerate saw no process group
    assert "WORLD_SIZE=2" in proc.stderr and "ACCELERATE_USE_CPU=true" in proc.stderr


def test_check_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    lone = types.SimpleNamespace(num_processes=1, distributed_type="NO")
    with pytest.raises(LaunchError, match="WORLD_SIZE=4 processes but accelerate runs 1"):
        check_world_size(lone)
    check_world_size(types.SimpleNamespace(num_processes=4, distributed_type="MULTI_CPU"))
    monkeypatch.delenv("WORLD_SIZE")
    check_world_size(lone)  # plain `python`: one process


@pytest.mark.parametrize("override, key", [
    ("data.train=/nonexistent/train-{000000..000003}.tar", "data.train"),
    ("model.name=ViT-Q-99", "model.name"),
    ("optim.lr=-3", "optim.lr"),
])
def test_bad_input_is_one_clear_line(tmp_path, color_shards, override, key):
    proc = run_cli(["train", *TINY, f"data.train={color_shards}", override,
                    f"train.output_dir={tmp_path}/bad"], timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clip-train: error:")]
    assert len(errors) == 1 and key in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_malformed_yaml_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1\n")
    proc = run_cli(["train", "--config", str(bad)], timeout=60)
    assert proc.returncode == 2 and "bad.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_broken_data_ends_with_one_clear_line(tmp_path):
    """Every shard is garbage: the bad-data ceiling trips inside a loader worker, and the user
    still gets one line (not the worker's traceback that torch wraps around the error)."""
    for i in range(2):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(bytes(range(256)) * 80)
    proc = run_cli(["train", *TINY, f"data.train={tmp_path}/train-{{000000..000001}}.tar",
                    "data.train_num_samples=100", "train.local_batch_size=8", "train.steps=3",
                    "data.bad_fraction_min_samples=20", f"train.output_dir={tmp_path}/run"], timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clip-train: error:")]
    assert len(errors) == 1 and "data.max_bad_fraction" in errors[0] and "bad_tar" in errors[0], proc.stderr[-2000:]
    assert "Original Traceback" not in proc.stderr


def test_one_line_unwraps_worker_errors():
    from clip_train.__main__ import one_line

    wrapped = ("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nclip_train.data.DataError: 9 of 10 samples were unusable\n')
    assert one_line(wrapped) == "9 of 10 samples were unusable (DataError in DataLoader worker process 1)"
    assert one_line("data.train: missing") == "data.train: missing"


def test_precision_on_the_cpu_fp16_refused_bf16_said(tmp_path, color_shards):
    """fp16 on the CPU: one line, no run (it used to fall back to fp32 with a warning, so a CPU
    run looked like the fp16 run it was not). bf16 runs, and the run's first line says so."""
    from clip_train.config import ConfigError
    from clip_train.runtime import cpu_precision_note
    from clip_train.train import resolve_precision

    assert resolve_precision("auto", cuda=False) == "no"
    assert resolve_precision("no", cuda=False) == "no"
    with pytest.raises(ConfigError, match=r"^train.precision=fp16 needs CUDA GPUs .*train.precision=no"):
        resolve_precision("fp16", cuda=False)
    assert resolve_precision("bf16", cuda=False) == "bf16"
    assert "bf16 on the CPU" in cpu_precision_note("bf16", cuda=False)
    assert cpu_precision_note("bf16", cuda=True) is None and cpu_precision_note("no", cuda=False) is None
    assert resolve_precision("fp16", cuda=True) == "fp16"
    proc = run_cli(["train", *TINY, f"data.train={color_shards}", "train.precision=fp16",
                    f"train.output_dir={tmp_path}/fp16"], timeout=120, env={"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clip-train: error:")]
    assert len(errors) == 1 and "train.precision=fp16 needs CUDA" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "fp16" / "metrics.jsonl").exists()
