"""Checkpoints in object storage: `train.output_dir` mirrored to an fsspec URL (`train.remote_dir`).

Layout of remote_dir (that of output_dir):
    checkpoints/step_NNNNNNNN/           the files of one checkpoint, every process's part
                                         (checkpoint.save_checkpoint gathers them on the main process)
    checkpoints/step_NNNNNNNN.complete   its marker, written last: {"step": N, "files": {name: bytes}}
    config.yaml, metrics.jsonl           after every checkpoint and at the end
    open_clip_model.pt, eval.json, report.png, report.html   at the end, those that exist

Object stores have no rename, so a checkpoint's prefix is the temporary one until its marker
exists: readers trust marked checkpoints only, a re-upload of a step deletes its marker first, and
pruning deletes the marker before the files. A reader never sees half a checkpoint.

Writer: `Uploader`, a thread of the main process doing one job at a time (never two uploads of a
run at once), each in a child process (`python -m clip_train.remote JOB`, at a lower CPU priority
and killed with the trainer): s3fs's event loop and HTTP client inside the trainer would share its
GIL with the training loop (measured on the demo model, 2 CPU cores: median step +10% while an
upload ran in a thread of the trainer, +2% with the child process; docs/checkpoints.md "Checkpoints in a bucket"). A checkpoint saved while another uploads waits in a single slot, where a newer one
replaces it: the bucket needs the newest, not each one. Failures are warned about and retried with
back-off; local pruning spares checkpoints not yet uploaded; when something has waited longer than
`train.remote_max_unsynced_s` for its upload, `overdue()` turns true and train.py stops the run in
the collective that already decides about stop signals.

Reader: `RemoteSync.resolve_resume` picks the newest checkpoint that every process can get (on its
disk or in the bucket) and one process per disk downloads it. Disks are told apart by a probe file,
so node-local disks, one shared filesystem, or per-rank directories in a test all work.
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


def step_name(step: int) -> str:
    return f"step_{step:08d}"  # as clip_train.checkpoint names them (not imported: it imports torch)


class RemoteSyncError(ClipTrainError):
    """The bucket did not get a safe copy in time, or a checkpoint could not be fetched from it."""


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
    """Upload one checkpoint directory, then publish it with its marker; returns the bytes sent."""
    remote = f"{ckpt_root}/{step_name(step)}"
    _rm(fs, remote + MARKER_SUFFIX)  # a re-upload of a step unpublishes the old copy first
    _rm(fs, remote, recursive=True)
    files = {p.relative_to(local).as_posix(): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()}
    if _is_local(fs):  # object stores have no directories (and s3fs's makedirs would create buckets)
        fs.makedirs(remote, exist_ok=True)
    for name in files:
        put_file(fs, local / name, f"{remote}/{name}")
    fs.pipe_file(remote + MARKER_SUFFIX, json.dumps({"step": step, "files": files}).encode())
    return sum(files.values())


def prune_remote(fs: AbstractFileSystem, ckpt_root: str, keep: int, newest: int) -> None:
    """Keep the last `keep` complete checkpoints, and drop unpublished leftovers older than `newest`."""
    complete, with_files = list_remote(fs, ckpt_root)
    for step in complete[:-keep]:
        _rm(fs, f"{ckpt_root}/{step_name(step)}{MARKER_SUFFIX}")  # unpublish before deleting
        _rm(fs, f"{ckpt_root}/{step_name(step)}", recursive=True)
    for step in with_files:  # partial uploads of a killed run
        if step < newest and step not in complete:
            _rm(fs, f"{ckpt_root}/{step_name(step)}", recursive=True)


def download_checkpoint(fs: AbstractFileSystem, ckpt_root: str, step: int, dest: Path) -> Path:
    """Fetch a complete checkpoint into `dest` (through a temporary directory renamed into place)."""
    remote = f"{ckpt_root}/{step_name(step)}"
    marker = json.loads(fs.cat_file(remote + MARKER_SUFFIX))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-download-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        for name, size in marker["files"].items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{remote}/{name}", str(tmp / name))
            got = (tmp / name).stat().st_size
            if got != size:
                raise OSError(f"{remote}/{name}: {got} bytes, its marker says {size}")
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
                 in_child: bool = True):
        self.fs, self.root, self.url, self.keep = fs, root, url, keep
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
        while True:
            with self._cond:
                self._cond.wait_for(lambda: not self._pending.empty())
                self._active, self._pending = self._pending, _Work()
            attempt = 0
            while True:
                try:
                    self._upload(self._active)
                    break
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
            upload_job(self.fs, self.root, checkpoint, files, self.keep, published)
        else:
            job = {"url": self.url, "checkpoint": checkpoint, "files": files, "keep": self.keep,
                   "parent": os.getpid()}
            self._child = subprocess.Popen([*UPLOAD_COMMAND, json.dumps(job)], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
            out, err = self._child.communicate()
            for line in out.splitlines():
                if line.startswith("{"):
                    published(json.loads(line))
            if self._child.returncode != 0:
                lines = err.strip().splitlines()
                raise OSError(lines[-1] if lines else f"upload process ended with {self._child.returncode}")
        with self._cond:
            work.files.clear()


def upload_job(fs: AbstractFileSystem, root: str, checkpoint: tuple[int, str] | None, files: list[str],
               keep: int, published) -> None:
    """One upload job: the checkpoint and its marker (then `published({...})`), pruning, the files."""
    if checkpoint is not None:
        step, local = checkpoint
        t0 = time.perf_counter()
        size = upload_checkpoint(fs, f"{root}/checkpoints", Path(local), step)
        published({"published": step, "bytes": size, "seconds": time.perf_counter() - t0})
        prune_remote(fs, f"{root}/checkpoints", keep, newest=step)
    for path in map(Path, files):
        if path.is_file():
            put_file(fs, path, f"{root}/{path.name}")


def main(argv: list[str] | None = None) -> int:
    """The upload process: `python -m clip_train.remote JOB_JSON` (started by Uploader)."""
    job = json.loads((sys.argv[1:] if argv is None else argv)[-1])
    _die_with(job["parent"])
    os.nice(10)  # the training loop comes first on a busy CPU
    try:
        fs, root = open_remote(job["url"])
        upload_job(fs, root, job["checkpoint"], job["files"], job["keep"],
                   lambda info: print(json.dumps(info), flush=True))
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


def is_disk_leader(accelerator, output_dir: str) -> bool:
    """Whether this process is the lowest rank that sees its output_dir's disk (a collective).

    Each process drops a file named after its rank in a probe directory; the processes that see
    each other's files share a disk. Should a shared filesystem's caching hide a file, two
    processes download the same checkpoint, and the rename in download_checkpoint keeps one.
    """
    if accelerator.num_processes == 1:
        return True
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]
    probe = Path(output_dir) / f".disk-probe-{token}"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / f"rank_{accelerator.process_index}").touch()
    accelerator.wait_for_everyone()
    ranks = sorted(int(p.name.removeprefix("rank_")) for p in probe.iterdir())
    accelerator.wait_for_everyone()
    leader = ranks[0] == accelerator.process_index
    if leader:
        shutil.rmtree(probe, ignore_errors=True)
    return leader


def one_disk_for_all(accelerator, output_dir: str) -> bool:
    """Whether every process sees the same output_dir disk (a collective)."""
    from accelerate.utils import gather_object

    return sum(gather_object([is_disk_leader(accelerator, output_dir)])) == 1


class RemoteSync:
    """What train.py calls: resume from the newest checkpoint of the disks and the bucket, then
    upload after each checkpoint, at a stop and at the end. Without train.remote_dir (and a URL in
    train.resume) it only resolves train.resume as before."""

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

    # ---- resume ---------------------------------------------------------------------------
    def resolve_resume(self) -> Path | None:
        """The local checkpoint directory to load on this process (downloaded where needed)."""
        from accelerate.utils import broadcast_object_list, gather_object

        from clip_train.checkpoint import checkpoint_dir, list_checkpoints, resolve_resume, step_of

        resume, out = self.cfg.resume, self.cfg.output_dir
        if resume is not None and "://" in resume:
            return self._resume_from_url(resume)
        if resume != "latest" or self.url is None:
            return resolve_resume(resume, out)
        leader = is_disk_leader(self.accelerator, out)
        mine = [step_of(p) for p in list_checkpoints(out)] if leader else None
        per_disk = [steps for steps in gather_object([mine]) if steps is not None]
        decision: dict = {"step": None, "error": None}
        if self.accelerator.is_main_process:
            try:
                remote = with_retries(lambda: list_remote(self.fs, f"{self.root}/checkpoints")[0],
                                      f"listing {self.url}/checkpoints")
                on_every_disk = set.intersection(*(set(steps) for steps in per_disk))
                decision["step"] = max(on_every_disk | set(remote), default=None)
                log.info("resume=latest: complete checkpoints on every disk %s, in %s %s",
                         sorted(on_every_disk), self.url, remote)
                newest_here = max(per_disk[0], default=None)
                if newest_here is not None and newest_here > (decision["step"] or 0):
                    log.warning("step %d is on this disk but neither on every node's disk nor in %s: "
                                "resuming from step %d", newest_here, self.url, decision["step"])
            except Exception as err:
                decision["error"] = f"train.remote_dir: cannot list {self.url}/checkpoints: {first_line(err)}"
        decision = broadcast_object_list([decision])[0]
        if decision["error"]:
            raise RemoteSyncError(decision["error"])
        if decision["step"] is None:
            return None
        target = checkpoint_dir(out) / step_name(decision["step"])
        self._fetch_everywhere(leader and not target.is_dir(), self.fs, f"{self.root}/checkpoints",
                               decision["step"], target, f"{self.url}/checkpoints")
        return target

    def _resume_from_url(self, url: str) -> Path:
        """train.resume=s3://.../checkpoints/step_N: download it (every disk) into output_dir/downloaded."""
        fs, path = open_remote(url, "train.resume")
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        match = _STEP.match(name)
        if match is None:
            raise ConfigError(f"train.resume: {url!r} is not a checkpoint URL (it ends in step_NNNNNNNN)")
        target = Path(self.cfg.output_dir) / "downloaded" / name
        leader = is_disk_leader(self.accelerator, self.cfg.output_dir)
        if leader:
            shutil.rmtree(target, ignore_errors=True)  # the URL may name another run's step N
        self.accelerator.wait_for_everyone()
        self._fetch_everywhere(leader, fs, parent, int(match.group(1)), target, url.rsplit("/", 1)[0])
        return target

    def _fetch_everywhere(self, fetch_here: bool, fs: AbstractFileSystem, ckpt_root: str, step: int, target: Path,
                          shown: str) -> None:
        """Download on the processes that need it; any failure stops every process (a collective)."""
        from accelerate.utils import gather_object

        error = None
        if fetch_here:
            what = f"download of {shown}/{step_name(step)}"
            t0 = time.perf_counter()
            try:
                with_retries(lambda: download_checkpoint(fs, ckpt_root, step, target), what)
                log.warning("downloaded %s/%s to %s in %.1f s", shown, step_name(step), target,
                            time.perf_counter() - t0)
            except Exception as err:
                error = f"train.resume: {what} failed: {first_line(err)}"
        errors = [e for e in gather_object([error]) if e]
        if errors:
            raise RemoteSyncError(errors[0])

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
