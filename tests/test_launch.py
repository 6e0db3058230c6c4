"""Launch scripts and configs: syntax (bash -n, shellcheck when installed), the SLURM script's
per-node commands under a faked 2-node allocation (read back through accelerate's own argument
handling), its pre-emption path end to end on this machine (signal -> checkpoint -> requeue ->
resume), and the accelerate configs as accelerate itself reads them.

The fake SLURM: `srun` starts one task per node, all here, each in its own session as if on its
own node, forwards signals to every task's process group and labels output like `srun --label`;
`scontrol` prints the fake host list and records `requeue`; `nvidia-smi` lists $FAKE_GPUS GPUs.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

LAUNCH = REPO / "launch"
SBATCH = LAUNCH / "slurm.sbatch"
SHELL_SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [SBATCH]
ACCELERATE_CONFIGS = sorted((LAUNCH / "accelerate").glob("*.yaml"))

FAKE_SRUN = '''#!{python}
import os, signal, subprocess, sys, threading
args = sys.argv[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(args) + "\\n")
while args and args[0].startswith("-"):  # options are all --key=value
    args.pop(0)
hosts = os.environ["FAKE_HOSTS"].split()
procs = []
for node in range(int(os.environ["SLURM_NNODES"])):
    env = {{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
           "SLURM_LOCALID": "0", "SLURMD_NODENAME": hosts[node]}}
    procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True))

def forward(signum, frame):
    for p in procs:
        try:
            os.killpg(p.pid, signum)
        except ProcessLookupError:
            pass

for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
lock = threading.Lock()

def pump(node, stream):
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.buffer.write(f"{{node}}: ".encode() + line)
            sys.stdout.flush()

threads = [threading.Thread(target=pump, args=(i, p.stdout)) for i, p in enumerate(procs)]
for t in threads:
    t.start()
codes = [p.wait() for p in procs]
for t in threads:
    t.join()
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
'''

FAKE_SCONTROL = '''#!/usr/bin/env bash
case "$1" in
  show) printf '%s\\n' $FAKE_HOSTS ;;
  requeue) echo "scontrol requeue $2" >> "$FAKE_SLURM_LOG" ;;
  *) exit 1 ;;
esac
'''

FAKE_NVIDIA_SMI = '''#!/usr/bin/env bash
for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
'''

NODE_LINE = re.compile(r"^(\d+): node (\d+) \(([^)]*)\): (.*)$")


def fake_slurm_env(tmp_path: Path, nnodes: int = 2, hosts: str = "gpu07 gpu08", job_id: int = 4242,
                   **extra: str) -> dict[str, str]:
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)),
                       ("scontrol", FAKE_SCONTROL), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (fakebin / name).write_text(text)
        (fakebin / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "TORCH_ELASTIC_", "ACCELERATE_", "MAIN_PROCESS_"))
           and k not in ("DRY_RUN", "PROCS_PER_NODE", "WORLD_SIZE", "RANK", "OMP_NUM_THREADS")}
    env.update(PATH=f"{fakebin}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_JOB_ID=str(job_id), SLURM_NNODES=str(nnodes), SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="64", FAKE_HOSTS=hosts,
               FAKE_SLURM_LOG=str(tmp_path / "slurm.log"), PYTHON=sys.executable)
    env.update(extra)
    return env


def node_commands(stdout: str) -> dict[int, list[str]]:
    """{node id: argv} from the dry run's `<label>: node <id> (<host>): <command>` lines."""
    found = {}
    for line in stdout.splitlines():
        m = NODE_LINE.match(line)
        if m:
            assert m.group(1) == m.group(2), line  # srun's task label is the node id
            found[int(m.group(2))] = shlex.split(m.group(4))
    return found


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    assert argv[0] == "env", argv
    env, i = {}, 1
    while "=" in argv[i] and not argv[i].startswith("-"):
        key, value = argv[i].split("=", 1)
        env[key] = value
        i += 1
    return env, argv[i:]


def accelerate_view(argv: list[str]):
    """How `accelerate launch` resolves these arguments (config file included), without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"], argv
    args = launch_command_parser().parse_args(argv[3:])
    return _validate_launch_command(args)[0]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_dry_run_two_nodes_gpus_from_slurm(tmp_path):
    env = fake_slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8")
    overrides = ["train.steps=5", "data.train=/data/a b/{000..003}.tar::pipe:cat $HOME/x.tar"]
    proc = subprocess.run(["bash", str(SBATCH), "--dry-run", "configs/tiny-cpu.yaml", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nodes = node_commands(proc.stdout)
    assert sorted(nodes) == [0, 1], proc.stdout
    for rank, argv in nodes.items():
        node_env, cmd = split_env(argv)
        assert "SIGUSR1" in node_env["PET_SIGNALS_TO_HANDLE"].split(",")
        assert int(node_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 120  # inside the --signal lead
        assert node_env["OMP_NUM_THREADS"] == "8"  # 64 cores / 8 processes
        assert "ACCELERATE_USE_CPU" not in node_env
        assert option(cmd, "--machine_rank") == str(rank)
        assert option(cmd, "--num_machines") == "2"
        assert option(cmd, "--num_processes") == "16"  # 8 GPUs per node x 2 nodes
        assert option(cmd, "--main_process_ip") == "gpu07"  # first host of the allocation
        assert option(cmd, "--main_process_port") == str(20000 + 4242 % 20000)
        assert option(cmd, "--config_file") == "launch/accelerate/multi-node.yaml"
        # Config and overrides arrive unchanged (spaces, braces, `$`), resume=latest before them.
        assert cmd[cmd.index("clip_train") - 1:] == [
            "-m", "clip_train", "train", "--config", "configs/tiny-cpu.yaml", "train.resume=latest",
            *overrides]
        view = accelerate_view(cmd)
        assert view.multi_gpu and not view.use_fsdp and not view.use_deepspeed
        assert (view.num_processes, view.num_machines, view.machine_rank) == (16, 2, rank)
        assert (view.main_process_ip, view.main_process_port) == ("gpu07", 24242)
        assert view.module and view.training_script == "clip_train"
        assert view.max_restarts == 0  # no in-job restarts unless MAX_RESTARTS is set
    # torchrun's view of node 1 (node 0 would probe the port on this machine)
    from accelerate.utils.launch import prepare_multi_gpu_env

    view = accelerate_view(split_env(nodes[1])[1])
    prepare_multi_gpu_env(view)
    assert (view.nproc_per_node, view.nnodes, view.node_rank) == ("8", "2", 1)
    assert view.rdzv_endpoint == "gpu07:24242"
    srun_call = (tmp_path / "slurm.log").read_text().splitlines()[0].split()
    assert {"--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"} <= set(srun_call)
    assert "requeue" not in (tmp_path / "slurm.log").read_text()


def test_sbatch_dry_run_gpus_from_nvidia_smi_after_requeue(tmp_path):
    env = fake_slurm_env(tmp_path, nnodes=2, hosts="node-a node-b", job_id=31337, FAKE_GPUS="4",
                         DRY_RUN="1", SLURM_RESTART_COUNT="2", MAIN_PROCESS_PORT="29555", MAX_RESTARTS="3")
    proc = subprocess.run(["bash", str(SBATCH), "configs/demo.yaml", "train.resume=/ckpt/step_00000100"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nodes = node_commands(proc.stdout)
    assert sorted(nodes) == [0, 1], proc.stdout
    for rank, argv in nodes.items():
        cmd = split_env(argv)[1]
        assert option(cmd, "--num_processes") == "8"  # 4 GPUs per node (nvidia-smi) x 2 nodes
        assert option(cmd, "--machine_rank") == str(rank)
        assert option(cmd, "--main_process_ip") == "node-a"
        assert option(cmd, "--main_process_port") == "29555"
        # After a requeue the run continues from its own newest checkpoint: latest comes last.
        assert cmd[-2:] == ["train.resume=/ckpt/step_00000100", "train.resume=latest"]
        # MAX_RESTARTS: the launcher's in-job restarts, on the fixed port.
        assert accelerate_view(cmd).max_restarts == 3


def test_sbatch_refuses_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH), "--dry-run", "configs/demo.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr
    proc = subprocess.run(["bash", str(SBATCH)], env=fake_slurm_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def logged_lines(out_dir: Path) -> int:
    """Complete lines in metrics.jsonl so far (the trainer may be writing the next one)."""
    path = out_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_sbatch_two_nodes_stop_requeue_resume(tmp_path, color_shards):
    """Two fake nodes on this machine (1 CPU process each): USR1 to the batch script (what
    `--signal=B:USR1@120` does) must reach the trainers through srun and the launchers, leave a
    checkpoint, requeue the job; the requeued start resumes from that checkpoint."""
    out = tmp_path / "run"
    port = free_port()
    args = ["configs/tiny-cpu.yaml", f"data.train={color_shards}", "train.local_batch_size=8",
            "train.chunk_size=4", "train.log_every_steps=1", "train.checkpoint_every_steps=0",
            f"train.output_dir={out}", "eval.zeroshot=null", "eval.classnames=null",
            "eval.templates=null", "eval.retrieval=null"]
    env = fake_slurm_env(tmp_path, hosts="127.0.0.1 127.0.0.1", job_id=777, FAKE_GPUS="0",
                         MAIN_PROCESS_PORT=str(port), CUDA_VISIBLE_DEVICES="", WANDB_MODE="offline",
                         STOP_GRACE_S="60", SLURM_CPUS_PER_TASK="1")  # 1 core per fake node
    job = subprocess.Popen(["bash", str(SBATCH), *args, "train.steps=1000"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while logged_lines(out) < 2 and job.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert job.poll() is None, job.communicate()[0][-4000:]
        assert logged_lines(out) >= 2, "no training steps within 180 s"
        job.send_signal(signal.SIGUSR1)
        log, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, log[-4000:]  # stopped, not finished
    assert "got SIGUSR1" in log and "stop signal received" in log, log[-4000:]
    assert "scontrol requeue 777" in (tmp_path / "slurm.log").read_text(), log[-4000:]
    steps = [int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*")]
    assert len(steps) == 1 and 2 <= steps[0] < 1000, steps
    stopped_at = steps[0]
    first = read_metrics(out)
    assert first[-1]["step"] == stopped_at and first[-1]["samples_seen"] == stopped_at * 16

    # The requeued job: same job id, SLURM_RESTART_COUNT=1, same arguments (a shorter run here).
    env["SLURM_RESTART_COUNT"] = "1"
    proc = subprocess.run(["bash", str(SBATCH), *args, f"train.steps={stopped_at + 2}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/step_{stopped_at:08d}" in proc.stdout, proc.stdout[-4000:]
    resumed = read_metrics(out)[len(first):]
    assert [m["step"] for m in resumed if "loss" in m] == [stopped_at + 1, stopped_at + 2]
    assert resumed[-1]["samples_seen"] == (stopped_at + 2) * 16  # 2 nodes x 8 samples per step
    assert (out / "open_clip_model.pt").is_file()
    assert (tmp_path / "slurm.log").read_text().count("requeue") == 1


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_as_accelerate_reads_them(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(path))  # rejects unknown keys
    assert isinstance(cfg, ClusterConfig)
    # DDP, or FSDP2 with open_clip's blocks as units (README "Sharded training (FSDP2)"); never
    # FSDP1 or DeepSpeed, which the gradient cache does not support.
    fsdp = cfg.distributed_type == "FSDP"
    if fsdp:
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "ResidualAttentionBlock"
    else:
        assert cfg.distributed_type == "MULTI_GPU" and not cfg.fsdp_config
    assert not cfg.deepspeed_config
    assert cfg.mixed_precision == "no"  # train.precision decides, not the launcher
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if cfg.num_machines == 1 and cfg.num_processes > 0:  # single node: runs as is
        view = accelerate_view([*base, "-m", "clip_train", "train"])
        assert (view.use_fsdp if fsdp else view.multi_gpu)
        assert view.num_processes == cfg.num_processes and view.num_machines == 1
    else:  # multi-node: the per-node values must come from the command line
        view = accelerate_view([*base, "--num_processes", "32", "--num_machines", "4",
                                "--machine_rank", "3", "--main_process_ip", "head",
                                "--main_process_port", "29500", "-m", "clip_train", "train"])
        assert (view.use_fsdp if fsdp else view.multi_gpu)
        assert (view.num_processes, view.num_machines, view.machine_rank) == (32, 4, 3)
        with pytest.raises(ValueError, match="num_processes"):
            accelerate_view([*base, "-m", "clip_train", "train"])


def test_expected_accelerate_configs_are_shipped():
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"single-node.yaml", "multi-node.yaml", "fsdp2.yaml",
                                                    "fsdp2-multi-node.yaml"}
    assert "multi-node.yaml" in SBATCH.read_text() and "fsdp2-multi-node.yaml" in SBATCH.read_text()


def test_sbatch_dry_run_selects_the_fsdp2_config(tmp_path):
    env = fake_slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8", ACCELERATE_CONFIG="launch/accelerate/fsdp2-multi-node.yaml")
    proc = subprocess.run(["bash", str(SBATCH), "--dry-run", "configs/tiny-cpu.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank, argv in node_commands(proc.stdout).items():
        cmd = split_env(argv)[1]
        assert option(cmd, "--config_file") == "launch/accelerate/fsdp2-multi-node.yaml"
        view = accelerate_view(cmd)
        assert view.use_fsdp and str(view.fsdp_version) == "2" and not view.multi_gpu
        assert (view.num_processes, view.num_machines, view.machine_rank) == (16, 2, rank)
