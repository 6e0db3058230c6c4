"""Exactness under train-time randomness: a run resumed from a checkpoint, and a run with
evaluation during training, give the losses of the uninterrupted run without evaluation, with
patch dropout and attention dropout in both towers (1 process without loader workers, 2
processes with 2 workers each). Nothing outside the training step may draw from training's
random generators: the data and evaluation loaders (whose DataLoader draws a base seed), the
FSDP2 evaluation copy, the trackers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch
from test_train import read_metrics

from clip_train.config import ModelConfig
from clip_train.model import build_model

FAULTS = "tests/helpers/train_with_faults.py"  # --attn-dropout: dropout in both towers' attention
MODEL = "tests/helpers/tiny-vit-patch-dropout.json"  # vision patch_dropout 0.5
RANDOM = ["--attn-dropout", "0.2", f"model.name={MODEL}", "train.local_batch_size=8", "train.chunk_size=4",
          "train.log_every_steps=1", "optim.lr=2e-3", "optim.warmup_steps=2", "optim.weight_decay=0.0",
          "data.shuffle_buffer=32", "train.steps=6", "train.checkpoint_every_steps=3"]


def losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out_dir) if "loss" in m}


def train_one_process(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, FAULTS, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={**__import__("os").environ, "WANDB_MODE": "offline",
                                            "OMP_NUM_THREADS": "2", "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), (step, got[step], want[step])


def test_the_model_draws_random_numbers_in_training():
    """The test model is random where it matters: two training-mode forwards differ, eval-mode
    forwards do not (so equal losses below are not equal for want of randomness)."""
    model = build_model(ModelConfig(name=str(REPO / MODEL))).model
    images = torch.rand(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model.encode_image(images), model.encode_image(images))
    model.eval()
    assert torch.equal(model.encode_image(images), model.encode_image(images))


def test_resume_and_evaluation_are_exact_one_process_no_workers(tmp_path, color_shards):
    """Three runs: straight; resumed from the straight run's step-3 checkpoint; with a validation
    loss every 2 steps. Steps 4-6 of the resumed run and every step of the evaluated run equal
    the straight run's."""
    common = [*RANDOM, f"data.train={color_shards}", "data.workers=0"]
    straight, resumed, evaluated = tmp_path / "straight", tmp_path / "resumed", tmp_path / "evaluated"
    train_one_process([*common, f"train.output_dir={straight}"])
    train_one_process([*common, f"train.output_dir={resumed}",
                       f"train.resume={straight}/checkpoints/step_00000003"])
    train_one_process([*common, f"train.output_dir={evaluated}", f"eval.validation={color_shards}",
                       "eval.every_steps=2", "eval.val_batch_size=16", "eval.workers=0"])
    want = losses(straight)
    assert sorted(losses(resumed)) == [4, 5, 6]
    assert_same(losses(resumed), want, range(4, 7))
    assert [m["step"] for m in read_metrics(evaluated) if "val/loss" in m] == [2, 4, 6]
    assert_same(losses(evaluated), want, range(1, 7))


@pytest.mark.slow
def test_resume_with_evaluation_is_exact_two_processes_two_workers(tmp_path, color_shards):
    """2 processes x 2 loader workers: the run resumed from step 3, evaluating every 2 steps,
    has the straight run's (no evaluation) losses at steps 4-6."""
    common = [FAULTS, *RANDOM, f"data.train={color_shards}", "data.workers=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = launch([*common, f"train.output_dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch([*common, f"train.output_dir={resumed}", f"train.resume={straight}/checkpoints/step_00000003",
                   f"eval.validation={color_shards}", "eval.every_steps=2", "eval.val_batch_size=16",
                   "eval.workers=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(resumed) if "val/loss" in m] == [4, 6]
    assert_same(losses(resumed), losses(straight), range(4, 7))
