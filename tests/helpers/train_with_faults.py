"""`python -m clip_train train` with injected faults, for test_checkpoint.py, test_remote.py and
test_recovery.py:
  --nan-steps 3,4   the loss of these steps (1-based) is NaN
  --kill-at-step 7  a process SIGKILLs itself when step 7 starts (no cleanup, as a node loss would)
  --hang-at-step 5  a process blocks forever when step 5 starts (a dead mount, a stuck peer)
  --hang-how sleep  how it blocks: sleep (in C, the GIL released) | gil (in C, holding the GIL) |
                    mixed (rank 0 holding the GIL, the others sleeping)
  --fail-at-step 7  every process raises an error when step 7 starts, on every attempt
  --slow-data-s 0.2 the faulty process waits this long more for every batch (a slow loader)
  --fault-rank 0    which process the kill, hang and slow-data faults hit (a rank, or "all")
  --first-attempt-only  kill and hang only on the launcher's first attempt
                        (TORCHELASTIC_RESTART_COUNT=0), so that a restart can recover
  --attn-dropout 0.2  attention dropout of this probability in every transformer block of both
                      towers (open_clip's model configs have no such key): train-time randomness
  --kill-in-upload 2  the main process is SIGKILLed once the first file of its 2nd checkpoint
                      upload (train.remote_dir) is in the bucket: a half-uploaded checkpoint
  --upload-delay-s 1  every file upload to train.remote_dir first sleeps this long (a slow network)
(the last two through upload_with_faults.py, the upload process)
  --fork-log DIR    not a fault: before every fork (a loader's workers) and at exit, each process
                    appends how many of torch's autograd device threads it has ("fork N", "exit N")
                    to DIR/forks-rank<R>.txt
Steps are the run's step numbers (a resumed run's first step is the checkpoint's step + 1).
Everything after the options goes to `clip-train train`."""

import argparse
import atexit
import ctypes
import os
import signal
import sys
import tempfile
import time

import torch

import clip_train.remote as remote
import clip_train.train as trainer
from clip_train.__main__ import main

parser = argparse.ArgumentParser()
parser.add_argument("--nan-steps", default="")
parser.add_argument("--kill-at-step", type=int, default=0)
parser.add_argument("--hang-at-step", type=int, default=0)
parser.add_argument("--hang-how", choices=("sleep", "gil", "mixed"), default="sleep")
parser.add_argument("--fail-at-step", type=int, default=0)
parser.add_argument("--slow-data-s", type=float, default=0.0)
parser.add_argument("--fault-rank", default="0")
parser.add_argument("--first-attempt-only", action="store_true")
parser.add_argument("--kill-in-upload", type=int, default=0)
parser.add_argument("--upload-delay-s", type=float, default=0.0)
parser.add_argument("--attn-dropout", type=float, default=0.0)
parser.add_argument("--fork-log", default="")
args, rest = parser.parse_known_args()
nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
rank = int(os.environ.get("RANK", "0"))
faulty = args.fault_rank == "all" or int(args.fault_rank) == rank
if args.first_attempt_only and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
    faulty = False
current = {"step": 0}  # the step being run (1-based), read from the learning-rate schedule's call
real_loss, real_step, real_lr_at, real_to_device = (trainer.contrastive_loss, trainer.train_step, trainer.lr_at,
                                                    trainer.batch_to_device)
real_build = trainer.build_model


def lr_at(step, *a, **k):
    current["step"] = step + 1
    return real_lr_at(step, *a, **k)


def loss(*a, **k):
    out = real_loss(*a, **k)
    return out * float("nan") if current["step"] in nan_steps else out


def hang_in_step() -> None:
    """Block forever inside C code: time.sleep releases the GIL; libc's sleep called through
    ctypes.PyDLL keeps holding it (no other Python thread of this process runs again)."""
    print(f"FAULT rank {rank} hangs in step {current['step']} at {time.time()}", file=sys.stderr, flush=True)
    if args.hang_how == "gil" or (args.hang_how == "mixed" and rank == 0):
        while True:
            ctypes.PyDLL(None).sleep(3600)
    while True:
        time.sleep(3600)


def step(*a, **k):
    if faulty and current["step"] == args.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    if faulty and current["step"] == args.hang_at_step:
        hang_in_step()
    if current["step"] == args.fail_at_step:
        raise RuntimeError(f"injected failure at step {current['step']}")
    return real_step(*a, **k)


def to_device(*a, **k):
    if faulty and args.slow_data_s:
        time.sleep(args.slow_data_s)
    return real_to_device(*a, **k)


def build(*a, **k):
    bundle = real_build(*a, **k)
    for module in bundle.model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = args.attn_dropout  # used by its forward in training mode only
    return bundle


trainer.contrastive_loss, trainer.train_step, trainer.lr_at, trainer.batch_to_device = loss, step, lr_at, to_device
if args.attn_dropout:
    trainer.build_model = build
if args.kill_in_upload or args.upload_delay_s:
    # In the nearest folder above the run's output directory that exists (the test's own temporary
    # folder), not in /tmp: a process killed on purpose never removes it.
    folder = next((a.split("=", 1)[1] for a in rest if a.startswith("train.output_dir=")), None)
    if folder is not None:
        folder = os.path.dirname(os.path.abspath(folder))
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
    counter = tempfile.mkstemp(prefix="uploads-", dir=folder)[1]
    remote.UPLOAD_COMMAND = [sys.executable, "tests/helpers/upload_with_faults.py", "--counter", counter,
                             "--kill-in-upload", str(args.kill_in_upload), "--upload-delay-s", str(args.upload_delay_s)]


def autograd_threads() -> int:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read())
        except OSError:  # a thread that ended meanwhile
            pass
    return sum(name.startswith("pt_autograd") for name in names)


def log_threads(what: str) -> None:
    with open(os.path.join(args.fork_log, f"forks-rank{rank}.txt"), "a") as f:
        f.write(f"{what} {autograd_threads()}\n")


if args.fork_log:
    os.register_at_fork(before=lambda: log_threads("fork"))
    atexit.register(log_threads, "exit")
sys.exit(main(["train", *rest]))
