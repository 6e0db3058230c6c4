"""Checkpoints in object storage: `train.output_dir` mirrored to an fsspec URL (`train.remote_dir`).

Layout of remote_dir (that of output_dir):
    checkpoints/step_NNNNNNNN/           the files of one checkpoint, every process's part
                                         (checkpoint.save_checkpoint gathers them on the main process)
    checkpoints/step_NNNNNNNN.complete   its marker, written last: the checkpoint's manifest.json
                                         (step, run id, every file's size and CRC32)
    config.yaml, metrics.jsonl           after every checkpoint and at the end
    open_clip_model.pt, eval.json, report.png, report.html   at the end, those that exist

Object stores have no rename, so a checkpoint's prefix is the temporary one until its marker
exists: readers trust marked checkpoints only, a re-upload of a step deletes its marker first, and
pruning deletes the marker before the files. A reader never sees half a checkpoint, and a download
is verified against the marker (sizes and CRC32) before it is renamed into place. A local
directory that is missing, empty or without its manifest is never published; pruning removes only
this run's checkpoints and never the newest complete one.

Writer: `Uploader`, a thread of the main process doing one job at a time (never two uploads of a
run at once), each in a child process (`python -m clip_train.remote JOB`, at a lower CPU priority,
in its own session and deaf to the stop signals a cluster sends every process of a job, so that
the stop can wait for it; killed with the trainer): s3fs's event loop and HTTP client inside the trainer would share its
GIL with the training loop (measured on the demo model, 2 CPU cores: median step +10% while an
upload ran in a thread of the trainer, +2% with the child process; docs/checkpoints.md "Checkpoints in a bucket"). A checkpoint saved while another uploads waits in a single slot, where a newer one
replaces it: the bucket needs the newest, not each one. Failures are warned about and retried with
back-off; local pruning spares checkpoints not yet uploaded; when something has waited longer than
`train.remote_max_unsynced_s` for its upload, `overdue()` turns true and train.py stops the run in
the collective that already decides about stop signals.

Reader: `RemoteSync.decide` hands clip_train.checkpoint.decide_resume a `BucketSource`: the main
process picks the newest checkpoint every process can load (from its disk or the bucket), one
process per disk verifies or downloads it, and a damaged one is skipped for the one before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# Light imports only: the upload child imports this module (accelerate and torch are imported
# where the trainer side needs them).
from clip_train.checkpoint import (
    MANIFEST,
    CheckpointError,
    Disks,
    ResumeDecision,
    claim_output_dir,
    decide_resume,
    is_disk_leader,  # noqa: F401 (importable from here as before)
    one_disk_for_all,  # noqa: F401
    step_name,
    verify_checkpoint,
)
from clip_train.config import ClipTrainError, ConfigError, TrainConfig

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger("clip_train")

MARKER_SUFFIX = ".complete"
_MARKER = re.compile(r"^step_(\d{8})\.complete$")
_STEP = re.compile(r"^step_(\d{8})$")
RUN_FILES = ("config.yaml", "metrics.jsonl")  # uploaded after every checkpoint
FINAL_FILES = ("open_clip_model.pt", "eval.json", "report.png", "report.html")  # at the end
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# How the Uploader starts an upload process; a list, so that tests can start one with faults.
UPLOAD_COMMAND = [sys.executable, "-m", "clip_train.remote"]
REFUSED_RC = 3  # the upload process's exit code for a checkpoint it will not publish
STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}  # what the upload process never dies of


class RemoteSyncError(ClipTrainError):
    """The bucket did not get a safe copy in time, or a checkpoint could not be fetched from it."""


class NothingToPublish(ClipTrainError):
    """A local checkpoint directory that is missing, empty or without its manifest: never
    published (a retry cannot help; publishing it would replace good copies by nothing)."""


def first_line(err: BaseException | str) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def open_remote(url: str, key: str = "train.remote_dir") -> tuple[AbstractFileSystem, str]:
    """(fsspec filesystem, root path) of a URL; a missing backend is one line naming the extra."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as err:
        protocol = url.split("://", 1)[0]
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'clip-train[{extra}]'" if extra else f"install fsspec's backend for {protocol}://"
        raise ConfigError(f"{key}: {url!r} needs a package that is not installed ({hint}): {first_line(err)}") from None
    except ValueError as err:  # an unknown protocol
        raise ConfigError(f"{key}: {url!r}: {first_line(err)}") from None
    return fs, root.rstrip("/")


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def _rm(fs: AbstractFileSystem, path: str, recursive: bool = False) -> None:
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def put_file(fs: AbstractFileSystem, local: Path, remote: str) -> None:
    """Upload one file (module level, so that tests can interpose a kill or a slow network)."""
    fs.put_file(str(local), remote)


def list_remote(fs: AbstractFileSystem, ckpt_root: str) -> tuple[list[int], list[int]]:
    """(steps of complete checkpoints, steps that have files) under `<remote_dir>/checkpoints`."""
    fs.invalidate_cache(ckpt_root)  # another process (a killed run) may have written since
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(ckpt_root, detail=False)]
    except FileNotFoundError:
        return [], []
    complete = sorted(int(m.group(1)) for m in map(_MARKER.match, names) if m)
    with_files = sorted(int(m.group(1)) for m in map(_STEP.match, names) if m)
    return complete, with_files


def upload_checkpoint(fs: AbstractFileSystem, ckpt_root: str, local: Path, step: int) -> int:
    """Upload one checkpoint directory, then publish it with its marker (its manifest); returns
    the bytes sent. NothingToPublish for a directory that is missing, empty or not whole."""
    if not local.is_dir():
        raise NothingToPublish(f"{local}: missing")
    try:
        manifest = verify_checkpoint(local, checksums=False)  # sizes: the CRC32s travel in the marker
    except CheckpointError as err:
        raise NothingToPublish(str(err)) from None
    if int(manifest.get("step", step)) != step:
        raise NothingToPublish(f"{local / MANIFEST}: step {manifest.get('step')}, not {step}")
    remote = f"{ckpt_root}/{step_name(step)}"
    _rm(fs, remote + MARKER_SUFFIX)  # a re-upload of a step unpublishes the old copy first
    _rm(fs, remote, recursive=True)
    if _is_local(fs):  # object stores have no directories (and s3fs's makedirs would create buckets)
        fs.makedirs(remote, exist_ok=True)
    for name in manifest["files"]:
        put_file(fs, local / name, f"{remote}/{name}")
    fs.pipe_file(remote + MARKER_SUFFIX, json.dumps(manifest).encode())
    return sum(e if isinstance(e, int) else e["bytes"] for e in manifest["files"].values())


def read_marker(fs: AbstractFileSystem, ckpt_root: str, step: int) -> dict:
    return json.loads(fs.cat_file(f"{ckpt_root}/{step_name(step)}{MARKER_SUFFIX}"))


def marker_run_ids(fs: AbstractFileSystem, ckpt_root: str, steps) -> dict[int, str | None]:
    """The run id in each complete checkpoint's marker (None: a marker without one)."""
    out = {}
    for step in steps:
        try:
            out[step] = read_marker(fs, ckpt_root, step).get("run_id")
        except (ValueError, FileNotFoundError):
            out[step] = None
    return out


def prune_remote(fs: AbstractFileSystem, ckpt_root: str, keep: int, newest: int, run_id: str | None = None) -> None:
    """Keep this run's last `keep` complete checkpoints, by identity (another run's are never
    removed, nor the newest complete one, nor `newest`, the one just published), and drop
    unpublished leftovers older than `newest`."""
    complete, with_files = list_remote(fs, ckpt_root)
    owners = marker_run_ids(fs, ckpt_root, complete)
    ours = [s for s in complete if owners[s] == run_id]
    protect = {newest, max(complete, default=newest)}
    for step in ours[:-keep]:
        if step not in protect:
            _rm(fs, f"{ckpt_root}/{step_name(step)}{MARKER_SUFFIX}")  # unpublish before deleting
            _rm(fs, f"{ckpt_root}/{step_name(step)}", recursive=True)
    for step in with_files:  # partial uploads of a killed run
        if step < newest and step not in complete:
            _rm(fs, f"{ckpt_root}/{step_name(step)}", recursive=True)


def download_checkpoint(fs: AbstractFileSystem, ckpt_root: str, step: int, dest: Path) -> Path:
    """Fetch a complete checkpoint into `dest` through a temporary directory that is verified
    against the marker (sizes and CRC32; CheckpointError naming the bad file) and then renamed
    into place. A damaged copy already at `dest` is set aside (.damaged-*), not deleted."""
    remote = f"{ckpt_root}/{step_name(step)}"
    marker_bytes = fs.cat_file(remote + MARKER_SUFFIX)
    marker = json.loads(marker_bytes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-download-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        for name in marker["files"]:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{remote}/{name}", str(tmp / name))
            except FileNotFoundError:
                raise CheckpointError(f"{remote}/{name}: missing (listed in its marker)") from None
        (tmp / MANIFEST).write_bytes(marker_bytes)
        try:
            verify_checkpoint(tmp)
        except CheckpointError as err:  # name the object, not the temporary file
            raise CheckpointError(str(err).replace(str(tmp), remote)) from None
        if dest.is_dir():
            try:
                verify_checkpoint(dest)
                return dest  # another process on this disk was first
            except CheckpointError:
                os.replace(dest, dest.parent / f".damaged-{dest.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another process on this disk was first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def with_retries(fn, what: str, tries: int = 4, first_delay_s: float = 1.0):
    """fn() with warnings and exponential back-off between tries (reads at start-up)."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except ClipTrainError:
            raise  # a damaged or refused checkpoint: trying again cannot help
        except Exception as err:
            if attempt == tries:
                raise
            delay = first_delay_s * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d of %d: %s); retrying in %.0f s", what, attempt, tries,
                        first_line(err), delay)
            time.sleep(delay)


@dataclass
class _Work:
    checkpoint: tuple[int, Path] | None = None  # (step, local directory)
    files: set[Path] = field(default_factory=set)
    since: float | None = None  # when its oldest part was handed over

    def empty(self) -> bool:
        return self.checkpoint is None and not self.files


class Uploader:
    """The main process's upload thread: one job at a time, retried with back-off until it succeeds."""

    def __init__(self, fs: AbstractFileSystem, root: str, url: str, keep: int, max_backoff_s: float,
                 in_child: bool = True, run_id: str | None = None):
        self.fs, self.root, self.url, self.keep = fs, root, url, keep
        self.run_id = run_id  # remote pruning removes this run's checkpoints only
        self.max_backoff_s = max_backoff_s
        self.in_child = in_child  # False: the I/O in this thread (tests interpose on put_file)
        self._child: subprocess.Popen | None = None
        self.last_error: str | None = None
        self.uploaded: list[int] = []
        self._cond = threading.Condition()
        self._pending, self._active = _Work(), _Work()
        self._thread: threading.Thread | None = None

    def submit(self, checkpoint: tuple[int, Path] | None = None, files=()) -> None:
        with self._cond:
            pending = self._pending
            if checkpoint is not None:
                if pending.checkpoint is not None:
                    log.info("step %d replaces step %d in the upload queue (an upload is in flight)",
                             checkpoint[0], pending.checkpoint[0])
                pending.checkpoint = checkpoint
            pending.files.update(Path(f) for f in files)
            if pending.since is None and not pending.empty():
                pending.since = time.time()
            if self._thread is None:
                # A daemon: a crashed run exits without waiting for a bucket that may never answer.
                self._thread = threading.Thread(target=self._run, name="clip-train-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def unsynced_since(self) -> float | None:
        with self._cond:
            times = [w.since for w in (self._active, self._pending) if not w.empty() and w.since is not None]
            return min(times, default=None)

    def unsynced_steps(self) -> set[int]:
        with self._cond:
            return {w.checkpoint[0] for w in (self._active, self._pending) if w.checkpoint is not None}

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._active.empty() and self._pending.empty(), timeout_s)

    def _run(self) -> None:
        # Stop signals are the main thread's (StopRequest); blocked here, they stay blocked in the
        # upload processes this thread starts, from their first instruction (the child then
        # ignores them too): a job-wide SIGTERM cannot kill an upload the stop is waiting for.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: not self._pending.empty())
                self._active, self._pending = self._pending, _Work()
            attempt = 0
            while True:
                try:
                    self._upload(self._active)
                    break
                except NothingToPublish as err:
                    log.error("not publishing step %d to %s: %s", self._active.checkpoint[0], self.url,
                              first_line(err))
                    with self._cond:
                        self._active.checkpoint = None  # the run's files are still uploaded
                except Exception as err:
                    attempt += 1
                    self.last_error = first_line(err)
                    delay = min(self.max_backoff_s, 0.5 * 2 ** attempt)
                    what = (f"step {self._active.checkpoint[0]}" if self._active.checkpoint
                            else ", ".join(sorted(f.name for f in self._active.files)))
                    log.warning("upload of %s to %s failed (attempt %d: %s); retrying in %.1f s, "
                                "the local copy is kept", what, self.url, attempt, self.last_error, delay)
                    time.sleep(delay)
                    with self._cond:  # a newer checkpoint that came meanwhile is the one to retry
                        self._active = _merge(self._active, self._pending)
                        self._pending = _Work()
            with self._cond:
                self._active = _Work()
                self.last_error = None
                self._cond.notify_all()

    def abort(self) -> None:
        """Kill the upload process in flight (the local copy stays; the job is retried)."""
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()

    def _upload(self, work: _Work) -> None:
        checkpoint = (work.checkpoint[0], str(work.checkpoint[1])) if work.checkpoint else None
        files = [str(f) for f in sorted(work.files)]

        def published(info: dict) -> None:
            log.info("uploaded step %d to %s/checkpoints (%.1f MB in %.1f s)", info["published"], self.url,
                     info["bytes"] / 1e6, info["seconds"])
            with self._cond:
                work.checkpoint = None  # published: a retry of the rest does not upload it again
                self.uploaded.append(info["published"])

        if not self.in_child:
            upload_job(self.fs, self.root, checkpoint, files, self.keep, published, self.run_id)
        else:
            job = {"url": self.url, "checkpoint": checkpoint, "files": files, "keep": self.keep,
                   "parent": os.getpid(), "run_id": self.run_id}
            # Its own session: a stop signal sent to the job's process group does not reach it (and
            # it ignores SIGTERM/SIGUSR1 besides, for signals sent to every process of a job).
            self._child = subprocess.Popen([*UPLOAD_COMMAND, json.dumps(job)], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, start_new_session=True)
            out, err = self._child.communicate()
            for line in out.splitlines():
                if line.startswith("{"):
                    published(json.loads(line))
            if self._child.returncode == REFUSED_RC:
                lines = err.strip().splitlines()
                raise NothingToPublish(lines[-1] if lines else "refused")
            if self._child.returncode != 0:
                lines = err.strip().splitlines()
                raise OSError(lines[-1] if lines else f"upload process ended with {self._child.returncode}")
        with self._cond:
            work.files.clear()


def upload_job(fs: AbstractFileSystem, root: str, checkpoint: tuple[int, str] | None, files: list[str],
               keep: int, published, run_id: str | None = None) -> None:
    """One upload job: the checkpoint and its marker (then `published({...})`), pruning, the run's
    files. A checkpoint it refuses (NothingToPublish) leaves the bucket as it was."""
    if checkpoint is not None:
        step, local = checkpoint
        t0 = time.perf_counter()
        size = upload_checkpoint(fs, f"{root}/checkpoints", Path(local), step)
        published({"published": step, "bytes": size, "seconds": time.perf_counter() - t0})
        prune_remote(fs, f"{root}/checkpoints", keep, newest=step, run_id=run_id)
    for path in map(Path, files):
        if path.is_file():
            put_file(fs, path, f"{root}/{path.name}")


def main(argv: list[str] | None = None) -> int:
    """The upload process: `python -m clip_train.remote JOB_JSON` (started by Uploader)."""
    job = json.loads((sys.argv[1:] if argv is None else argv)[-1])
    # A cluster's stop signal goes to every process of the job: the trainer saves and waits for
    # this upload (train.remote_stop_wait_s), so this process must not die of it.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _die_with(job["parent"])
    os.nice(10)  # the training loop comes first on a busy CPU
    try:
        fs, root = open_remote(job["url"])
        upload_job(fs, root, job["checkpoint"], job["files"], job["keep"],
                   lambda info: print(json.dumps(info), flush=True), job.get("run_id"))
    except NothingToPublish as err:
        print(first_line(err), file=sys.stderr)
        return REFUSED_RC
    except Exception as err:
        print(first_line(err), file=sys.stderr)
        return 1
    return 0


def _die_with(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the trainer dies, as a node loss would end the upload."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the trainer died before prctl
        os._exit(1)


def _merge(old: _Work, new: _Work) -> _Work:
    times = [t for t in (old.since, new.since) if t is not None]
    return _Work(checkpoint=new.checkpoint or old.checkpoint, files=old.files | new.files,
                 since=min(times, default=None))


def _gather(accelerator, value) -> list:
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


class BucketSource:
    """The bucket as clip_train.checkpoint.decide_resume and claim_output_dir see it (every
    method but fetch runs on the main process)."""

    def __init__(self, fs: AbstractFileSystem, ckpt_root: str, shown: str):
        self.fs, self.ckpt_root, self.shown = fs, ckpt_root, shown

    def complete_steps(self) -> list[int]:
        return with_retries(lambda: list_remote(self.fs, self.ckpt_root)[0], f"listing {self.shown}")

    def run_ids(self) -> dict[int, str | None]:
        return marker_run_ids(self.fs, self.ckpt_root, self.complete_steps())

    def fetch(self, step: int, target: Path) -> None:
        what = f"download of {self.shown}/{step_name(step)}"
        t0 = time.perf_counter()
        with_retries(lambda: download_checkpoint(self.fs, self.ckpt_root, step, target), what)
        log.warning("downloaded %s/%s to %s in %.1f s", self.shown, step_name(step), target, time.perf_counter() - t0)

    def set_aside(self, runs: dict[int, str | None], how: str) -> None:
        """archive: move each checkpoint (marker first) under <remote_dir>/archive/<run id>/; remove: delete."""
        archive = self.ckpt_root.rsplit("/", 1)[0] + "/archive"
        for step, run_id in sorted(runs.items()):
            src = f"{self.ckpt_root}/{step_name(step)}"
            marker = self.fs.cat_file(src + MARKER_SUFFIX)
            _rm(self.fs, src + MARKER_SUFFIX)  # unpublished first: never half a checkpoint
            if how == "archive":
                dest = f"{archive}/{run_id or 'unknown'}/checkpoints/{step_name(step)}"
                for name in json.loads(marker)["files"]:
                    self.fs.copy(f"{src}/{name}", f"{dest}/{name}")
                self.fs.pipe_file(dest + MARKER_SUFFIX, marker)
            _rm(self.fs, src, recursive=True)


class RemoteSync:
    """What train.py calls: the resume decision (from the disks and the bucket), then uploads
    after each checkpoint, at a stop and at the end. Without train.remote_dir (and a URL in
    train.resume) it decides from the disks alone and uploads nothing."""

    def __init__(self, cfg: TrainConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.url = cfg.remote_dir.rstrip("/") if cfg.remote_dir else None
        self.uploader: Uploader | None = None
        if self.url is None:
            return
        self.fs, self.root = open_remote(self.url)
        if accelerator.is_main_process:
            self.uploader = Uploader(self.fs, self.root, self.url,
                                     keep=cfg.remote_keep_checkpoints or cfg.keep_checkpoints,
                                     max_backoff_s=min(60.0, max(0.5, cfg.remote_max_unsynced_s / 4)))

    # ---- resume ----------------------------------------------------------------------------
    def decide(self, disks: Disks) -> ResumeDecision:
        """The one resume decision (clip_train.checkpoint.decide_resume) with this run's bucket,
        then the claim of output_dir (and the bucket) for the run it names. Collective."""
        cfg, accelerator = self.cfg, self.accelerator
        bucket = BucketSource(self.fs, f"{self.root}/checkpoints", f"{self.url}/checkpoints") if self.url else None
        explicit = None
        if cfg.resume is not None and "://" in cfg.resume:
            explicit = self._download_url(cfg.resume, disks.leader)
        decision = decide_resume(accelerator, cfg.resume, cfg.output_dir, disks.leader, bucket, explicit)
        claim_output_dir(accelerator, cfg.output_dir, decision, cfg.overwrite, bucket)
        if self.uploader is not None:
            self.uploader.run_id = decision.run_id
        return decision

    def _download_url(self, url: str, leader: bool) -> Path:
        """train.resume=s3://.../checkpoints/step_N: download it (every disk) into output_dir/downloaded."""
        fs, path = open_remote(url, "train.resume")
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        match = _STEP.match(name)
        if match is None:
            raise ConfigError(f"train.resume: {url!r} is not a checkpoint URL (it ends in step_NNNNNNNN)")
        target = Path(self.cfg.output_dir) / "downloaded" / name
        error = None
        if leader:
            shutil.rmtree(target, ignore_errors=True)  # the URL may name another run's step N
            what = f"download of {url}"
            try:
                t0 = time.perf_counter()
                with_retries(lambda: download_checkpoint(fs, parent, int(match.group(1)), target), what)
                log.warning("downloaded %s to %s in %.1f s", url, target, time.perf_counter() - t0)
            except Exception as err:
                error = f"train.resume: {what} failed: {first_line(err)}"
        errors = [e for e in _gather(self.accelerator, error) if e]
        if errors:
            raise RemoteSyncError(errors[0])
        return target

    # ---- upload -----------------------------------------------------------------------------
    def checkpoint_saved(self, path: Path, step: int) -> None:
        """Hand a finished checkpoint (and the run's log files) to the upload thread."""
        if self.uploader is not None:
            out = Path(self.cfg.output_dir)
            self.uploader.submit(checkpoint=(step, Path(path)), files=[out / f for f in RUN_FILES])

    def unsynced_steps(self) -> set[int]:
        """Checkpoints that local pruning must keep: their upload has not succeeded yet."""
        return self.uploader.unsynced_steps() if self.uploader is not None else set()

    def overdue(self) -> bool:
        """Whether something has waited longer than train.remote_max_unsynced_s for its upload."""
        since = self.uploader.unsynced_since() if self.uploader is not None else None
        return since is not None and time.time() - since > self.cfg.remote_max_unsynced_s

    def overdue_error(self) -> RemoteSyncError:
        last = self.uploader.last_error if self.uploader is not None else None
        why = f"last error: {last}" if last else "no error, the upload is slower than that: raise it"
        return RemoteSyncError(
            f"train.remote_dir: no upload to {self.url} succeeded for more than "
            f"{self.cfg.remote_max_unsynced_s:g} s (train.remote_max_unsynced_s; {why}); "
            f"stopping rather than training on without a safe copy (the local checkpoints are kept "
            f"in {self.cfg.output_dir}/checkpoints)")

    def finish(self, stopped: bool) -> None:
        """Upload the run's final files and wait for every upload: within train.remote_stop_wait_s
        after a stop signal, else until done or overdue."""
        if self.uploader is None:
            return
        out = Path(self.cfg.output_dir)
        self.uploader.submit(files=[out / f for f in RUN_FILES + FINAL_FILES if (out / f).is_file()])
        deadline = time.time() + self.cfg.remote_stop_wait_s
        log.info("waiting for the uploads to %s", self.url)
        while not self.uploader.wait_idle(0.2):
            if stopped and time.time() > deadline:
                steps = sorted(self.uploader.unsynced_steps())
                self.uploader.abort()
                raise RemoteSyncError(
                    f"train.remote_stop_wait_s: the upload to {self.url} did not finish within "
                    f"{self.cfg.remote_stop_wait_s:g} s of the stop signal (last error: "
                    f"{self.uploader.last_error}); checkpoint(s) {steps} are only in "
                    f"{self.cfg.output_dir}/checkpoints")
            if self.overdue():
                raise self.overdue_error()
        log.info("uploads to %s done", self.url)


if __name__ == "__main__":
    sys.exit(main())
