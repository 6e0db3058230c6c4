"""Metrics: a main-process `metrics.jsonl` always, trackers (W&B, TensorBoard) through Accelerate
when asked for, and progress that fits the place (a bar on a terminal, plain lines in a cluster log)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from accelerate.tracking import TensorBoardTracker
from tqdm import tqdm

from clip_train.config import ClipTrainError, Config, to_yaml

log = logging.getLogger("clip_train")

STEP_KEY = "train/step"
TENSORBOARD_DIR = "tensorboard"  # under train.output_dir


def wandb_mode(mode: str) -> str:
    """Resolve `auto`: online only when W&B credentials exist, so a run never blocks on a login."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class StepTensorBoard(TensorBoardTracker):
    """Accelerate's TensorBoard tracker writing `<output_dir>/tensorboard`, charted against our
    optimizer step (the `train/step` value of each log call)."""

    def __init__(self, output_dir: str):
        # run name = the sub-directory: `tensorboard --logdir runs/` then lists `<run>/tensorboard`.
        super().__init__(TENSORBOARD_DIR, output_dir)

    def start_at(self, step: int) -> None:
        """Hide whatever an earlier start of this run logged after `step` (TensorBoard's purge:
        a run resumed from a checkpoint older than its last logged step, or restarted from
        scratch into the same directory, then shows one value per step, the latest)."""
        self.init_kwargs["purge_step"] = step + 1

    def store_init_configuration(self, values: dict) -> None:
        # config.yaml sits next to the event files; add_hparams would add a sub-run at every start.
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        values = dict(values)
        super().log(values, step=values.pop(STEP_KEY, step), **kwargs)


def trackers(cfg: Config) -> list:
    """Accelerate's `log_with`: tracking.report_to, plus wandb when `wandb.enabled`."""
    names = list(cfg.tracking.report_to)
    if cfg.wandb.enabled and "wandb" not in names:
        names.append("wandb")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ClipTrainError("tracking.report_to: tensorboard is not installed: "
                             "pip install 'clip-train[tensorboard]' (or tensorboard)")
    return [StepTensorBoard(cfg.train.output_dir) if n == "tensorboard" else n for n in names]


def init_trackers(accelerator, cfg: Config, run_id: str | None, step: int = 0) -> str | None:
    """Start the trackers through Accelerate (main process) at optimizer step `step` (0, or the
    resumed checkpoint's); returns the W&B run id to checkpoint."""
    if not accelerator.log_with:
        return None
    from omegaconf import OmegaConf

    for tracker in accelerator.log_with:
        if isinstance(tracker, StepTensorBoard):
            tracker.start_at(step)
    init = {"mode": wandb_mode(cfg.wandb.mode), "dir": cfg.train.output_dir, "tags": list(cfg.wandb.tags),
            "resume": "allow"}
    if cfg.wandb.entity:
        init["entity"] = cfg.wandb.entity
    if cfg.wandb.name:
        init["name"] = cfg.wandb.name
    if run_id:
        init["id"] = run_id  # a resumed run continues the same W&B run
    accelerator.init_trackers(cfg.wandb.project, config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                              init_kwargs={"wandb": init})
    if not accelerator.is_main_process or "wandb" not in map(str, accelerator.log_with):
        return None
    run = accelerator.get_tracker("wandb", unwrap=True)
    # Charts use our optimizer step; W&B's own step just counts log calls. A run resumed from a
    # checkpoint older than its last logged step then re-logs those steps instead of W&B dropping
    # them for going backwards.
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    return run.id


class MetricsLog:
    """Writes metrics to `<output_dir>/metrics.jsonl` and the trackers; main process only."""

    def __init__(self, accelerator, cfg: Config, run_id: str | None = None):
        self.accelerator = accelerator
        self.run_id = run_id  # on every line: which run wrote it (docs/checkpoints.md)
        self.enabled = accelerator.is_main_process
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            (self.path.parent / "config.yaml").write_text(to_yaml(cfg))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled or not metrics:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}
        with self.path.open("a") as f:
            run = {"run_id": self.run_id} if self.run_id else {}
            f.write(json.dumps({"step": step, "time": time.time(), **run, **clean}) + "\n")
        self.accelerator.log({**metrics, STEP_KEY: step})


class Throughput:
    """Samples per second and the fraction of time spent waiting for data, per logging window."""

    def __init__(self, global_batch: int, local_batch: int):
        self.global_batch, self.local_batch = global_batch, local_batch
        self._reset()

    def _reset(self) -> None:
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def stepped(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        """The window's rates; starts a new window."""
        elapsed = time.perf_counter() - self.start
        out = {"samples_per_s": self.global_batch * self.steps / elapsed,
               "samples_per_s_per_process": self.local_batch * self.steps / elapsed,
               "data_wait_fraction": self.data_wait / elapsed}
        self._reset()
        return out


class ProgressDisplay:
    """A tqdm bar when a person watches a terminal, log lines every `every` steps otherwise."""

    def __init__(self, enabled: bool, total: int, start: int, every: int):
        self.every = every
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.total = total

    def update(self, step: int, metrics: dict) -> None:
        short = {k: metrics[k] for k in ("loss", "lr", "samples_per_s") if k in metrics}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)
        elif self.lines and (step % self.every == 0 or step == self.total):
            text = " ".join(f"{k}={v:.4g}" for k, v in short.items())
            log.info("step %d/%d %s", step, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
