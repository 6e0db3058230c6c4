"""Resumable checkpoints (atomic, last K kept) and export to a plain open_clip state dict.

A checkpoint is `accelerator.save_state` (model, optimizer, grad scaler, every process's RNG
states, and registered objects such as the run progress) written to a temporary directory and
renamed into place, so a crash while saving leaves the previous checkpoint intact. The main
process's copy holds every process's part, so it alone can be uploaded (clip_train.remote).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from accelerate.utils.constants import RNG_STATE_NAME
from torch import nn

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


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

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints in step order (temporary directories are not matched)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: None, `latest` (None if there is none yet) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "custom_checkpoint_0.pkl").is_file():
        from clip_train.config import ConfigError

        raise ConfigError(f"train.resume: {resume!r} is not a clip-train checkpoint directory "
                          "(use train.resume=latest to pick the newest one in train.output_dir)")
    return path


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(checkpoint: Path) -> int:
    """The step of a complete checkpoint directory (named by step_name)."""
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def check_resume_world_size(checkpoint: str | Path, num_processes: int) -> None:
    """A checkpoint holds one RNG state and one data-stream position per process: resuming it on
    another number of processes would silently restart or drop streams. Refuse in one line."""
    from clip_train.config import ConfigError

    saved = len(list(Path(checkpoint).glob(f"{RNG_STATE_NAME}_*.pkl")))
    if saved and saved != num_processes:
        raise ConfigError(f"train.resume: {checkpoint} was written by {saved} processes, this run has "
                          f"{num_processes}: resume with --num_processes {saved} (every process's RNG "
                          "state and data-stream position are part of the checkpoint)")


def save_checkpoint(accelerator, output_dir: str, step: int, keep: int,
                    keep_also: Collection[int] = ()) -> Path:
    """Save atomically on every process (each writes its own RNG state), then prune to `keep`
    (never the steps in `keep_also`: checkpoints still waiting for their upload)."""
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            if step_of(old) not in keep_also:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)  # a disk the main process does not see: its part is in `final`
    return final


def _gather_rng_states(accelerator, tmp: Path) -> None:
    """Make the main process's copy complete on its own: every process's RNG-state file.

    Without a shared filesystem (node-local output_dir) each process writes its
    random_states_{rank}.pkl to its own disk; the main process's directory is the one that is
    kept and uploaded, and a resume on new nodes needs every rank's file in it.
    """
    if getattr(accelerator, "num_processes", 1) == 1:
        return
    name = f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    everyone = gather_object([(name, (tmp / name).read_bytes())])
    if accelerator.is_main_process:
        for other, data in everyone:
            if not (tmp / other).is_file():
                (tmp / other).write_bytes(data)


def _model_state_from_dir(path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict in any layout accelerate's save_state writes for our configs:
    DDP or one process (model.safetensors, or pytorch_model.bin without safe serialization),
    FSDP2 with SHARDED_STATE_DICT (pytorch_model_fsdp_0/, torch.distributed.checkpoint) and
    FSDP2 with FULL_STATE_DICT (pytorch_model_fsdp.bin, written by the main process)."""
    from accelerate.utils.constants import FSDP_MODEL_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    from clip_train.sharding import sharded_checkpoint_state

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
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
