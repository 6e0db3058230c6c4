"""Shared pieces of the benchmarks: shards, launching either trainer the same way, reading
their step clocks and peak memory, measuring child processes (a fresh interpreter per
configuration, its peak memory), statistics, markdown tables and result files.

Both trainers run through `benchmarks/trainer_entry.py` under the same launcher (plain python for
one process, `accelerate launch` for several), with the same thread count per process, and are
timed by the same step clock (see trainer_entry.py). Only rank 0's clock is recorded: every
optimizer step is a collective, so the ranks advance in lockstep.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
ENTRY = BENCH_DIR / "trainer_entry.py"
TRAINERS = ("clip_train", "open_clip")


# ------------------------------------------------------------------------------------------------
# Machine


def cuda_device_count() -> int:
    """GPUs torch can use here (0 on a CPU-only machine or a CPU-only torch)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def machine_info() -> dict:
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_average": list(os.getloadavg()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(cuda_device_count())]
    except Exception:
        pass
    try:
        from importlib.metadata import version

        info["open_clip_torch"] = version("open_clip_torch")
        info["accelerate"] = version("accelerate")
        info["webdataset"] = version("webdataset")
    except Exception:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(info: dict) -> str:
    gpus = info.get("gpus") or []
    where = f"{len(gpus)} x {gpus[0]}" if gpus else f"{info['cpus']} CPU cores ({info['cpu']})"
    load = ", ".join(f"{x:.1f}" for x in info["load_average"])
    return (
        f"{info['host']}: {where}; torch {info.get('torch', '?')}, open_clip_torch "
        f"{info.get('open_clip_torch', '?')}; load average at start {load}"
    )


# ------------------------------------------------------------------------------------------------
# Data


def make_digits_shards(folder: Path) -> dict[str, str]:
    """The demo's handwritten-digit shards (real 32 px scans with captions) in `folder`."""
    from clip_train.demo import make_demo

    if not (folder / "summary.json").exists():
        make_demo(str(folder))
    train = sorted((folder / "train").glob("train-*.tar"))
    val = sorted((folder / "val").glob("val-*.tar"))
    return {
        "train": f"{folder}/train/train-{{000000..{len(train) - 1:06d}}}.tar",
        "val": f"{folder}/val/val-{{000000..{len(val) - 1:06d}}}.tar",
        "classnames": str(folder / "classnames.txt"),
        "templates": str(folder / "templates.txt"),
    }


# ------------------------------------------------------------------------------------------------
# One training run of either trainer


@dataclass
class RunSpec:
    trainer: str  # clip_train | open_clip
    model: str  # model-config JSON (or an open_clip model name)
    train_data: str  # brace pattern of the training shards
    nproc: int
    global_batch: int  # samples per optimizer step over all processes
    steps: int
    chunk: int | None = None  # clip_train: train.chunk_size; open_clip: micro-batch of --accum-freq
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 2
    workers: int = 1
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0
    cuda: bool = False
    log_every: int = 10  # both trainers log (and reduce metrics) every N steps: ours' default
    threads: int | None = (
        None  # OMP_NUM_THREADS per process (None: cpus / processes, as launch/local.sh)
    )
    overrides: tuple[str, ...] = ()  # clip_train only: extra key=value config overrides

    @property
    def local_batch(self) -> int:
        if self.global_batch % self.nproc:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by {self.nproc} processes"
            )
        return self.global_batch // self.nproc

    def label(self) -> str:
        chunk = (
            ""
            if self.chunk is None
            else (
                f", chunk {self.chunk}"
                if self.trainer == "clip_train"
                else f", accum-freq {self.local_batch // self.chunk}"
            )
        )
        return f"{self.trainer}{chunk}"


@dataclass
class RunResult:
    spec: dict
    step_s: list[
        float
    ]  # wall seconds of each steady step (the warm-up steps and the last step untimed)
    cpu_s_per_step: float  # rank 0's CPU seconds per steady step, its data workers included
    samples_per_s: float  # global batch / median steady step time
    samples_per_cpu_s: float  # per process: local batch / cpu_s_per_step
    peak_rss_gib: list[float]  # per process, rank order
    peak_cuda_gib: list[float] = field(default_factory=list)
    data_wait_fraction: float = float("nan")  # share of steady step time spent waiting for data
    load_before: float = 0.0  # 1-minute load average when the run started
    wall_s: float = 0.0  # launch to exit
    output_dir: str = ""


def _clip_train_args(spec: RunSpec, out: Path) -> list[str]:
    precision = "bf16" if spec.precision == "bf16" else '"no"'  # quoted: YAML reads no as false
    return [
        "train",
        f"model.name={spec.model}",
        f"data.train={spec.train_data}",
        f"data.workers={spec.workers}",
        f"train.steps={spec.steps}",
        f"train.local_batch_size={spec.local_batch}",
        f"train.chunk_size={'null' if spec.chunk is None else spec.chunk}",
        f"train.precision={precision}",
        f"train.output_dir={out}",
        f"train.log_every_steps={spec.log_every}",
        f"train.seed={spec.seed}",
        f"optim.lr={spec.lr}",
        f"optim.weight_decay={spec.weight_decay}",
        f"optim.warmup_steps={spec.warmup_steps}",
        "optim.beta1=0.9",
        "optim.beta2=0.98",
        "optim.eps=1e-6",
        "optim.schedule=cosine",
        *spec.overrides,
    ]


def _open_clip_args(spec: RunSpec, out: Path) -> list[str]:
    micro = spec.local_batch if spec.chunk is None else spec.chunk
    if spec.local_batch % micro:
        raise ValueError(
            f"open_clip --accum-freq needs the micro-batch {micro} to divide {spec.local_batch}"
        )
    accum = spec.local_batch // micro
    args = [
        "--model",
        spec.model,
        "--train-data",
        spec.train_data,
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-num-samples",
        str(spec.steps * spec.global_batch),
        "--batch-size",
        str(micro),
        "--accum-freq",
        str(accum),
        "--epochs",
        "1",
        "--lr",
        str(spec.lr),
        "--wd",
        str(spec.weight_decay),
        "--warmup",
        str(spec.warmup_steps),
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--lr-scheduler",
        "cosine",
        "--workers",
        str(spec.workers),
        "--device",
        "cuda" if spec.cuda else "cpu",
        "--precision",
        "amp_bf16" if spec.precision == "bf16" else "fp32",
        "--log-every-n-steps",
        str(spec.log_every),
        "--logs",
        str(out),
        "--name",
        "run",
        "--seed",
        str(spec.seed),
        "--zeroshot-frequency",
        "0",
        "--save-frequency",
        "1",
    ]
    if spec.nproc > 1:
        # The exact multi-process loss, as ours computes it (open_clip's recommended setting at scale).
        args += ["--local-loss", "--gather-with-grad"]
    return args


def launcher(nproc: int, options: tuple[str, ...] = ("--multi_gpu",), always: bool = False) -> list[str]:
    """The command prefix that starts `nproc` processes: plain python for one (unless `always`),
    else `accelerate launch` with `options` (e.g. an FSDP2 config file) on a free port."""
    if nproc == 1 and not always:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", *options, "--num_processes", str(nproc),
            "--num_machines", "1", "--main_process_port", "0"]


def process_env(nproc: int, cuda: bool, threads: int | None = None) -> dict[str, str]:
    """The environment every launched benchmark run gets: no W&B, unbuffered output, the same
    threads per process, and CPU processes made one gloo group when there is no GPU."""
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        # The same for both trainers; by default what launch/local.sh does: one core group per process.
        "OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 1) // nproc)),
    }
    if cuda:
        env.pop("ACCELERATE_USE_CPU", None)
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # else accelerate >= 1.13 runs each CPU process alone
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def launch_command(spec: RunSpec, out: Path) -> list[str]:
    args = (
        _clip_train_args(spec, out) if spec.trainer == "clip_train" else _open_clip_args(spec, out)
    )
    return [*launcher(spec.nproc), str(ENTRY), spec.trainer, *args]


def run_env(spec: RunSpec, clock: Path, memory: Path) -> dict[str, str]:
    return {**process_env(spec.nproc, spec.cuda, spec.threads),
            "BENCH_STEP_CLOCK": str(clock), "BENCH_MEMORY_DIR": str(memory)}


def run_trainer(
    spec: RunSpec, workdir: Path, warmup_steps: int, timeout_s: float = 1800
) -> RunResult:
    """Train with `spec` in a fresh folder under `workdir`; the first `warmup_steps` steps are not timed."""
    if spec.steps < warmup_steps + 3:
        raise ValueError(
            f"{spec.steps} steps leave fewer than 2 timed steps after {warmup_steps} warm-up steps"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("run-*")))
    out = workdir / f"run-{n:03d}-{spec.trainer}-p{spec.nproc}"
    out.mkdir()
    clock, memory, log_path = out / "step_clock.jsonl", out / "memory", out / "log.txt"
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            launch_command(spec, out),
            cwd=REPO,
            env=run_env(spec, clock, memory),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(
            f"{spec.label()} failed (exit {proc.returncode}); log {log_path}:\n{tail}"
        )
    records = (
        [json.loads(line) for line in clock.read_text().splitlines()] if clock.exists() else []
    )
    if len(records) != spec.steps:
        raise RuntimeError(
            f"{spec.label()}: expected {spec.steps} step records in {clock}, got {len(records)}"
        )
    # Record k is taken as step k starts: the intervals after the warm-up are whole steady steps.
    steady = records[warmup_steps:]
    step_s = [b[0] - a[0] for a, b in zip(steady, steady[1:], strict=False)]
    cpu_total = (steady[-1][1] + steady[-1][2]) - (steady[0][1] + steady[0][2])
    cpu_per_step = cpu_total / len(step_s)
    ranks = sorted(
        (json.loads(p.read_text()) for p in memory.glob("*.json")), key=lambda r: r["rank"]
    )
    data_wait = _data_wait_fraction(spec, out, warmup_steps)
    if len(ranks) != spec.nproc:
        raise RuntimeError(
            f"{spec.label()}: {len(ranks)} of {spec.nproc} processes reported their memory"
        )
    return RunResult(
        spec=asdict(spec),
        step_s=step_s,
        cpu_s_per_step=cpu_per_step,
        samples_per_s=spec.global_batch / statistics.median(step_s),
        samples_per_cpu_s=spec.local_batch / cpu_per_step if cpu_per_step > 0 else float("nan"),
        peak_rss_gib=[r["peak_rss_gib"] for r in ranks],
        peak_cuda_gib=[r["peak_cuda_gib"] for r in ranks if "peak_cuda_gib" in r],
        data_wait_fraction=data_wait,
        load_before=load,
        wall_s=wall,
        output_dir=str(out),
    )


def _data_wait_fraction(spec: RunSpec, out: Path, warmup_steps: int) -> float:
    """Mean share of the step time spent waiting for the next batch, over the logging windows
    that start after the warm-up steps, as each trainer reports it (ours: `data_wait_fraction` in
    metrics.jsonl; open_clip: its "Data (t)" / "Batch (t)" window averages)."""
    import re

    windows = []  # (first step of the window, 1-based, data time share)
    if spec.trainer == "clip_train":
        path = out / "metrics.jsonl"
        previous = 0
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            if "data_wait_fraction" in row:
                windows.append((previous + 1, row["data_wait_fraction"]))
                previous = row["step"]
    else:
        path = out / "run" / "out.log"
        pattern = re.compile(r"\[\s*(\d+)/\d+ .*Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")
        previous = 0
        for line in path.read_text().splitlines() if path.exists() else []:
            m = pattern.search(line)
            if m and float(m.group(3)) > 0:
                # The sample count names the step; the averages cover the steps since the last line.
                windows.append((previous + 1, float(m.group(2)) / float(m.group(3))))
                previous = int(m.group(1)) // spec.global_batch
    fractions = [f for first, f in windows if first > warmup_steps]
    return sum(fractions) / len(fractions) if fractions else float("nan")


def open_clip_checkpoint(result: RunResult) -> Path:
    """The final checkpoint open_clip_train saved (`<logs>/<name>/checkpoints/epoch_N.pt`)."""
    found = sorted(Path(result.output_dir).glob("run/checkpoints/epoch_*.pt"))
    if not found:
        raise RuntimeError(f"no open_clip checkpoint under {result.output_dir}/run/checkpoints")
    return found[-1]


def plain_state_dict(checkpoint: Path, output: Path) -> Path:
    """open_clip_train's checkpoint (optimizer state, maybe DDP `module.` prefixes) as a plain
    open_clip state dict file, the format `clip-train eval --checkpoint FILE` and open_clip load."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    torch.save(state, output)
    return output


# ------------------------------------------------------------------------------------------------
# Statistics and tables


def median(values) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; `align` is one character per column: l (left) or r (right, default)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "–"
        return (
            f"{value:,.0f}"
            if abs(value) >= 100
            else f"{value:.3g}"
            if abs(value) < 1
            else f"{value:.2f}"
        )
    return str(value)


def write_json(name: str, payload: dict, quick: bool) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How a benchmark was run, as its result file records it: `python benchmarks/X.py ARGS`."""
    return " ".join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])


# ------------------------------------------------------------------------------------------------
# Child processes and their memory


def run_child(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
              prefix: str = "") -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a measuring child (a fresh interpreter: the memory it reports is its own) from the
    repository root; its result is the JSON of its last stdout line starting with `prefix`
    (None when it failed or printed none)."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith(prefix)]
    if proc.returncode != 0 or not lines:
        return proc, None
    return proc, json.loads(lines[-1].removeprefix(prefix))


def proc_status_kib(field: str) -> int:
    """A /proc/self/status field in KiB: VmRSS (resident now), VmHWM (its peak)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def reset_peak_rss() -> int:
    """Reset the peak-RSS high-water mark (VmHWM), so that what ran before (model building) does
    not hide what follows; returns the resident bytes now."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_kib("VmRSS") * 1024


try:
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


class RssPeak:
    """Peak resident set size (bytes) sampled in a background thread while the block runs: for
    peaks of one phase among several (VmHWM covers the whole process since its last reset)."""

    def __init__(self, period_s: float = 0.002):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __enter__(self) -> RssPeak:
        # Hand freed heap pages back to the OS first, so that RSS follows the live tensors instead
        # of what glibc kept from earlier steps (or from the full model built before sharding).
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self.before = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
