"""Does training stall while a checkpoint uploads to a bucket (train.remote_dir)?

Trains the demo config's model (configs/demo.yaml: demo-vit, 64 samples per process, chunk 32) in
one process on the demo digits (written to a temp folder), with a checkpoint every `--every`
steps uploaded to a local S3 server (moto's `moto_server`, a separate process on 127.0.0.1). A
remote server costs the training machine no CPU; a local one does, so it runs at the lowest CPU
priority, or with `--pin` on the last CPU while the trainer (and its data workers) keep the
others. Logged every step. Reports the checkpoint size, each
upload's duration, the synchronous local save, and the median step time of the steps during which
an upload was in flight versus the other steps (the step right after a save is left out of both:
it carries the local save, which is not the upload). An upload is in flight from the hand-over
to the upload process until that process ends. Then it uploads the last checkpoint again with
training stopped and reports the wall time and the upload process's CPU time.

A local server measures our side (threads, CPU, the trainer's stalls), not a real network: an
upload to S3 or GCS takes size / bandwidth instead.

    pip install 'moto[server]' s3fs      # in the dev extra
    python benchmarks/remote_sync.py --steps 80 --every 20 [--pin] [--in-thread]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--in-thread", action="store_true",
                        help="upload from the trainer's thread instead of a child process (the first design)")
    parser.add_argument("--pin", action="store_true",
                        help="server on the last CPU, this process on the others (instead of nice 19)")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) > 1:
        os.sched_setaffinity(0, cpus[:-1])

    def server_priority() -> None:
        if args.pin and len(cpus) > 1:
            os.sched_setaffinity(0, cpus[-1:])
        else:
            os.nice(19)

    tmp = Path(tempfile.mkdtemp(prefix="remote-sync-bench-"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=server_priority)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "NO_PROXY": "127.0.0.1"})
    try:
        run(args, tmp, port)
    finally:
        server.terminate()


def run(args, tmp: Path, port: int) -> None:
    import clip_train.remote as remote
    import clip_train.train as trainer
    from clip_train.config import load_config
    from clip_train.demo import make_demo_main

    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    fs, _ = remote.open_remote("s3://bench")
    fs.mkdir("bench")
    make_demo_main(["--output", str(tmp / "demo_data")])
    cfg = load_config("configs/demo.yaml", [
        f"data.train={tmp}/demo_data/train/train-{{000000..000003}}.tar", f"train.steps={args.steps}",
        f"train.checkpoint_every_steps={args.every}", "train.log_every_steps=1", f"train.output_dir={tmp}/run",
        "train.remote_dir=s3://bench/run", "train.keep_checkpoints=2", "optim.warmup_steps=5",
        "eval.zeroshot=null", "eval.classnames=null", "eval.templates=null", "eval.retrieval=null"])

    if args.in_thread:
        init = remote.Uploader.__init__
        remote.Uploader.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "in_child": False})
    uploads, saves = [], []
    real_upload, real_save = remote.Uploader._upload, trainer.save_checkpoint

    def timed_upload(self, work):
        t0 = time.time()
        size = sum(p.stat().st_size for p in work.checkpoint[1].rglob("*")) if work.checkpoint else 0
        real_upload(self, work)
        uploads.append((t0, time.time(), size))

    def timed_save(*a, **k):
        t0 = time.time()
        out = real_save(*a, **k)
        saves.append((t0, time.time()))
        return out

    remote.Uploader._upload, trainer.save_checkpoint = timed_upload, timed_save
    trainer.train(cfg)
    remote.Uploader._upload = real_upload
    last = sorted((tmp / "run" / "checkpoints").glob("step_*"))[-1]
    up = remote.Uploader(fs, "bench/alone", "s3://bench/alone", keep=1, max_backoff_s=1)
    children0, wall0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    up.submit(checkpoint=(0, last))
    up.wait_idle(600)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    alone = {"upload_alone_s": time.perf_counter() - wall0,
             "upload_alone_cpu_s": children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime}
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["time"] - cfg.train.local_batch_size / r["samples_per_s_per_process"], r["time"])
             for r in rows if "samples_per_s" in r]
    after_save = {s + 1 for s in range(args.every, args.steps + 1, args.every)}
    during, other = [], []
    for step, start, end in steps[3:]:  # the first steps warm up
        if step in after_save:
            continue
        overlap = sum(max(0.0, min(end, u1) - max(start, u0)) for u0, u1, _ in uploads)
        (during if overlap > 0.5 * (end - start) else other).append(end - start)
    result = {
        "checkpoint_mb": max(u[2] for u in uploads) / 1e6 if uploads else None,
        "upload_s": [round(u1 - u0, 2) for u0, u1, _ in uploads],
        "local_save_s": [round(s1 - s0, 2) for s0, s1 in saves],
        "median_step_s_upload_in_flight": statistics.median(during) if during else None,
        "steps_upload_in_flight": len(during),
        "median_step_s_no_upload": statistics.median(other) if other else None,
        "steps_no_upload": len(other),
        **alone,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
