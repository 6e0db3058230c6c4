"""`python -m clip_train train` with injected faults, for test_checkpoint.py and test_remote.py:
  --nan-steps 3,4   the loss of these steps (1-based) is NaN
  --kill-at-step 7  rank 0 SIGKILLs itself when step 7 starts (no cleanup, as a node loss would)
  --attn-dropout 0.2  attention dropout of this probability in every transformer block of both
                      towers (open_clip's model configs have no such key): train-time randomness
  --kill-in-upload 2  the main process is SIGKILLed once the first file of its 2nd checkpoint
                      upload (train.remote_dir) is in the bucket: a half-uploaded checkpoint
  --upload-delay-s 1  every file upload to train.remote_dir first sleeps this long (a slow network)
(the last two through upload_with_faults.py, the upload process)
Everything after the options goes to `clip-train train`."""

import argparse
import os
import signal
import sys
import tempfile

import torch

import clip_train.remote as remote
import clip_train.train as trainer
from clip_train.__main__ import main

parser = argparse.ArgumentParser()
parser.add_argument("--nan-steps", default="")
parser.add_argument("--kill-at-step", type=int, default=0)
parser.add_argument("--kill-in-upload", type=int, default=0)
parser.add_argument("--upload-delay-s", type=float, default=0.0)
parser.add_argument("--attn-dropout", type=float, default=0.0)
args, rest = parser.parse_known_args()
nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
calls = {"n": 0}
real_loss, real_step, real_build = trainer.contrastive_loss, trainer.train_step, trainer.build_model


def loss(*a, **k):
    out = real_loss(*a, **k)
    return out * float("nan") if calls["n"] in nan_steps else out


def step(*a, **k):
    calls["n"] += 1
    if calls["n"] == args.kill_at_step and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(*a, **k)


def build(*a, **k):
    bundle = real_build(*a, **k)
    for module in bundle.model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = args.attn_dropout  # used by its forward in training mode only
    return bundle


trainer.contrastive_loss, trainer.train_step = loss, step
if args.attn_dropout:
    trainer.build_model = build
if args.kill_in_upload or args.upload_delay_s:
    counter = tempfile.mkstemp(prefix="uploads-")[1]
    remote.UPLOAD_COMMAND = [sys.executable, "tests/helpers/upload_with_faults.py", "--counter", counter,
                             "--kill-in-upload", str(args.kill_in_upload), "--upload-delay-s", str(args.upload_delay_s)]
sys.exit(main(["train", *rest]))
