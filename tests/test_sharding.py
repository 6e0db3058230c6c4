"""Sharded training (FSDP2 through Accelerate, launch/accelerate/fsdp2.yaml) on 2 CPU processes:
exact gradient-cache steps, equality with DDP, export, sharded checkpoints, SIGKILL + resume."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import REPO
from test_train import TINY, eval_args, read_metrics

from clip_train.config import Config, LossConfig, ModelConfig
from clip_train.sharding import ShardingError, check_supported, enable_fsdp2

FSDP2_CONFIG = "launch/accelerate/fsdp2.yaml"
FAULTS = "tests/helpers/train_with_faults.py"


def launch_fsdp2(args: list[str], timeout: int = 300, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/accelerate/fsdp2.yaml [options]` with 2 CPU
    processes: the command users run, with ACCELERATE_USE_CPU=true (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2_CONFIG, *options,
           "--num_processes", "2", "--main_process_port", "0", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_fsdp2_gradient_cache_is_exact_and_state_round_trips(tmp_path):
    """One launch (tests/helpers/fsdp_check.py): its assertions run inside; the numbers are re-checked here."""
    res = result_of(launch_fsdp2(["tests/helpers/fsdp_check.py", str(tmp_path / "ckpt")]))
    for label in ("nochunk", "chunk1_every", "chunk3_last", "chunk3_last_ring"):  # vs float64 one-process ClipLoss
        assert res[label]["max_rel_err"] < 1e-5 and res[label]["logit_scale_rel_err"] < 1e-5, res[label]
    assert res["fsdp_vs_ddp_5_steps"]["max_rel_err"] < 1e-5, res["fsdp_vs_ddp_5_steps"]
    assert res["fsdp_chunked_vs_ddp_5_more_steps"]["whole_model_rel_err"] < 1e-5
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= set(res["checkpoint_files"])  # sharded (DCP)


def test_fsdp2_on_node_local_disks_without_a_bucket_is_refused_before_training(tmp_path, color_shards):
    """Issue 25, finding 3: every checkpoint used to keep only rank 0's shard (the other ranks'
    temporary directories were deleted) and the run exited 0; now both processes stop at start-up."""
    root = tmp_path / "nodes"
    proc = launch_fsdp2(["-m", "clip_train", "train", *TINY, f"data.train={color_shards}", "train.steps=2",
                         f"train.output_dir={root}/node${{oc.env:RANK}}"])
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"clip-train: error: train.output_dir: {root}/node{rank} is not one filesystem shared by all 2 "
                "processes") in proc.stderr, proc.stderr[-3000:]
    assert f'File "{REPO}/clip_train' not in proc.stderr  # no traceback of ours (the launcher prints its own)
    assert not (root / "node0" / "checkpoints").exists()


@pytest.mark.slow
def test_fsdp2_sigkill_then_resume_follows_the_uninterrupted_run(tmp_path, color_shards):
    """Every option on: bf16 mixed precision, Accelerate's activation checkpointing, a queue,
    evaluation; 3 launches."""
    common = [*TINY, f"data.train={color_shards}", "train.steps=8", "train.local_batch_size=8",
              "train.chunk_size=3", "train.checkpoint_every_steps=4", "loss.queue_size=16",
              "train.precision=bf16"]
    ac = ("--fsdp_activation_checkpointing", "true")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = launch_fsdp2(["-m", "clip_train", "train", *common, f"train.output_dir={straight}",
                         *eval_args(tmp_path, color_shards)], options=ac)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The run's first line is the bf16-on-the-CPU note; then what runs, in words.
    ours = [line for line in proc.stderr.splitlines() if "[rank 0]" in line]
    assert "train.precision=bf16 on the CPU" in ours[0], ours[:3]  # the run's first line says it
    assert "FSDP2 over 2 CPU processes (parameters, gradients and optimizer state sharded" in proc.stderr
    assert "; bf16 autocast; gradient cache on (chunks of 3 of 8 samples per process, gradients reduced " \
           "every chunk)" in proc.stderr
    results = json.loads((straight / "eval.json").read_text())  # evaluation on the gathered weights
    assert 0.0 <= results["zeroshot/top1"] <= 1.0 and "retrieval/image_to_text_R@1" in results
    proc = launch_fsdp2([FAULTS, "--kill-at-step", "6", *common, f"train.output_dir={killed}"], options=ac)
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "step_00000004" / "pytorch_model_fsdp_0").is_dir()
    proc = launch_fsdp2(["-m", "clip_train", "train", *common, f"train.output_dir={killed}", "train.resume=latest"],
                        options=ac)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {m["step"]: m["loss"] for m in read_metrics(straight) if "loss" in m}
    got = {m["step"]: m["loss"] for m in read_metrics(killed) if "loss" in m}
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got[step], want[step])
    # The end-of-run export is a plain open_clip state dict (strict load), and `clip-train export`
    # of the sharded final checkpoint gives the same tensors.
    final = torch.load(killed / "open_clip_model.pt", weights_only=True)
    open_clip.create_model(open_clip_name()).load_state_dict(final, strict=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "clip_train", "export", "--config", str(killed / "config.yaml"),
                           "--checkpoint", str(killed / "checkpoints" / "step_00000008"),
                           "--output", str(tmp_path / "exported.pt")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = torch.load(tmp_path / "exported.pt", weights_only=True)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    # The model folder holds the same gathered weights, and open_clip loads it alone.
    from safetensors.torch import load_file

    folder = load_file(str(killed / "model" / "open_clip_model.safetensors"))
    assert folder.keys() == final.keys() and all(torch.equal(folder[k], final[k]) for k in final)
    loaded = open_clip.create_model(f"local-dir:{killed / 'model'}").state_dict()
    assert all(torch.equal(loaded[k], final[k]) for k in final)


def open_clip_name() -> str:
    from clip_train.model import resolve_model_name

    return resolve_model_name(str(Path(REPO) / "configs" / "models" / "tiny-vit.json"))


def test_fsdp2_refuses_the_momentum_encoder_in_one_line():
    cfg = Config(model=ModelConfig(name="configs/models/tiny-vit.json"),
                 loss=LossConfig(queue_size=16, momentum=0.99))
    with pytest.raises(ShardingError, match=r"^loss.momentum > 0 .*FSDP2.*loss.momentum=0"):
        check_supported(cfg)


def test_fsdp2_bucket_mirror_needs_one_disk_for_every_process(tmp_path):
    """Each process writes its own shards; only the main process uploads: node-local disks under
    FSDP2 would publish checkpoints without the other processes' shards."""
    from clip_train.config import TrainConfig
    from clip_train.sharding import check_mirror_disk

    two = types.SimpleNamespace(num_processes=2)
    cfg = Config(train=TrainConfig(output_dir=str(tmp_path), remote_dir="s3://bucket/run"))
    with pytest.raises(ShardingError, match=r"^train.remote_dir with FSDP2 needs train.output_dir on a"):
        check_mirror_disk(two, cfg, shared=False)  # the start-up probe found node-local disks
    check_mirror_disk(two, cfg, shared=True)
    check_mirror_disk(two, Config(train=TrainConfig(output_dir=str(tmp_path))))  # no mirror: no probe


def test_fsdp1_and_single_process_fsdp_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    cpu = types.SimpleNamespace(is_fsdp2=False, distributed_type="MULTI_CPU", mixed_precision="no")
    with pytest.raises(ShardingError, match="fsdp_version: 2"):
        enable_fsdp2(cpu)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert enable_fsdp2(cpu) is False  # a DDP launch stays DDP


def test_fsdp2_mixed_precision_is_bf16_compute_float32_reduction():
    """Accelerate maps mixed_precision=bf16 to bf16 reduction; prepare_model makes it float32, and
    keeps the temperature out of the sharding."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from clip_train.model import DualEncoder
    from clip_train.sharding import prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # accelerate's default
    acc = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
                                distributed_type=DistributedType.FSDP)
    model = DualEncoder(open_clip.create_model(open_clip_name()))
    prepare_model(acc, model)
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    (ignored,) = plugin.ignored_modules
    assert list(ignored.parameters()) == [model.clip.logit_scale]
    assert plugin.transformer_cls_names_to_wrap == ["ResidualAttentionBlock"]


def test_check_world_size_admits_fsdp2_only(monkeypatch):
    from clip_train.train import LaunchError, check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    for mode, fsdp2 in (("DistributedType.FSDP", False), ("DistributedType.DEEPSPEED", False)):
        with pytest.raises(LaunchError, match="not supported"):
            check_world_size(types.SimpleNamespace(num_processes=2, distributed_type=mode, is_fsdp2=fsdp2))
    check_world_size(types.SimpleNamespace(num_processes=2, distributed_type="DistributedType.FSDP", is_fsdp2=True))


@pytest.mark.slow
def test_fsdp2_full_state_dict_force_image_size_with_evaluation(tmp_path, color_shards):
    """FSDP2 with fsdp_state_dict_type FULL_STATE_DICT (accelerate writes pytorch_model_fsdp.bin)
    and model.force_image_size, evaluating during training: the evaluation copy keeps the forced
    size (it was open_clip.create_model(name): a positional-embedding size mismatch), `clip-train
    eval`/`export` read the checkpoint and agree with the run's own evaluation and export, and
    the run resumes from it."""
    common = [*TINY, f"data.train={color_shards}", "train.local_batch_size=8", "train.chunk_size=4",
              "model.force_image_size=48", "model.lock_text=true", *eval_args(tmp_path, color_shards),
              f"eval.validation={color_shards}", "eval.every_steps=2", "eval.val_batch_size=16",
              "train.checkpoint_every_steps=2"]
    full = ("--fsdp_state_dict_type", "FULL_STATE_DICT")
    out = tmp_path / "run"
    proc = launch_fsdp2(["-m", "clip_train", "train", *common, "train.steps=4", f"train.output_dir={out}"],
                        options=full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out) if "val/loss" in m] == [2, 4]
    checkpoint = out / "checkpoints" / "step_00000004"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and not (checkpoint / "pytorch_model_fsdp_0").exists()
    results = json.loads((out / "eval.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cli = [sys.executable, "-m", "clip_train"]
    proc = subprocess.run([*cli, "export", "--config", str(out / "config.yaml"), "--checkpoint", str(checkpoint),
                           "--output", str(tmp_path / "exported.pt")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = torch.load(tmp_path / "exported.pt", weights_only=True)
    final = torch.load(out / "open_clip_model.pt", weights_only=True)
    assert exported["visual.positional_embedding"].shape[0] == (48 // 8) ** 2 + 1
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    proc = subprocess.run([*cli, "eval", "--config", str(out / "config.yaml"), "--checkpoint", str(checkpoint),
                           "--output", str(tmp_path / "eval.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert alone.keys() == {k for k in results if k != "step"}
    for key, value in alone.items():  # 1 process on the checkpoint = 2 FSDP2 processes in training
        assert value == pytest.approx(results[key], rel=1e-5, abs=1e-6), (key, value, results[key])
    # The resumed run's first backward is followed at once by the final evaluation's loader fork.
    # torch's autograd device threads (started by a first backward under FSDP2 and on GPUs) must
    # all exist before the first fork: a fork as one starts hung here on Python 3.11.7 (see
    # runtime.start_autograd_threads).
    forks = tmp_path / "forks"
    forks.mkdir()
    proc = launch_fsdp2([FAULTS, "--fork-log", str(forks), *common, "train.steps=5", f"train.output_dir={out}",
                         "train.resume=latest"], options=full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoint} at step 4" in proc.stderr
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-1] == 5
    for rank in (0, 1):
        records = [line.split() for line in (forks / f"forks-rank{rank}.txt").read_text().splitlines()]
        at_forks = [int(n) for what, n in records if what == "fork"]
        at_exit = [int(n) for what, n in records if what == "exit"]
        assert len(at_forks) >= 2 and len(at_exit) == 1, records  # the train and the evaluation loaders
        assert set(at_forks) == set(at_exit), f"rank {rank}: autograd threads at each fork, then at exit: {records}"
