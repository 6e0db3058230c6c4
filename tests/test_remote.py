"""Checkpoints in a bucket (train.remote_dir), against a real S3 API: moto's standalone server on
127.0.0.1, reached through s3fs like AWS. Uploads with the marker last, keep K, a SIGKILL in the
middle of an upload, exact resume on empty node-local disks (2 processes), a bucket that
disappears, and the stop signal that waits for the upload."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, launch
from test_checkpoint import FAULTS, losses_by_step
from test_train import TINY

from clip_train.checkpoint import list_checkpoints
from clip_train.config import ConfigError, load_config
from clip_train.remote import (
    RemoteSync,
    RemoteSyncError,
    Uploader,
    download_checkpoint,
    list_remote,
    open_remote,
)

pytest.importorskip("moto.server", reason="the bucket tests need `pip install 'moto[server]' s3fs` (the dev extra)")
pytest.importorskip("s3fs")


class RequestLog(logging.Handler):
    """The S3 server's own record of requests, in the order it served them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def requests(self, method: str, needle: str) -> list[int]:
        return [i for i, line in enumerate(self.lines) if f'"{method} ' in line and needle in line]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port of 127.0.0.1; its env reaches s3fs here and in subprocesses."""
    from moto.server import ThreadedMotoServer

    requests = RequestLog()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(requests)  # also keeps werkzeug from printing every request
    werkzeug.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(nowhere), "AWS_SHARED_CREDENTIALS_FILE": str(nowhere),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs, _ = open_remote("s3://any")
    yield type("S3", (), {"env": env, "fs": fs, "requests": requests})
    server.stop()
    werkzeug.removeHandler(requests)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def new_bucket(s3, name: str) -> str:
    s3.fs.mkdir(name)
    return name


def node_local(root: Path) -> str:
    """One output_dir per process, as on nodes without a shared filesystem."""
    return f"train.output_dir={root}/node${{oc.env:RANK}}"


@pytest.mark.slow
def test_sigkill_mid_upload_then_resume_on_empty_disks_is_exact(tmp_path, color_shards, s3):
    bucket = new_bucket(s3, "lost-nodes")
    common = [*TINY, f"data.train={color_shards}", "train.steps=10", "train.local_batch_size=8",
              "train.chunk_size=3", "train.checkpoint_every_steps=4", f"train.remote_dir=s3://{bucket}/run",
              "train.remote_keep_checkpoints=2"]
    first, second = tmp_path / "first", tmp_path / "second"
    # Rank 0 dies (SIGKILL) after the first file of its second upload reached the bucket: step 8,
    # or step 10 if that replaced 8 in the queue while step 4 was still uploading.
    proc = launch([FAULTS, "--kill-in-upload", "2", *common, node_local(first)], env=s3.env)
    assert proc.returncode != 0, proc.stderr[-3000:]
    ckpts = f"{bucket}/run/checkpoints"
    complete, with_files = list_remote(s3.fs, ckpts)
    assert complete == [4] and with_files in ([4, 8], [4, 10])  # half there, not published
    assert sorted(Path(p).name for p in s3.fs.ls(f"{ckpts}/step_00000004")) == [
        "custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"]
    # Rank 1's own disk never held a checkpoint: its part (RNG states) is in rank 0's copy.
    assert not (first / "node1" / "checkpoints").exists() or not any((first / "node1" / "checkpoints").iterdir())
    before = losses_by_step(first / "node0")
    assert max(before) >= 8

    # Every node lost: new, empty disks resume from the bucket and skip the half-uploaded step.
    import shutil

    shutil.rmtree(first)
    proc = launch(["-m", "clip_train", "train", *common, node_local(second), "train.resume=latest"], env=s3.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"downloaded s3://{ckpts}/step_00000004") == 2  # one per disk
    after = losses_by_step(second / "node0")
    assert sorted(after) == list(range(5, 11))
    for step in range(5, max(before) + 1):  # the same losses as the killed run, which was not resumed
        assert after[step] == pytest.approx(before[step], rel=1e-5), (step, after[step], before[step])
    assert after[10] != pytest.approx(after[5], rel=1e-3)  # the losses move, so equality means something

    # Uploads after each checkpoint: 8 (again, now whole) and 10; keep 2 removed step 4.
    assert list_remote(s3.fs, ckpts) == ([8, 10], [8, 10])
    for step in (8, 10):  # the marker is the last request of its checkpoint
        puts = s3.requests.requests("PUT", f"/{ckpts}/step_{step:08d}")
        marker = s3.requests.requests("PUT", f"/{ckpts}/step_{step:08d}.complete")
        assert len(marker) >= 1 and len(puts) > len(marker) and max(puts) == max(marker), step
    for name in ("config.yaml", "open_clip_model.pt", "eval.json"):
        assert s3.fs.size(f"{bucket}/run/{name}") == (second / "node0" / name).stat().st_size, name
    assert s3.fs.cat(f"{bucket}/run/metrics.jsonl") == (second / "node0" / "metrics.jsonl").read_bytes()


def test_bucket_that_disappears_warns_retries_then_stops(tmp_path, color_shards, s3):
    bucket = new_bucket(s3, "vanishing")
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    proc = start_cli(["-m", "clip_train", "train", *TINY, f"data.train={color_shards}", "train.steps=100000",
                      "train.checkpoint_every_steps=2", f"train.output_dir={out}",
                      f"train.remote_dir=s3://{bucket}/run", "train.remote_max_unsynced_s=10"], s3.env, log)
    try:
        wait_for(lambda: list_remote(s3.fs, f"{bucket}/run/checkpoints")[0], proc)
        deadline = time.time() + 60
        while s3.fs.exists(bucket) and time.time() < deadline:  # uploads may land while it goes
            try:
                s3.fs.rm(bucket, recursive=True)
            except OSError:
                time.sleep(0.2)
            s3.fs.invalidate_cache()
    finally:
        stderr = finished(proc, log)
    assert proc.returncode == 2, stderr[-3000:]
    assert "failed (attempt 1:" in stderr and "retrying in" in stderr and "the local copy is kept" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("clip-train: error: train.remote_dir: no upload to s3://vanishing/run succeeded "
                           "for more than 10 s (train.remote_max_unsynced_s; last error: "), last
    assert "Traceback" not in stderr
    assert list_checkpoints(str(out))  # the checkpoints that never reached the bucket are kept


def test_stop_signal_waits_for_the_pending_upload(tmp_path, color_shards, s3):
    bucket = new_bucket(s3, "slow-network")
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    proc = start_cli([FAULTS, "--upload-delay-s", "0.3", *TINY, f"data.train={color_shards}", "train.steps=100000",
                      f"train.output_dir={out}", f"train.remote_dir=s3://{bucket}/run"], s3.env, log)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists(), proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        stderr = finished(proc, log)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop signal received" in stderr and "waiting for the uploads" in stderr
    step = max(losses_by_step(out))
    assert list_remote(s3.fs, f"{bucket}/run/checkpoints")[0] == [step]
    assert s3.fs.cat(f"{bucket}/run/metrics.jsonl") == (out / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("where", ["s3", "path"])
def test_uploader_one_at_a_time_newest_wins_keeps_local_until_uploaded(tmp_path, s3, monkeypatch, where):
    """The same on S3 and on a plain path (a mounted filesystem as remote_dir)."""
    import clip_train.remote as remote

    if where == "s3":
        fs, bucket = s3.fs, new_bucket(s3, "queue")
    else:
        fs, bucket = open_remote(str(tmp_path / "mounted"))
    local = {}
    for step in (1, 2, 3, 4):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / "weights.bin").write_bytes(bytes([step]) * 1000)
        (d / "custom_checkpoint_0.pkl").write_bytes(b"state")
        local[step] = d
    gate, entered, in_flight, most = threading.Event(), threading.Event(), [0], [0]
    real_put = remote.put_file

    def gated_put(fs, path, rpath):
        entered.set()
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        gate.wait(30)
        real_put(fs, path, rpath)
        in_flight[0] -= 1

    monkeypatch.setattr(remote, "put_file", gated_put)
    up = Uploader(fs, f"{bucket}/run", f"s3://{bucket}/run", keep=1, max_backoff_s=1.0, in_child=False)
    up.submit(checkpoint=(1, local[1]))
    assert entered.wait(30)  # step 1 is in flight, held at the gate
    up.submit(checkpoint=(2, local[2]))
    up.submit(checkpoint=(3, local[3]))  # replaces 2 in the single waiting slot
    assert up.unsynced_steps() == {1, 3}  # what local pruning must spare
    assert up.unsynced_since() is not None
    gate.set()
    assert up.wait_idle(60)
    assert up.uploaded == [1, 3] and most[0] == 1  # never two uploads at once
    assert up.unsynced_steps() == set() and up.unsynced_since() is None
    assert list_remote(fs, f"{bucket}/run/checkpoints") == ([3], [3])  # keep=1
    # A half upload (no marker) is never a candidate and is cleaned up by the next upload.
    fs.makedirs(f"{bucket}/run/checkpoints/step_00000002", exist_ok=True)  # a no-op on S3
    fs.pipe(f"{bucket}/run/checkpoints/step_00000002/weights.bin", b"partial")
    assert list_remote(fs, f"{bucket}/run/checkpoints") == ([3], [2, 3])
    up.submit(checkpoint=(4, local[4]))
    assert up.wait_idle(60)
    assert list_remote(fs, f"{bucket}/run/checkpoints") == ([4], [4])
    # Downloads check the sizes the marker lists.
    got = download_checkpoint(fs, f"{bucket}/run/checkpoints", 4, tmp_path / "dl" / "step_00000004")
    assert (got / "weights.bin").read_bytes() == bytes([4]) * 1000
    fs.pipe(f"{bucket}/run/checkpoints/step_00000004/weights.bin", b"truncated")
    with pytest.raises(OSError, match="its marker says 1000"):
        download_checkpoint(fs, f"{bucket}/run/checkpoints", 4, tmp_path / "dl2" / "step_00000004")
    assert not (tmp_path / "dl2" / "step_00000004").exists()


def test_stop_wait_is_bounded_and_names_the_key(tmp_path, s3, monkeypatch):
    import clip_train.remote as remote

    bucket = new_bucket(s3, "stuck")
    real_command = remote.UPLOAD_COMMAND
    monkeypatch.setattr(remote, "UPLOAD_COMMAND", [sys.executable, "-c", "import time; time.sleep(60)"])
    cfg = load_config(None, [f"train.output_dir={tmp_path}", f"train.remote_dir=s3://{bucket}/run",
                             "train.remote_stop_wait_s=0.5"]).train
    accelerator = type("OneProcess", (), {"is_main_process": True, "num_processes": 1, "process_index": 0,
                                          "wait_for_everyone": lambda self: None})()
    syncer = RemoteSync(cfg, accelerator)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"x")
    syncer.checkpoint_saved(tmp_path / "ckpt", 7)
    t0 = time.time()
    with pytest.raises(RemoteSyncError, match=r"train.remote_stop_wait_s: .* checkpoint\(s\) \[7\] are only in"):
        syncer.finish(stopped=True)
    assert time.time() - t0 < 5
    assert syncer.unsynced_steps() == {7} and not syncer.overdue()
    # The stuck upload process was killed; the retry (a working one now) publishes step 7.
    monkeypatch.setattr(remote, "UPLOAD_COMMAND", real_command)
    assert syncer.uploader.wait_idle(60)
    assert list_remote(s3.fs, f"{bucket}/run/checkpoints")[0] == [7]
    # train.resume=<URL of a checkpoint>: downloaded into output_dir/downloaded
    url = f"s3://{bucket}/run/checkpoints/step_00000007"
    other = load_config(None, [f"train.output_dir={tmp_path}/other", f"train.resume={url}"]).train
    got = RemoteSync(other, accelerator).resolve_resume()
    assert got == tmp_path / "other" / "downloaded" / "step_00000007"
    assert (got / "model.safetensors").read_bytes() == b"x"


def test_remote_config_is_validated():
    for override, key in (("train.remote_max_unsynced_s=0", "train.remote_max_unsynced_s"),
                          ("train.remote_keep_checkpoints=0", "train.remote_keep_checkpoints"),
                          ("train.remote_stop_wait_s=-1", "train.remote_stop_wait_s"),
                          ("train.remote_dir=runs/x", "train.remote_dir")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["train.output_dir=runs/x", override])
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"train.remote_dir: .*pip install 'clip-train\[gcs\]'"):
            open_remote("gs://bucket/run")


def start_cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A 1-process run in the background, its stderr in `log` (a pipe nobody reads could fill up)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", **env}
    full_env.pop("WORLD_SIZE", None)
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def finished(proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> str:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        proc.kill()
    return log.read_text()


def wait_for(condition, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the run ended early")
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")
