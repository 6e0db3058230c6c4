"""Checkpoints: exact resume after SIGKILL (2 processes), SIGTERM, crash-safe saving, non-finite
steps, and export to plain open_clip."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import REPO, launch
from tensorboard_records import tensorboard_scalars
from test_train import TINY, read_metrics, run_cli

from clip_train.checkpoint import (
    CheckpointError,
    decide_resume,
    export_open_clip,
    list_checkpoints,
    run_id_of,
    save_checkpoint,
    step_of,
    verify_checkpoint,
)
from clip_train.config import ModelConfig
from clip_train.model import build_model
from clip_train.report import read_series

FAULTS = "tests/helpers/train_with_faults.py"


def losses_by_step(out_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m["loss"] for m in read_metrics(out_dir) if "loss" in m}


@pytest.mark.slow
def test_sigkill_then_resume_follows_the_uninterrupted_run(tmp_path, color_shards):
    common = [*TINY, f"data.train={color_shards}", "train.steps=10", "train.local_batch_size=8",
              "train.chunk_size=3", "train.checkpoint_every_steps=4", "data.workers=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = launch(["-m", "clip_train", "train", *common, f"train.output_dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tracking = ["wandb.enabled=true", "tracking.report_to=[tensorboard]"]
    proc = launch([FAULTS, "--kill-at-step", "7", *common, f"train.output_dir={killed}", *tracking])
    assert proc.returncode != 0  # SIGKILL of rank 0 ends the job
    assert [p.name for p in list_checkpoints(str(killed))] == ["step_00000004"]
    assert max(losses_by_step(killed)) == 6  # it got past the checkpoint before dying
    proc = launch(["-m", "clip_train", "train", *common, f"train.output_dir={killed}", "train.resume=latest",
                   *tracking])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The resumed run continues the same W&B run (offline here: one directory per start, same id).
    run_dirs = sorted(killed.glob("wandb/offline-run-*"))
    assert len(run_dirs) == 2 and len({d.name.rsplit("-", 1)[1] for d in run_dirs}) == 1, run_dirs
    want, got = losses_by_step(straight), losses_by_step(killed)
    assert sorted(got) == list(range(1, 11))
    for step in range(5, 11):  # steps redone after the resume from step 4
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    assert got[10] != pytest.approx(got[5], rel=1e-3)  # the losses move, so equality means something
    # TensorBoard: the same event directory, steps 1-10 once each, 5-6 from the resumed run.
    assert len(list((killed / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(killed / "tensorboard", "loss") == pytest.approx(got, rel=1e-6)
    # The report keeps the resumed run's values too (metrics.jsonl holds steps 5-6 twice).
    assert read_series(killed / "metrics.jsonl")[0]["loss"] == pytest.approx(got, rel=1e-12)
    assert (killed / "report.png").is_file()
    # A 2-process checkpoint resumed by 1 process: one line that says how to resume it, no training.
    proc = subprocess.run([sys.executable, "-m", "clip_train", "train", *common, f"train.output_dir={killed}",
                           "train.resume=latest"], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "written by 2 processes, this run has 1: resume with --num_processes 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, color_shards):
    out = tmp_path / "term"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "clip_train", "train", *TINY, f"data.train={color_shards}",
                             "train.steps=100000", f"train.output_dir={out}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop signal received" in stderr
    saved = list_checkpoints(str(out))
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) == max(losses_by_step(out))
    assert (out / "report.png").is_file() and (out / "report.html").is_file()  # the curves so far


def test_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, color_shards):
    out = tmp_path / "nan1"
    proc = run_cli_faults(["--nan-steps", "3", *TINY, f"data.train={color_shards}", "train.steps=6",
                           f"train.output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss" in proc.stderr
    metrics = [m for m in read_metrics(out) if "loss" in m]
    assert metrics[-1]["skipped_steps"] == 1
    assert all(isinstance(m["loss"], float) for m in metrics[3:])


def test_nonfinite_steps_in_a_row_abort_with_the_last_good_state(tmp_path, color_shards):
    out = tmp_path / "nan2"
    proc = run_cli_faults(["--nan-steps", "3,4,5,6", *TINY, f"data.train={color_shards}", "train.steps=8",
                           "train.max_nonfinite_steps=2", "train.checkpoint_every_steps=2",
                           "train.keep_checkpoints=5", f"train.output_dir={out}"])
    assert proc.returncode == 2
    assert "2 non-finite steps in a row" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in list_checkpoints(str(out))] == ["step_00000002", "step_00000004"]
    from safetensors.torch import load_file

    good, last = (load_file(str(out / "checkpoints" / s / "model.safetensors")) for s in ("step_00000002", "step_00000004"))
    assert all(torch.equal(good[k], last[k]) for k in good)  # skipped steps changed nothing


def run_cli_faults(args):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, FAULTS, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)


class FakeAccelerator:
    """One process that saves small files like accelerator.save_state (or dies half-way)."""

    is_main_process, num_processes, process_index = True, 1, 0

    def __init__(self, fail=False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"partial" if self.fail else b"weights")
        if self.fail:
            raise KeyboardInterrupt("killed mid-write")
        (Path(path) / "custom_checkpoint_0.pkl").write_bytes(b"ok")


def latest(out):
    return decide_resume(FakeAccelerator(), "latest", str(out), leader=True)


def test_crash_while_saving_leaves_previous_checkpoint(tmp_path):
    save_checkpoint(FakeAccelerator(False), str(tmp_path), step=5, keep=2, run_id="r1")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(True), str(tmp_path), step=10, keep=2, run_id="r1")
    decision = latest(tmp_path)
    assert decision.checkpoint.name == "step_00000005" and decision.run_id == "r1" and decision.step == 5
    assert (tmp_path / "checkpoints" / "step_00000005" / "custom_checkpoint_0.pkl").read_bytes() == b"ok"
    for step in (15, 20, 25):
        save_checkpoint(FakeAccelerator(False), str(tmp_path), step=step, keep=2, run_id="r1")
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step_00000020", "step_00000025"]
    with pytest.raises(CheckpointError, match=r"^train.resume: .*nowhere: not on this process's disk"):
        decide_resume(FakeAccelerator(), str(tmp_path / "nowhere"), str(tmp_path), leader=True)
    fresh = latest(tmp_path / "fresh")
    assert fresh.checkpoint is None and fresh.run_id != "r1"


def test_pruning_is_by_identity_and_spares_the_checkpoint_just_written(tmp_path):
    """Issue 25, finding 4 (local half): a run resumed from step 12 while the disk still holds
    16, 20, 24 of an attempt the other disks never got; its first save (16) must stay, and
    another run's checkpoints are never pruned."""
    for step in (16, 20, 24):
        save_checkpoint(FakeAccelerator(), str(tmp_path), step=step, keep=3, run_id="mine")
    save_checkpoint(FakeAccelerator(), str(tmp_path), step=2, keep=3, run_id="other")
    save_checkpoint(FakeAccelerator(), str(tmp_path), step=16, keep=2, run_id="mine")
    assert [p.name for p in list_checkpoints(str(tmp_path))] == [
        "step_00000002", "step_00000016", "step_00000020", "step_00000024"]
    save_checkpoint(FakeAccelerator(), str(tmp_path), step=20, keep=2, run_id="mine")
    assert [step_of(p) for p in list_checkpoints(str(tmp_path))] == [2, 20, 24]  # 16: mine, beyond keep=2
    assert run_id_of(tmp_path / "checkpoints" / "step_00000002") == "other"


def damage(ckpt: Path, how: str) -> str:
    """Damage one file of a checkpoint as a lost node, a flaky disk or a partial copy would;
    returns the file's name."""
    name = {"truncate": "model.safetensors", "flip": "optimizer.bin", "missing": "random_states_0.pkl"}[how]
    path = ckpt / name
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data[len(data) // 3] ^= 0x01  # one bit of one byte: the size is unchanged
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    return name


def test_verify_names_the_bad_file_and_the_reason(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(FakeAccelerator(), str(tmp_path), step=step, keep=4, run_id="r")
    (tmp_path / "checkpoints" / "step_00000008" / "optimizer.bin").write_bytes(b"adam state" * 10)
    (tmp_path / "checkpoints" / "step_00000008" / "random_states_0.pkl").write_bytes(b"rng")
    (tmp_path / "checkpoints" / "step_00000008" / "model.safetensors").write_bytes(b"w" * 100)
    # The manifest above lists only what save_state wrote: rebuild it with the extra files.
    from clip_train.checkpoint import build_manifest, write_manifest

    ckpt = tmp_path / "checkpoints" / "step_00000008"
    write_manifest(ckpt, build_manifest(ckpt, 8, "r"))
    verify_checkpoint(ckpt)
    reasons = {"truncate": "50 bytes, manifest.json says 100", "flip": "CRC32 ", "missing": "missing"}
    for how, reason in reasons.items():
        copy = tmp_path / how
        shutil.copytree(tmp_path / "checkpoints", copy / "checkpoints")
        name = damage(copy / "checkpoints" / "step_00000008", how)
        with pytest.raises(CheckpointError, match=rf"^train.resume: {copy}/checkpoints/step_00000008/{name}: .*{reason}"):
            decide_resume(FakeAccelerator(), str(copy / "checkpoints" / "step_00000008"), str(copy), leader=True)
        assert latest(copy).step == 6  # resume=latest falls back to the one before
    (ckpt / "manifest.json").unlink()  # a save or copy that did not finish
    assert latest(tmp_path).step == 6


def test_export_loads_in_plain_open_clip_with_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="configs/models/tiny-vit.json"))
    with torch.no_grad():  # move away from the default init so a failed load cannot pass
        for p in bundle.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "model.pt"
    export_open_clip(bundle.model, str(path))
    open_clip.add_model_config("configs/models/tiny-vit.json")
    plain, _, preprocess = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(path))
    bundle.model.eval()
    plain.eval()
    assert all(torch.equal(v, bundle.model.state_dict()[k]) for k, v in plain.state_dict().items())
    images = torch.randn(3, 3, 32, 32)
    texts = open_clip.get_tokenizer("tiny-vit")(["a red square", "a cat", "seven"])
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), bundle.model.encode_image(images))
        assert torch.equal(plain.encode_text(texts), bundle.model.encode_text(texts))


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


SMALL = [*TINY, "train.local_batch_size=8", "train.chunk_size=4"]


@pytest.mark.slow
def test_a_directory_holds_one_run_and_a_complete_resume_writes_its_outputs(tmp_path, color_shards):
    """Issue 25, findings 1 and 5: a fresh run into a directory with another run's checkpoints is
    refused in one line before training (it used to prune them away one by one, then a requeue
    resumed the other experiment); train.overwrite=archive sets them aside; a resume at
    train.steps says so in one line and writes the final outputs that are missing."""
    out = tmp_path / "run"
    common = [*SMALL, f"data.train={color_shards}", "train.checkpoint_every_steps=2", f"train.output_dir={out}"]
    proc = run_cli(["train", *common, "train.steps=6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = run_id_of(out / "checkpoints" / "step_00000006")
    assert [p.name for p in list_checkpoints(str(out))] == ["step_00000004", "step_00000006"]
    assert {m["run_id"] for m in read_metrics(out)} == {first}
    lines = len(read_metrics(out))

    proc = run_cli(["train", *common, "train.steps=4", "optim.lr=1e-3"])  # train.resume unset
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith(f"clip-train: error: train.output_dir: {out}/checkpoints "
                                             "(step_00000004, step_00000006) hold(s) the checkpoints of another "
                                             f"run (run id {first}): resume it with train.resume=latest"), proc.stderr
    assert "train.overwrite=archive" in proc.stderr and "Traceback" not in proc.stderr
    assert len(read_metrics(out)) == lines and [p.name for p in list_checkpoints(str(out))] == [
        "step_00000004", "step_00000006"]  # refused before training: nothing written

    proc = run_cli(["train", *common, "train.steps=4", "optim.lr=1e-3", "train.overwrite=archive"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = run_id_of(out / "checkpoints" / "step_00000004")
    assert second != first and [p.name for p in list_checkpoints(str(out))] == ["step_00000002", "step_00000004"]
    archived = out / "archive" / first
    assert [p.name for p in list_checkpoints(str(archived))] == ["step_00000004", "step_00000006"]
    assert {m["run_id"] for m in read_metrics(archived)} == {first}  # its metrics went with it
    assert {m["run_id"] for m in read_metrics(out)} == {second}

    (out / "eval.json").unlink()
    model = (out / "open_clip_model.pt").read_bytes()
    (out / "open_clip_model.pt").unlink()
    shutil.rmtree(out / "model")
    lines = len(read_metrics(out))
    proc = run_cli(["train", *common, "train.steps=4", "optim.lr=1e-3", "train.resume=latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"train.resume: {out}/checkpoints/step_00000004 is at step 4 >= train.steps=4: the run is "
            "already complete") in proc.stderr
    assert json.loads((out / "eval.json").read_text())["step"] == 4
    exported = torch.load(out / "open_clip_model.pt", weights_only=True)
    before = torch.load(io.BytesIO(model), weights_only=True)
    assert all(torch.equal(exported[k], before[k]) for k in before)  # the step-4 weights again
    assert (out / "model" / "open_clip_model.safetensors").is_file()  # the model folder too
    assert not any("loss" in m for m in read_metrics(out)[lines:])  # no training step


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back_and_reproduce_the_losses(tmp_path, color_shards):
    """Issue 22: a truncated file (step 8), a flipped byte (step 6) and a missing file (step 4):
    resume=latest skips each with a warning naming the file, resumes from step 2 and follows the
    uninterrupted run; an explicit resume of a damaged one is a one-line error."""
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    common = [*SMALL, f"data.train={color_shards}", "train.steps=8", "train.checkpoint_every_steps=2",
              "train.keep_checkpoints=4"]
    proc = run_cli(["train", *common, f"train.output_dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(straight, damaged)
    names = {step: damage(damaged / "checkpoints" / f"step_{step:08d}", how)
             for step, how in ((8, "truncate"), (6, "flip"), (4, "missing"))}
    proc = run_cli(["train", *common, f"train.output_dir={damaged}",
                    f"train.resume={damaged}/checkpoints/step_00000008"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith(
        f"clip-train: error: train.resume: {damaged}/checkpoints/step_00000008/model.safetensors: "), proc.stderr
    assert "Traceback" not in proc.stderr
    lines = len(read_metrics(damaged))
    proc = run_cli(["train", *common, f"train.output_dir={damaged}", "train.resume=latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step, reason in ((8, "bytes, manifest.json says"), (6, "CRC32"), (4, "missing")):
        assert (f"resume=latest: skipping {damaged}/checkpoints/step_{step:08d}: "
                f"{damaged}/checkpoints/step_{step:08d}/{names[step]}: ") in proc.stderr, step
        assert reason in proc.stderr
    assert f"resumed from {damaged}/checkpoints/step_00000002 at step 2" in proc.stderr
    want = losses_by_step(straight)
    got = {m["step"]: m["loss"] for m in read_metrics(damaged)[lines:] if "loss" in m}
    assert sorted(got) == list(range(3, 9))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    assert got[8] != pytest.approx(got[3], rel=1e-3)


def test_node_local_disks_without_a_bucket_are_refused_before_training(tmp_path, color_shards):
    """Issue 25, finding 2 (DDP; FSDP2: test_sharding.py): one output_dir per process and no
    train.remote_dir. It used to let rank 0 resume alone while rank 1 started afresh; now every
    process stops at start-up with one line naming the fix."""
    root = tmp_path / "nodes"
    proc = launch(["-m", "clip_train", "train", *SMALL, f"data.train={color_shards}", "train.steps=4",
                   f"train.output_dir={root}/node${{oc.env:RANK}}", "train.resume=latest"])
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"clip-train: error: train.output_dir: {root}/node{rank} is not one filesystem shared by all 2 "
                "processes (node-local disks)") in proc.stderr, proc.stderr[-3000:]
    assert "set train.remote_dir to a bucket" in proc.stderr
    assert f'File "{REPO}/clip_train' not in proc.stderr  # no traceback of ours (the launcher prints its own)
    assert not (root / "node0" / "metrics.jsonl").exists()  # refused before training
