"""Launched with 2 processes WITHOUT ACCELERATE_USE_CPU by test_train.py: a plain Accelerator()
on a CPU-only machine runs each process alone; the trainer's check must refuse that."""

import sys

from accelerate import Accelerator

from clip_train.train import LaunchError, check_world_size

acc = Accelerator()
print(f"distributed_type={acc.distributed_type.value} num_processes={acc.num_processes}", flush=True)
try:
    check_world_size(acc)
except LaunchError as err:
    print(f"clip-train: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)
