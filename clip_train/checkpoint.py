"""Checkpoints that prove they are whole: save, verify, choose what to resume, prune, export.

A checkpoint is `accelerator.save_state` (model, optimizer, grad scaler, every process's RNG
states, registered objects such as the run progress) written to a temporary directory; then the
main process writes `manifest.json` (every file's size and CRC32, the step, the run id), the
commit marker, and renames the directory into place. A directory without a manifest that
verifies is not a checkpoint: `resume=latest` skips it with a warning and takes the one before;
an explicit `train.resume=<dir>` that does not verify stops in one line naming the bad file.
Nothing damaged is deleted automatically. docs/checkpoints.md states the rules.

Layering: this module sits under clip_train.sharding (FSDP2) and clip_train.remote (buckets) and
imports neither; its module-level imports are light (the upload child imports it), torch and
accelerate are imported where used. The bucket side reaches the resume decision through a
`Bucket` object (clip_train.remote.BucketSource).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from clip_train.config import ClipTrainError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("clip_train")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Files of the run (not of one checkpoint) that belong to whichever run owns the directory.
RUN_FILES = ("metrics.jsonl", "eval.json", "open_clip_model.pt", "report.png", "report.html")
# Bytes per read while checksumming: 1 MiB stays in the CPU's cache between the read and the
# CRC; 8 MiB reads took twice the CPU time (benchmarks/checkpoint_verify.py, this VM).
_CHUNK = 1 << 20


class CheckpointError(ClipTrainError):
    """A checkpoint that cannot be resumed (incomplete or damaged), or a directory that holds another run."""


@dataclass
class RunState:
    """Run state saved with every checkpoint (registered with accelerator.register_for_checkpointing)."""

    step: int = 0
    samples_seen: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    # One entry per process, in rank order: where that process's data stream stands.
    data_states: list = field(default_factory=list)
    wandb_run_id: str | None = None
    # The run's identity (new_run_id), kept across resumes; checkpoints written before run ids
    # leave it None and the manifest's id is used.
    run_id: str | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ---- names ------------------------------------------------------------------------------------
def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(checkpoint: Path) -> int:
    """The step of a checkpoint directory (named by step_name)."""
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories in step order, complete or not (temporary and set-aside ones, whose
    names start with a dot, are not matched; verify_checkpoint tells whether one is whole)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def new_run_id() -> str:
    """A run's identity: start time and a random suffix (never a number, so metrics readers that
    chart numeric values leave it alone)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


# ---- the manifest -------------------------------------------------------------------------------
def file_crc32(path: Path) -> str:
    """CRC32 of a file, streamed (zlib releases the GIL: files are checksummed in parallel).
    CRC32 because it is the fastest check the standard library has (benchmarks/checkpoint_verify.py:
    ~2x sha256, ~3.5x blake2b) and it catches every flipped byte and burst; truncation is caught
    by the size. It does not defend against deliberate tampering, which is not the threat here."""
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _checksums(directory: Path, names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: file_crc32(directory / n), names), strict=True))


def build_manifest(directory: Path, step: int, run_id: str | None) -> dict:
    """The manifest of every file under `directory` (but the manifest itself)."""
    names = [p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST]
    crcs = _checksums(directory, names)
    files = {n: {"bytes": (directory / n).stat().st_size, "crc32": crcs[n]} for n in names}
    return {"format": MANIFEST_FORMAT, "step": step, "run_id": run_id, "files": files, "written": time.time()}


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write manifest.json last, durably: the files it lists are flushed first, then it."""
    for name in manifest["files"]:
        _fsync(directory / name)
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, directory / MANIFEST)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories or read-only descriptors
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict:
    """The manifest of a checkpoint directory; CheckpointError naming the file when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete: its save or copy did not "
                              "finish, or a clip-train without manifests wrote it)")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (ValueError, OSError, AttributeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    return manifest


def run_id_of(directory: Path) -> str | None:
    """The run id in a checkpoint's manifest (None when it has none, or no readable manifest)."""
    try:
        return read_manifest(directory).get("run_id")
    except CheckpointError:
        return None


def verify_checkpoint(directory: Path, checksums: bool = True, manifest: dict | None = None) -> dict:
    """Check that every file the manifest lists is there with its size (and CRC32 unless
    `checksums` is False); returns the manifest, or raises CheckpointError naming the bad file."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    files = manifest["files"]
    if not files:
        raise CheckpointError(f"{directory / MANIFEST}: lists no files")
    for name, entry in files.items():
        size = entry if isinstance(entry, int) else entry["bytes"]  # an old bucket marker: sizes only
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        got = path.stat().st_size
        if got != size:
            raise CheckpointError(f"{path}: {got} bytes, {MANIFEST} says {size} (truncated or overwritten)")
    if checksums:
        want = {n: e["crc32"] for n, e in files.items() if isinstance(e, dict) and "crc32" in e}
        for name, crc in _checksums(directory, want).items():
            if crc != want[name]:
                raise CheckpointError(f"{directory / name}: CRC32 {crc}, {MANIFEST} says {want[name]} (damaged)")
    return manifest


# ---- which disks the processes share ------------------------------------------------------------
@dataclass(frozen=True)
class Disks:
    """What the start-up probe found about train.output_dir."""

    leader: bool  # this process is the lowest rank that sees its disk: it verifies and downloads there
    shared: bool  # every process sees the same disk


def probe_disks(accelerator, output_dir: str) -> Disks:
    """Which processes share output_dir's disk (a collective on every process).

    Each process drops a file named after its rank in a probe directory; the processes that see
    each other's files share a disk. Should a shared filesystem's caching hide a file, two
    processes act as leaders of one disk (two downloads of the same checkpoint; the rename in
    the download keeps one)."""
    if accelerator.num_processes == 1:
        return Disks(leader=True, shared=True)
    from accelerate.utils import broadcast_object_list, gather_object

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
    return Disks(leader=leader, shared=sum(gather_object([leader])) == 1)


def is_disk_leader(accelerator, output_dir: str) -> bool:
    return probe_disks(accelerator, output_dir).leader


def one_disk_for_all(accelerator, output_dir: str) -> bool:
    return probe_disks(accelerator, output_dir).shared


def check_disks(disks: Disks, output_dir: str, remote_dir: str | None, num_processes: int) -> None:
    """Node-local output_dir disks without a bucket are refused: each process would hold only
    its own part of every checkpoint, and a resume on any disk could not load it whole."""
    if not disks.shared and not remote_dir:
        raise ConfigError(
            f"train.output_dir: {output_dir} is not one filesystem shared by all {num_processes} processes "
            "(node-local disks): a checkpoint's parts would be spread over the disks and no process could "
            "resume it; use a directory every process shares, or set train.remote_dir to a bucket (DDP)")


# ---- the resume decision ----------------------------------------------------------------------
class Bucket(Protocol):
    """What the resume decision needs from a bucket mirror (clip_train.remote.BucketSource)."""

    shown: str

    def complete_steps(self) -> list[int]: ...  # steps with a marker (main process)

    def run_ids(self) -> dict[int, str | None]: ...  # run id of each complete step (main process)

    def fetch(self, step: int, target: Path) -> None: ...  # download and verify, or CheckpointError

    def set_aside(self, runs: dict[int, str | None], how: str) -> None: ...  # archive or remove


@dataclass(frozen=True)
class ResumeDecision:
    """Taken once by the main process, checked by every process, the same everywhere."""

    checkpoint: Path | None  # what every process loads (None: a fresh start)
    step: int  # its step (0: fresh)
    run_id: str  # the run this start continues, or the new run's id


def _broadcast(accelerator, value):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value if accelerator.is_main_process else None])[0]


def _gather(accelerator, value) -> list:
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _loadable_everywhere(accelerator, target: Path, leader: bool, bucket: Bucket | None) -> str | None:
    """Whether every process can load exactly `target` (a collective): the disk leader verifies it
    whole (and downloads it from the bucket, if given, when it is missing or damaged there); then
    every other process checks that each file it will read is there with its size. The first
    problem, the same on every process, or None."""
    problem = None
    if leader:
        try:
            if not target.is_dir():
                raise CheckpointError(f"{target}: not on this process's disk")
            verify_checkpoint(target)
        except CheckpointError as err:
            problem = str(err)
            if bucket is not None:
                try:
                    bucket.fetch(step_of(target), target)
                    problem = None
                except Exception as fetch_err:
                    problem = f"{problem}; the copy in {bucket.shown}: {_first_line(fetch_err)}"
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()  # the leaders' downloads are in place
        if not leader:
            try:
                if not target.is_dir():
                    raise CheckpointError(f"{target}: not on this process's disk")
                verify_checkpoint(target, checksums=False)
            except CheckpointError as err:
                problem = str(err)
    problems = [(rank, p) for rank, p in enumerate(_gather(accelerator, problem)) if p]
    if not problems:
        return None
    rank, why = problems[0]
    return why if accelerator.num_processes == 1 else f"on rank {rank}: {why}"


def decide_resume(accelerator, resume: str | None, output_dir: str, leader: bool,
                  bucket: Bucket | None = None, explicit: Path | None = None) -> ResumeDecision:
    """Which checkpoint every process resumes from (or none), decided once.

    resume=latest: the main process lists its disk and the bucket; the candidates, newest first,
    are tried in turn until one is loadable everywhere (_loadable_everywhere); a damaged or
    incomplete one is skipped with a warning naming it and the reason. An explicit checkpoint
    (`explicit`, or `resume` as a path) that is not loadable is a one-line error. Collective."""
    if resume is None:
        return ResumeDecision(None, 0, _broadcast(accelerator, new_run_id()))
    if explicit is not None or resume != "latest":
        target = explicit if explicit is not None else Path(resume)
        problem = _loadable_everywhere(accelerator, target, leader, bucket=None)
        if problem:
            raise CheckpointError(f"train.resume: {problem} (train.resume=latest falls back to the newest "
                                  "checkpoint that verifies)")
        return ResumeDecision(target, _step_in(target), _broadcast(accelerator, run_id_of(target) or new_run_id()))
    plan: dict = {}
    if accelerator.is_main_process:
        try:
            here = [step_of(p) for p in list_checkpoints(output_dir)]
            remote = bucket.complete_steps() if bucket is not None else []
            plan = {"candidates": sorted(set(here) | set(remote), reverse=True), "remote": remote}
            if bucket is not None:
                log.info("resume=latest: checkpoints in %s %s, in %s %s", checkpoint_dir(output_dir),
                         sorted(here), bucket.shown, remote)
        except Exception as err:
            plan = {"error": f"train.resume=latest: cannot list the checkpoints: {_first_line(err)}"}
    plan = _broadcast(accelerator, plan)
    if "error" in plan:
        raise CheckpointError(plan["error"])
    skipped = []
    for step in plan["candidates"]:
        target = checkpoint_dir(output_dir) / step_name(step)
        problem = _loadable_everywhere(accelerator, target, leader,
                                       bucket if step in plan["remote"] else None)
        if problem is None:
            if skipped and accelerator.is_main_process:
                log.warning("resume=latest: resuming from %s, the newest checkpoint that verifies", target)
            run_id = _broadcast(accelerator, run_id_of(target) or new_run_id())
            return ResumeDecision(target, step, run_id)
        skipped.append(step_name(step))
        if accelerator.is_main_process:
            log.warning("resume=latest: skipping %s: %s", target, problem)
    if skipped:
        raise CheckpointError(f"train.resume=latest: no checkpoint in {checkpoint_dir(output_dir)} verifies "
                              f"({', '.join(skipped)}: see the warnings above); resume one explicitly after "
                              "repairing it, or start afresh in a new train.output_dir")
    return ResumeDecision(None, 0, _broadcast(accelerator, new_run_id()))


def _step_in(checkpoint: Path) -> int:
    try:
        return int(read_manifest(checkpoint)["step"])
    except (CheckpointError, KeyError, ValueError):
        return step_of(checkpoint) if _STEP_DIR.match(checkpoint.name) else 0


# ---- one run per directory --------------------------------------------------------------------
def claim_output_dir(accelerator, output_dir: str, decision: ResumeDecision, overwrite: str | None,
                     bucket: Bucket | None = None) -> None:
    """Refuse (in one line, on every process) to start or continue run `run_id` in a directory,
    or a bucket, that holds another run's checkpoints; or set them aside as train.overwrite says
    (archive: moved to <output_dir>/archive/<their run id>/, remove: deleted). Collective."""
    error = None
    if accelerator.is_main_process:
        try:
            error = _claim(output_dir, decision.run_id, decision.checkpoint is None, overwrite, bucket)
        except Exception as err:
            error = f"train.overwrite: could not set aside the checkpoints in {output_dir}: {_first_line(err)}"
    error = _broadcast(accelerator, error)
    if error:
        raise CheckpointError(error)


def _claim(output_dir: str, run_id: str, fresh: bool, overwrite: str | None, bucket: Bucket | None) -> str | None:
    # A fresh start claims a directory without checkpoints; a resume, one without another run's
    # (a directory without a readable manifest names no run: resume=latest skipped it already).
    others = {p: run_id_of(p) for p in list_checkpoints(output_dir)}
    others = {p: rid for p, rid in others.items() if rid != run_id and (fresh or rid is not None)}
    remote = {s: rid for s, rid in (bucket.run_ids().items() if bucket is not None else ())
              if rid != run_id and (fresh or rid is not None)}
    if not others and not remote:
        return None
    owners = sorted({str(rid) for rid in [*others.values(), *remote.values()]})
    where = [f"{checkpoint_dir(output_dir)} ({', '.join(p.name for p in others)})"] if others else []
    where += [f"{bucket.shown} ({', '.join(step_name(s) for s in sorted(remote))})"] if remote else []
    if overwrite is None:
        return (f"train.output_dir: {' and '.join(where)} hold(s) the checkpoints of another run "
                f"(run id {', '.join(owners)}): resume it with train.resume=latest, choose a new "
                "train.output_dir, or set train.overwrite=archive (moves them to "
                f"{output_dir}/archive/) or train.overwrite=remove (deletes them)")
    by_run: dict[str | None, list[Path]] = {}
    for path, rid in others.items():
        by_run.setdefault(rid, []).append(path)
    for rid, paths in by_run.items():
        dest = Path(output_dir) / "archive" / (rid or f"unknown-{time.strftime('%Y%m%d-%H%M%S')}")
        for path in paths:
            if overwrite == "remove":
                shutil.rmtree(path)
            else:
                (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
                os.replace(path, dest / "checkpoints" / path.name)
        for name in RUN_FILES:  # that run's metrics and outputs go with its checkpoints
            file = Path(output_dir) / name
            if file.is_file():
                if overwrite == "remove":
                    file.unlink()
                else:
                    os.replace(file, dest / name)
    if remote:
        bucket.set_aside(remote, overwrite)
    log.warning("train.overwrite=%s: %s of run(s) %s %s", overwrite, " and ".join(where), ", ".join(owners),
                "removed" if overwrite == "remove" else f"moved to {output_dir}/archive/ (and the bucket's archive/)")
    return None


# ---- saving and pruning -----------------------------------------------------------------------
def save_checkpoint(accelerator, output_dir: str, step: int, keep: int,
                    keep_also: Collection[int] = (), run_id: str | None = None) -> Path:
    """Save atomically on every process (each writes its own RNG state), commit it with its
    manifest, then prune this run's checkpoints to `keep` (never the one just written, never the
    steps in `keep_also`: checkpoints still waiting for their upload, never another run's)."""
    root = checkpoint_dir(output_dir)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    _gather_rng_states(accelerator, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp, build_manifest(tmp, step, run_id))  # the commit marker, written last
        if final.exists():
            shutil.rmtree(final)  # this run's own earlier copy of the step (a redone step after a resume)
        os.replace(tmp, final)
        _fsync(root)
        prune_checkpoints(output_dir, keep, run_id, protect={step, *keep_also})
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)  # a disk the main process does not see: its part is in `final`
    return final


def prune_checkpoints(output_dir: str, keep: int, run_id: str | None, protect: Collection[int]) -> list[Path]:
    """Delete this run's checkpoints beyond the newest `keep`, by identity: a checkpoint of
    another run (or without a readable manifest) is never touched, nor the steps in `protect`."""
    ours = [p for p in list_checkpoints(output_dir) if run_id_of(p) == run_id]
    removed = []
    for old in ours[:-keep]:
        if step_of(old) not in protect:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def _gather_rng_states(accelerator, tmp: Path) -> None:
    """Make the main process's copy complete on its own: every process's RNG-state file.

    Without a shared filesystem (node-local output_dir with a bucket) each process writes its
    random_states_{rank}.pkl to its own disk; the main process's directory is the one that is
    kept and uploaded, and a resume on new nodes needs every rank's file in it.
    """
    if getattr(accelerator, "num_processes", 1) == 1:
        return
    from accelerate.utils import gather_object
    from accelerate.utils.constants import RNG_STATE_NAME

    name = f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    everyone = gather_object([(name, (tmp / name).read_bytes())])
    if accelerator.is_main_process:
        for other, data in everyone:
            if not (tmp / other).is_file():
                (tmp / other).write_bytes(data)


def check_resume_world_size(checkpoint: str | Path, num_processes: int) -> None:
    """A checkpoint holds one RNG state and one data-stream position per process: resuming it on
    another number of processes would silently restart or drop streams. Refuse in one line."""
    from accelerate.utils.constants import RNG_STATE_NAME

    saved = len(list(Path(checkpoint).glob(f"{RNG_STATE_NAME}_*.pkl")))
    if saved and saved != num_processes:
        raise ConfigError(f"train.resume: {checkpoint} was written by {saved} processes, this run has "
                          f"{num_processes}: resume with --num_processes {saved} (every process's RNG "
                          "state and data-stream position are part of the checkpoint)")


# ---- reading weights and exporting --------------------------------------------------------------
def sharded_checkpoint_state(path: str) -> dict[str, torch.Tensor] | None:
    """The full model state dict from a sharded (torch.distributed.checkpoint) accelerate
    checkpoint directory, or None when `path` holds no sharded model. Runs in one process."""
    model_dir = Path(path) / "pytorch_model_fsdp_0"
    if not model_dir.is_dir():
        return None
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.pt")
        dcp_to_torch_save(str(model_dir), out)
        state = torch.load(out, map_location="cpu", weights_only=True)
    # accelerate saves {"model": state_dict} under DCP
    return state.get("model", state)


def _model_state_from_dir(path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict in any layout accelerate's save_state writes for our configs:
    DDP or one process (model.safetensors, or pytorch_model.bin without safe serialization),
    FSDP2 with SHARDED_STATE_DICT (pytorch_model_fsdp_0/, torch.distributed.checkpoint) and
    FSDP2 with FULL_STATE_DICT (pytorch_model_fsdp.bin, written by the main process)."""
    import torch
    from accelerate.utils.constants import FSDP_MODEL_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    sharded = sharded_checkpoint_state(str(path))  # an FSDP2 run's torch.distributed.checkpoint
    if sharded is not None:
        return sharded
    if (path / SAFE_WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(path / SAFE_WEIGHTS_NAME))
    for name in (WEIGHTS_NAME, f"{FSDP_MODEL_NAME}.bin"):
        if (path / name).is_file():
            return torch.load(path / name, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model weights in this checkpoint (looked for {FSDP_MODEL_NAME}_0/, "
                            f"{SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} and {FSDP_MODEL_NAME}.bin)")


def load_model_weights(model: nn.Module, path: str) -> None:
    """Load weights into an open_clip model from a training checkpoint dir or an exported file."""
    import torch

    p = Path(path)
    if p.is_dir():
        state = _model_state_from_dir(p)
        # save_state stores the DualEncoder wrapper: strip its `clip.` prefix.
        state = {k.removeprefix("clip."): v for k, v in state.items()}
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    model.load_state_dict(state, strict=True)


def export_open_clip(model: nn.Module | dict[str, torch.Tensor], path: str) -> None:
    """Write a plain open_clip state dict: `create_model_and_transforms(name, pretrained=path)` loads it.

    `model`: an open_clip model, or its full state dict (sharded runs gather it first:
    clip_train.sharding.open_clip_state_dict)."""
    import torch

    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
