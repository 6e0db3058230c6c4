"""One training process of a benchmark run: clip_train's or open_clip's trainer, timed the same way.

    python benchmarks/trainer_entry.py clip_train train --config ... key=value ...
    python benchmarks/trainer_entry.py open_clip --model configs/models/tiny-vit.json --train-data ...

Launched once per process (plain python for 1 process, `accelerate launch` for N), so both trainers
run under the same launcher and are measured by the same code:
- step clock: both loops ask their learning-rate schedule for the step's rate once per optimizer
  step, right after the step's batch arrives (ours `clip_train.train.lr_at`, open_clip the
  `scheduler(step)` made by `cosine_lr`/`const_lr`). A thin wrapper around those functions appends
  `[wall time, CPU seconds of this process, CPU seconds of its data-loader workers]` to
  `$BENCH_STEP_CLOCK` (rank 0 only) at the first call of each step: the interval between two records
  is one whole iteration of the loop, whatever the trainer logs and how often;
- peak memory: after the trainer returns, `$BENCH_MEMORY_DIR/<rank>.json` gets this process's peak
  RSS (`ru_maxrss`, data-loader workers excluded) and, on CUDA, `torch.cuda.max_memory_allocated`.

open_clip_train 3.3.0 needs three changes to run here; they are applied in this process only,
before `open_clip_train.main.main` starts, and never touch the installed package:
- a `--model` ending in `.json` is registered with `open_clip.add_model_config` and replaced by its
  name (open_clip's trainer only accepts registered names);
- webdataset 1.0.2 yields an end-of-shard `{}` marker that open_clip's tar grouping does not expect
  (KeyError 'fname', open_clip issue #935): its tar expander is called with `eof_value=None`;
- on the CPU, `DistributedDataParallel(model, device_ids=[cpu])` is rejected by torch: device_ids
  is dropped for CPU modules.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from pathlib import Path


class StepClock:
    """Appends [wall, own CPU, data-worker CPU] to a JSONL file at the start of every step."""

    def __init__(self, path: str):
        self.file = open(path, "a")  # open for the life of the process
        self.last_step: object = None
        self.workers: list = []

    def _workers_cpu(self) -> float:
        import psutil

        # The data-loader workers are persistent in both trainers: find them once they exist
        # (listing children scans /proc, too slow to repeat every step).
        if not self.workers:
            self.workers = psutil.Process().children(recursive=True)
        total = 0.0
        for proc in self.workers:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def tick(self, step: object) -> None:
        if step == self.last_step:  # open_clip asks again for every micro-batch of --accum-freq
            return
        self.last_step = step
        self.file.write(json.dumps([time.time(), time.process_time(), self._workers_cpu()]) + "\n")
        self.file.flush()


def _make_clock() -> StepClock | None:
    path = os.environ.get("BENCH_STEP_CLOCK")
    if path and int(os.environ.get("RANK", "0")) == 0:
        return StepClock(path)
    return None


def _clock_clip_train() -> None:
    import clip_train.train as ct

    clock = _make_clock()
    if clock is None:
        return
    lr_at = ct.lr_at

    @functools.wraps(lr_at)
    def timed_lr_at(step, *args, **kwargs):
        clock.tick(step)
        return lr_at(step, *args, **kwargs)

    ct.lr_at = timed_lr_at


def _patch_open_clip() -> None:
    import open_clip_train.main as ocm
    import torch
    from data_throughput import patch_open_clip_for_webdataset_1_0_2  # this script's folder

    patch_open_clip_for_webdataset_1_0_2()

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuFriendlyDDP(ddp):  # a subclass, so open_clip's isinstance checks still hold
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP

    clock = _make_clock()
    if clock is None:
        return
    for name in ("cosine_lr", "const_lr", "const_lr_cooldown"):
        make = getattr(ocm, name)

        def timed_schedule(*args, _make=make, **kwargs):  # instrumentation only
            adjust = _make(*args, **kwargs)

            def timed_adjust(step):
                clock.tick(step)
                return adjust(step)

            return timed_adjust

        setattr(ocm, name, timed_schedule)


def _register_model_config(argv: list[str]) -> list[str]:
    import open_clip

    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--model" and argv[i + 1].endswith(".json"):
            path = Path(argv[i + 1])
            open_clip.add_model_config(path)
            argv[i + 1] = path.stem
    return argv


def _write_peak_memory(trainer: str) -> None:
    folder = os.environ.get("BENCH_MEMORY_DIR")
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "trainer": trainer,
        "rank": rank,
        "pid": os.getpid(),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        record["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{rank}.json").write_text(json.dumps(record))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("clip_train", "open_clip"):
        print(__doc__, file=sys.stderr)
        return 2
    trainer, rest = argv[0], argv[1:]
    if trainer == "clip_train":
        from clip_train.__main__ import main as clip_train_main

        _clock_clip_train()
        code = clip_train_main(rest)
    else:
        _patch_open_clip()
        from open_clip_train.main import main as open_clip_main

        result = open_clip_main(_register_model_config(rest))
        code = 0 if result is None else 1  # main() returns -1 when it refuses to start
    _write_peak_memory(trainer)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
