"""Exactness under train-time randomness: a run resumed from a checkpoint, and a run with
evaluation during training, give the losses of the uninterrupted run without evaluation, with
patch dropout and attention dropout in both towers (1 process without loader workers, 2
processes with 2 workers each). Nothing outside the training step may draw from training's
random generators: the data and evaluation loaders (whose DataLoader draws a base seed), the
FSDP2 evaluation copy, the trackers."""

import os
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
                          timeout=240, env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2",
                                            "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def differing(got: dict[int, float], want: dict[int, float], steps: range) -> dict[int, tuple[float, float]]:
    """The steps of `steps` whose losses differ by more than 1e-6 relative: {step: (got, want)}."""
    return {s: (got.get(s), want[s]) for s in steps if got.get(s) != pytest.approx(want[s], rel=1e-6, abs=0)}


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
    assert [m["step"] for m in read_metrics(evaluated) if "val/loss" in m] == [2, 4, 6]
    bad = {"resumed": differing(losses(resumed), want, range(4, 7)),
           "evaluated": differing(losses(evaluated), want, range(1, 7))}
    assert bad == {"resumed": {}, "evaluated": {}}


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
    assert differing(losses(resumed), losses(straight), range(4, 7)) == {}


def test_fsdp2_eval_copy_is_the_training_model_without_a_random_draw():
    """EvalCopy (FSDP2's evaluation model) from a model with model.force_image_size and a locked
    text tower: the same outputs and frozen flags, no draw from the global generator, the same
    object at every evaluation (so a frozen text tower's classifiers stay cached), no weights
    held between evaluations."""
    from clip_train.evaluate import ClassifierCache
    from clip_train.model import DualEncoder
    from clip_train.sharding import EvalCopy

    torch.manual_seed(0)
    clip = build_model(ModelConfig(name=str(REPO / "configs/models/tiny-vit.json"), force_image_size=48,
                                   lock_text=True)).model.eval()
    rng = torch.get_rng_state()
    copy = EvalCopy(clip)
    plain = copy.load(DualEncoder(clip), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # open_clip.create_model would initialise weights
    assert plain is not clip
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == \
        {n: p.requires_grad for n, p in clip.named_parameters()}
    images, texts = torch.rand(2, 3, 48, 48), torch.randint(0, 49408, (2, 32))
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), clip.encode_image(images))
        assert torch.equal(plain.encode_text(texts), clip.encode_text(texts))  # the causal mask came along
    cache, builds = ClassifierCache(), []
    for _ in range(2):
        cache.begin(plain)
        cache.get(("classes",), lambda: builds.append(1) or torch.zeros(1))
        copy.release()
        assert all(p.is_meta for p in plain.parameters())
        assert copy.load(DualEncoder(clip), torch.device("cpu")) is plain
    assert len(builds) == 1
