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
from test_train import TINY, run_cli

from clip_train.checkpoint import (
    CheckpointError,
    Disks,
    build_manifest,
    list_checkpoints,
    write_manifest,
)
from clip_train.config import ConfigError, load_config
from clip_train.remote import (
    RemoteSync,
    RemoteSyncError,
    Uploader,
    download_checkpoint,
    list_remote,
    open_remote,
    upload_checkpoint,
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


def fake_checkpoint(path: Path, step: int, data: bytes, name: str = "weights.bin", run_id: str | None = None) -> Path:
    """A small checkpoint directory with its manifest, as save_checkpoint leaves one."""
    path.mkdir(parents=True)
    (path / name).write_bytes(data)
    (path / "custom_checkpoint_0.pkl").write_bytes(b"state")
    write_manifest(path, build_manifest(path, step, run_id))
    return path


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


def test_explicit_resume_that_one_disk_lacks_stops_every_process_in_one_line(tmp_path, color_shards, s3):
    """Issue 25, finding 2 (explicit path): node-local disks with a bucket, train.resume naming a
    checkpoint only rank 0's disk holds. Rank 0 used to load it and wait in a collective until the
    timeout; now every process verifies before training and all stop with the same line."""
    bucket = new_bucket(s3, "one-disk")
    root = tmp_path / "nodes"
    ckpt = fake_checkpoint(root / "node0" / "checkpoints" / "step_00000004", 4, b"w" * 100, run_id="r")
    # The same path names another disk on each node: node${RANK} stands for it on this machine.
    per_node = f"{root}/node${{oc.env:RANK}}/checkpoints/step_00000004"
    proc = launch(["-m", "clip_train", "train", *TINY, f"data.train={color_shards}", "train.steps=6",
                   node_local(root), f"train.remote_dir=s3://{bucket}/run", f"train.resume={per_node}"], env=s3.env)
    assert proc.returncode != 0
    line = (f"clip-train: error: train.resume: on rank 1: {str(ckpt).replace('node0', 'node1')}: "
            "not on this process's disk")
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]  # the same line from both processes
    assert f'File "{REPO}/clip_train' not in proc.stderr  # no traceback of ours (the launcher prints its own)
    assert not (root / "node0" / "metrics.jsonl").exists()


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


def test_stop_signal_to_the_whole_job_waits_for_the_upload_in_flight(tmp_path, color_shards, s3):
    """Issue 25, finding 6: SIGTERM to every process of the job (the process group, and the
    upload process itself, as a cluster's stop does) while an upload is in flight: the upload
    process lives on and finishes, the trainer saves, waits for it and the last step is published."""
    bucket = new_bucket(s3, "slow-network")
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    proc = start_cli([FAULTS, "--upload-delay-s", "0.5", *TINY, f"data.train={color_shards}", "train.steps=100000",
                      "train.checkpoint_every_steps=2", f"train.output_dir={out}",
                      f"train.remote_dir=s3://{bucket}/run"], s3.env, log, new_session=True)
    try:
        child = []
        wait_for(lambda: child.extend(upload_children(proc.pid)) or child, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        for pid in child:
            os.kill(pid, signal.SIGTERM)
    finally:
        stderr = finished(proc, log)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop signal received" in stderr and "waiting for the uploads" in stderr
    assert "failed (attempt" not in stderr, stderr[-3000:]  # the upload in flight was not killed
    step = max(losses_by_step(out))
    assert list_remote(s3.fs, f"{bucket}/run/checkpoints")[0][-1] == step
    assert s3.fs.cat(f"{bucket}/run/metrics.jsonl") == (out / "metrics.jsonl").read_bytes()


def upload_children(parent: int) -> list[int]:
    """The upload processes (tests/helpers/upload_with_faults.py) the trainer `parent` started."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"upload_with_faults.py" in cmdline:
            found.append(int(entry.name))
    return found


def test_nothing_is_published_over_a_good_copy_and_pruning_goes_by_identity(tmp_path, s3):
    """Issue 25, finding 4: a missing, empty or unfinished local checkpoint is never published
    (it used to publish {"files": {}} as complete, and the prune then deleted the only good
    copy); the upload thread drops it with an error instead of retrying forever; the remote prune
    removes this run's older checkpoints only."""
    import clip_train.remote as remote

    bucket = new_bucket(s3, "lagging")
    root, ckpts = f"{bucket}/run", f"{bucket}/run/checkpoints"

    def upload(step, local, run_id="mine"):
        remote.upload_job(s3.fs, root, (step, str(local)), [], keep=1, published=lambda info: None, run_id=run_id)

    upload(12, fake_checkpoint(tmp_path / "step_00000012", 12, b"good" * 100, run_id="mine"))
    (tmp_path / "step_00000020").mkdir()
    unfinished = fake_checkpoint(tmp_path / "step_00000024", 24, b"x", run_id="mine")
    (unfinished / "manifest.json").unlink()
    for step, why in ((16, "step_00000016: missing"), (20, "step_00000020/manifest.json: missing"),
                      (24, "step_00000024/manifest.json: missing")):
        with pytest.raises(remote.NothingToPublish, match=why):
            upload(step, tmp_path / f"step_{step:08d}")
        remote.prune_remote(s3.fs, ckpts, keep=1, newest=step, run_id="mine")
        assert list_remote(s3.fs, ckpts) == ([12], [12])
    up = Uploader(s3.fs, root, f"s3://{root}", keep=1, max_backoff_s=1.0, in_child=False, run_id="mine")
    up.submit(checkpoint=(16, tmp_path / "step_00000016"))
    assert up.wait_idle(30) and up.uploaded == [] and up.unsynced_steps() == set()
    assert list_remote(s3.fs, ckpts) == ([12], [12])
    # Another run's checkpoint in the bucket is never pruned by this run, nor this run's by it.
    upload(4, fake_checkpoint(tmp_path / "theirs" / "step_00000004", 4, b"o", run_id="theirs"), run_id="theirs")
    upload(16, fake_checkpoint(tmp_path / "new" / "step_00000016", 16, b"new", run_id="mine"))
    assert list_remote(s3.fs, ckpts)[0] == [4, 16]  # keep=1: this run's 12 went, theirs stayed


@pytest.mark.slow
def test_damaged_checkpoints_in_the_bucket_fall_back_on_empty_disks(tmp_path, color_shards, s3):
    """Issue 22, in the bucket: a truncated file (step 8), a flipped byte (step 6) and a missing
    file (step 4); a resume on an empty disk skips each (download verified against the marker)
    and follows the uninterrupted run from step 2; an explicit resume of step 8 is one line."""
    bucket = new_bucket(s3, "flaky")
    ckpts = f"{bucket}/run/checkpoints"
    common = [*TINY, "train.local_batch_size=8", "train.chunk_size=4", f"data.train={color_shards}",
              "train.steps=8", "train.checkpoint_every_steps=2", "train.keep_checkpoints=4",
              "train.remote_keep_checkpoints=4", f"train.remote_dir=s3://{bucket}/run"]
    straight, fresh = tmp_path / "straight", tmp_path / "fresh"
    proc = run_cli(["train", *common, f"train.output_dir={straight}"], env=s3.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The uploader keeps only the newest waiting checkpoint (one that arrives while another is in
    # flight replaces it), so on a slow machine a step may never reach the bucket: publish those
    # from the run's own disk, as the uploader would have.
    for step in sorted({2, 4, 6, 8} - set(list_remote(s3.fs, ckpts)[0])):
        upload_checkpoint(s3.fs, ckpts, straight / "checkpoints" / f"step_{step:08d}", step)
    assert list_remote(s3.fs, ckpts)[0] == [2, 4, 6, 8]
    model8 = s3.fs.cat(f"{ckpts}/step_00000008/model.safetensors")
    s3.fs.pipe(f"{ckpts}/step_00000008/model.safetensors", model8[: len(model8) // 2])
    optim6 = bytearray(s3.fs.cat(f"{ckpts}/step_00000006/optimizer.bin"))
    optim6[len(optim6) // 3] ^= 0x01
    s3.fs.pipe(f"{ckpts}/step_00000006/optimizer.bin", bytes(optim6))
    s3.fs.rm(f"{ckpts}/step_00000004/random_states_0.pkl")

    url = f"s3://{ckpts}/step_00000008"
    cfg = load_config(None, [f"train.output_dir={tmp_path}/explicit", f"train.resume={url}"]).train
    one = type("OneProcess", (), {"is_main_process": True, "num_processes": 1, "process_index": 0,
                                  "wait_for_everyone": lambda self: None})()
    with pytest.raises(RemoteSyncError, match=rf"^train.resume: download of {url} failed: "
                                              rf"{ckpts}/step_00000008/model.safetensors: \d+ bytes, manifest.json says"):
        RemoteSync(cfg, one).decide(Disks(leader=True, shared=True))

    proc = run_cli(["train", *common, f"train.output_dir={fresh}", "train.resume=latest"], env=s3.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step, name, reason in ((8, "model.safetensors", "bytes, manifest.json says"), (6, "optimizer.bin", "CRC32"),
                               (4, "random_states_0.pkl", "missing (listed in its marker)")):
        line = next(x for x in proc.stderr.splitlines() if f"skipping {fresh}/checkpoints/step_{step:08d}" in x)
        assert f"s3://{ckpts}: {ckpts}/step_{step:08d}/{name}: " in line and reason in line, line
    assert f"resumed from {fresh}/checkpoints/step_00000002 at step 2" in proc.stderr
    want, got = losses_by_step(straight), losses_by_step(fresh)
    assert sorted(got) == list(range(3, 9))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    assert list_remote(s3.fs, ckpts)[0][-1] == 8  # published again, whole


@pytest.mark.parametrize("where", ["s3", "path"])
def test_uploader_one_at_a_time_newest_wins_keeps_local_until_uploaded(tmp_path, s3, monkeypatch, where):
    """The same on S3 and on a plain path (a mounted filesystem as remote_dir)."""
    import clip_train.remote as remote

    if where == "s3":
        fs, bucket = s3.fs, new_bucket(s3, "queue")
    else:
        fs, bucket = open_remote(str(tmp_path / "mounted"))
    local = {step: fake_checkpoint(tmp_path / f"step_{step:08d}", step, bytes([step]) * 1000)
             for step in (1, 2, 3, 4)}
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
    with pytest.raises(CheckpointError, match="weights.bin: 9 bytes, manifest.json says 1000"):
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
    syncer.checkpoint_saved(fake_checkpoint(tmp_path / "ckpt", 7, b"x", "model.safetensors"), 7)
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
    got = RemoteSync(other, accelerator).decide(Disks(leader=True, shared=True)).checkpoint
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


def start_cli(args: list[str], env: dict, log: Path, new_session: bool = False) -> subprocess.Popen:
    """A 1-process run in the background, its stderr in `log` (a pipe nobody reads could fill up);
    new_session: in a process group of its own, as a job (signalled with os.killpg)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", **env}
    full_env.pop("WORLD_SIZE", None)
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=new_session)


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
