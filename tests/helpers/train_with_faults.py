"""`python -m clip_train train` with injected faults, for test_checkpoint.py:
  --nan-steps 3,4   the loss of these steps (1-based) is NaN
  --kill-at-step 7  rank 0 SIGKILLs itself when step 7 starts (no cleanup, as a node loss would)
Everything after the options goes to `clip-train train`."""

import argparse
import os
import signal
import sys

import clip_train.train as trainer
from clip_train.__main__ import main

parser = argparse.ArgumentParser()
parser.add_argument("--nan-steps", default="")
parser.add_argument("--kill-at-step", type=int, default=0)
args, rest = parser.parse_known_args()
nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
calls = {"n": 0}
real_loss, real_step = trainer.contrastive_loss, trainer.train_step


def loss(*a, **k):
    out = real_loss(*a, **k)
    return out * float("nan") if calls["n"] in nan_steps else out


def step(*a, **k):
    calls["n"] += 1
    if calls["n"] == args.kill_at_step and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(*a, **k)


trainer.contrastive_loss, trainer.train_step = loss, step
sys.exit(main(["train", *rest]))
