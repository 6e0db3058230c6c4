"""Negatives beyond the batch: a cross-modal queue of past keys and the momentum encoders that
fill it (MoCo, He et al. 2020; ALBEF, Li et al. 2021), as options of the CLIP loss.

- `KeyQueue`: a ring buffer of the last K image keys and the last K text keys, on the device. It
  is filled from the ALL-GATHERED global batch after each optimizer step, so every process holds
  the same queue, and its keys are extra negative columns of the next steps' loss
  (`contrastive_loss(..., queue_img_KD=, queue_txt_KD=)`): image->text rows see the queued
  texts, text->image rows the queued images. Enqueuing after the step means a batch's keys are
  never negatives of their own rows.
- `MomentumEncoder`: an exponential moving average (EMA) of both towers, theta_k <- m theta_k +
  (1 - m) theta_q after each step, that encodes the step's batch (no gradient) into the keys the
  queue stores. Keys of a slowly moving encoder stay consistent with each other; without one
  (`loss.momentum=0`) the queue holds the online embeddings of past steps, computed by weights
  that have since moved ("stale keys drift").

Unlike ALBEF, the current batch is not encoded by the momentum model for the loss: the in-batch
part is CLIP's loss with gradient through both towers, and the queue only adds negatives, so a
queue of size 0 is exactly the plain loss.

Both objects have `state_dict` / `load_state_dict` and are registered with
`accelerator.register_for_checkpointing`; they are identical on every process, so the main
process's copy (the one accelerate saves) is loaded everywhere on resume.

Shapes: B local batch, G global batch, K queue length, D embedding dim, L context length.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clip_train.config import ConfigError, LossConfig
from clip_train.grad_cache import chunk_slices
from clip_train.loss import all_gather_with_grad

log = logging.getLogger(__name__)

STALE_KEYS_WARNING = (
    "loss.queue_size > 0 with loss.momentum=0: the queue holds embeddings from the online "
    "encoders of past steps, whose weights have moved since; such stale keys drift and make "
    "easy negatives. A momentum encoder (e.g. loss.momentum=0.995) keeps them consistent."
)


class KeyQueue:
    """The last `size` image and text keys (float32, L2-normalised), a ring buffer on `device`.

    `keys()` returns the filled part; before the first `size` keys have arrived it is shorter
    (the loss then has fewer candidates, and no random placeholders are used as negatives)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and key dim must be > 0, got {size} and {dim}")
        self.img_KD = torch.zeros(size, dim, device=device)
        self.txt_KD = torch.zeros(size, dim, device=device)
        self.ptr = 0  # where the next key goes
        self.filled = 0  # how many slots hold keys (grows to size, then stays)

    @property
    def size(self) -> int:
        return self.img_KD.shape[0]

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image keys, text keys) of the filled slots, each (filled, D); views, not copies: call
        `enqueue` only once the loss that used them has been back-propagated."""
        return self.img_KD[: self.filled], self.txt_KD[: self.filled]

    @torch.no_grad()
    def enqueue(self, img_BD: torch.Tensor, txt_BD: torch.Tensor) -> None:
        """All-gather this process's keys (every process calls this at the same step with the
        same number of rows) and push the global batch, in rank order, into the ring."""
        both_BD = torch.cat(
            [F.normalize(img_BD.float(), dim=-1), F.normalize(txt_BD.float(), dim=-1)], dim=1
        )
        both_GD = all_gather_with_grad(both_BD)  # under no_grad: a plain all-gather
        img_GD, txt_GD = both_GD.split(img_BD.shape[1], dim=1)
        self.push(img_GD, txt_GD)

    @torch.no_grad()
    def push(self, img_GD: torch.Tensor, txt_GD: torch.Tensor) -> None:
        """Write already-global, normalised keys at the pointer, wrapping around the end. A batch
        larger than the queue leaves only its last `size` keys."""
        if img_GD.shape != txt_GD.shape or img_GD.shape[1:] != self.img_KD.shape[1:]:
            raise ValueError(
                f"expected two (G, {self.img_KD.shape[1]}) key tensors, got "
                f"{tuple(img_GD.shape)} and {tuple(txt_GD.shape)}"
            )
        n = img_GD.shape[0]
        if n >= self.size:
            img_GD, txt_GD = img_GD[n - self.size :], txt_GD[n - self.size :]
            # Keep ring order: after pushing `n` keys the pointer has advanced by n mod size.
            self.ptr = (self.ptr + n) % self.size
            self.img_KD.copy_(img_GD.roll(self.ptr, dims=0))
            self.txt_KD.copy_(txt_GD.roll(self.ptr, dims=0))
            self.filled = self.size
            return
        slots_G = (torch.arange(n, device=self.img_KD.device) + self.ptr) % self.size
        self.img_KD[slots_G] = img_GD.to(self.img_KD)
        self.txt_KD[slots_G] = txt_GD.to(self.txt_KD)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def state_dict(self) -> dict:
        return {
            "img_KD": self.img_KD,
            "txt_KD": self.txt_KD,
            "ptr": self.ptr,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["img_KD"].shape) != tuple(self.img_KD.shape):
            raise ConfigError(
                f"loss.queue_size: the checkpoint's queue holds {tuple(state['img_KD'].shape)} "
                f"keys (size, dim), this run {tuple(self.img_KD.shape)}: resume with the same "
                "loss.queue_size and model"
            )
        self.img_KD.copy_(state["img_KD"])
        self.txt_KD.copy_(state["txt_KD"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])


class MomentumEncoder:
    """An EMA copy of an open_clip model (both towers), in eval mode and without gradients.

    Eval mode: no dropout, so a batch's keys do not depend on random masks, and the encoder draws
    nothing from the training RNG stream (the gradient cache's replay and exact resume rely on
    that stream). The copy holds float32 weights whatever the autocast of its forward."""

    def __init__(self, online: nn.Module, momentum: float, device: torch.device | str = "cpu"):
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        self.momentum = momentum
        self.model = copy.deepcopy(online).to(device).eval().requires_grad_(False)
        if hasattr(self.model, "set_grad_checkpointing"):
            # It keeps no graphs: activation checkpointing (model.grad_checkpointing) would only
            # cost time.
            self.model.set_grad_checkpointing(False)
        self._check_matches(online)

    def _check_matches(self, online: nn.Module) -> None:
        mine = [(n, p.shape) for n, p in self.model.named_parameters()]
        theirs = [(n, p.shape) for n, p in online.named_parameters()]
        if mine != theirs:
            raise ValueError("the momentum encoder and the online model have different parameters")

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter; buffers are copied.

        One multi-tensor kernel per dtype and device (`_foreach_lerp_`), not one launch per
        parameter: the same arithmetic as `lerp_`, hundreds of kernel launches fewer per step."""
        mine = list(self.model.parameters())
        theirs = [p.detach() for p in online.parameters()]
        if len(mine) != len(theirs):
            raise ValueError("the momentum encoder and the online model have different parameters")
        torch._foreach_lerp_(mine, theirs, 1.0 - self.momentum)
        my_buffers, their_buffers = list(self.model.buffers()), list(online.buffers())
        if my_buffers:
            torch._foreach_copy_(my_buffers, their_buffers)

    @torch.no_grad()
    def encode(
        self,
        images_BCHW: torch.Tensor,
        texts_BL: torch.Tensor,
        *,
        chunk_size: int | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw float32 (image keys, text keys) of a local batch, `chunk_size` samples per forward
        (the gradient cache's chunk: the same activation memory bound)."""
        batch = images_BCHW.shape[0]
        img_chunks, txt_chunks = [], []
        for sl in chunk_slices(batch, chunk_size or batch):
            with autocast():
                img_chunks.append(self.model.encode_image(images_BCHW[sl]).float())
                txt_chunks.append(self.model.encode_text(texts_BL[sl]).float())
        return torch.cat(img_chunks), torch.cat(txt_chunks)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=True)


def embed_dim(model_name: str, clip: nn.Module | None = None) -> int:
    """The joint embedding dimension of an open_clip model: the built model's image tower says it;
    without a model, open_clip's registry (local JSON configs included once
    `clip_train.model.resolve_model_name` has registered them)."""
    output_dim = getattr(getattr(clip, "visual", None), "output_dim", None)
    if output_dim is not None:
        return int(output_dim)
    cfg = None if model_name.startswith("hf-hub:") else open_clip.get_model_config(model_name)
    if cfg is None or "embed_dim" not in cfg:
        raise ConfigError(
            f"model.name: cannot read the embedding dim of {model_name!r} for loss.queue_size"
        )
    return int(cfg["embed_dim"])


def build_negatives(
    cfg: LossConfig,
    clip: nn.Module,
    model_name: str,
    device: torch.device | str,
) -> tuple[KeyQueue | None, MomentumEncoder | None]:
    """The queue (None when loss.queue_size=0) and the momentum encoder (None when
    loss.momentum=0) of a run, built from the model's current (initial) weights: call it before
    anything patches the model (torch.compile) and before resuming overwrites them."""
    if cfg.queue_size == 0:
        return None, None
    queue = KeyQueue(cfg.queue_size, embed_dim(model_name, clip), device)
    encoder = MomentumEncoder(clip, cfg.momentum, device) if cfg.momentum > 0 else None
    return queue, encoder


def check_resume_matches(checkpoint: str | Path, registered: int) -> None:
    """Accelerate restores registered objects by index and refuses a checkpoint with another
    count; say which settings have to match instead of its generic error."""
    found = len(list(Path(checkpoint).glob("custom_checkpoint_*.pkl")))
    if found != registered:
        raise ConfigError(
            f"train.resume: {checkpoint} holds {found} run-state files, this run has {registered}: "
            "loss.queue_size (on or off) and loss.momentum (on or off) must be as in the run that "
            "saved it"
        )


def refresh_after_step(queue: KeyQueue, encoder: MomentumEncoder | None, clip: nn.Module,
                       images_BCHW: torch.Tensor, texts_BL: torch.Tensor,
                       step_img_BD: torch.Tensor, step_txt_BD: torch.Tensor, *,
                       chunk_size: int | None, autocast) -> None:
    """After an optimizer step: the momentum copy follows the new weights, then this batch's keys
    join the queue, as negatives of the next steps only (never of their own step)."""
    if encoder is None:  # plain queue: the step's own (now stale) embeddings
        queue.enqueue(step_img_BD, step_txt_BD)
        return
    encoder.update(clip)
    queue.enqueue(*encoder.encode(images_BCHW, texts_BL, chunk_size=chunk_size, autocast=autocast))
