"""The upload process of clip_train.remote with injected faults, started by train_with_faults.py:
  --upload-delay-s 1   every file upload first sleeps this long (a slow network)
  --kill-in-upload 2   SIGKILL the trainer (this process's parent) and this process once the first
                       file of the run's 2nd checkpoint upload is in the bucket: a half upload
  --counter FILE       counts the run's checkpoint uploads across upload processes
The last argument is the job, as for `python -m clip_train.remote`."""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import clip_train.remote as remote

parser = argparse.ArgumentParser()
parser.add_argument("--upload-delay-s", type=float, default=0.0)
parser.add_argument("--kill-in-upload", type=int, default=0)
parser.add_argument("--counter", default="")
args, rest = parser.parse_known_args()
real_put = remote.put_file
first_file = [True]


def put(fs, local, rpath):
    time.sleep(args.upload_delay_s)
    real_put(fs, local, rpath)
    if args.kill_in_upload and Path(local).parent.name.startswith("step_") and first_file[0]:
        first_file[0] = False
        counter = Path(args.counter)
        uploads = int(counter.read_text() or "0") + 1 if counter.is_file() else 1
        counter.write_text(str(uploads))
        if uploads == args.kill_in_upload:
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


remote.put_file = put
sys.exit(remote.main(rest))
