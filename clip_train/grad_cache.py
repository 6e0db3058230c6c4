"""One optimizer step's forward/backward, exact at any batch size through gradient caching.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup": the
contrastive loss couples every sample with every other, so plain gradient accumulation is wrong.
Instead: (1) embed every chunk without graphs, (2) compute the loss over the whole (global) batch
once and its gradient with respect to the embeddings and the temperature, (3) re-embed each chunk
with graphs and back-propagate the cached gradient. Peak activation memory is one chunk's.

Shapes: B local batch, C chunk, D embedding dim, L context length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from clip_train.sharding import gradient_sync_context

# loss_fn(img_emb_BD, txt_emb_BD, logit_scale, logit_bias) -> scalar local loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalar: this process's loss
    img_emb_BD: torch.Tensor  # detached embeddings, for health metrics
    txt_emb_BD: torch.Tensor


class RandState:
    """CPU and CUDA generator states, captured before a forward and replayed before its twin.

    Why: pass (3) must see the same dropout / drop-path / patch-dropout masks as pass (1), or the
    cached gradient belongs to a different function than the one back-propagated.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        # fork_rng restores the outer states afterwards, so replaying leaves the step's RNG stream
        # exactly where pass (1) left it (resume reproducibility depends on that).
        with torch.random.fork_rng(devices=[self.device] if self.cuda else [], device_type="cuda"):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


def chunk_slices(batch_size: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most chunk_size covering range(batch_size); the last may be short."""
    return [slice(i, min(i + chunk_size, batch_size)) for i in range(0, batch_size, chunk_size)]


def _scale_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    clip = getattr(model, "module", model).clip
    return clip.logit_scale, getattr(clip, "logit_bias", None)


def train_step(model: nn.Module, images_BCHW: torch.Tensor, texts_BL: torch.Tensor, *,
               loss_fn: LossFn, chunk_size: int | None, accelerator,
               train_image: bool = True, train_text: bool = True,
               grad_reduce: str = "every_chunk") -> StepOutput:
    """Forward and backward of one step; gradients are left in `.grad`, reduced across processes.

    `model` is the (possibly DDP-wrapped) `DualEncoder`. With chunk_size None or >= B this is a
    plain forward/backward. Otherwise the two-pass gradient cache runs, with exactly one gradient
    all-reduce: every chunk but the last back-propagates under `no_sync`. Under FSDP2,
    `grad_reduce` picks how chunks reduce gradients (clip_train.sharding.gradient_sync_context).
    """
    batch_size = images_BCHW.shape[0]
    if chunk_size is None or chunk_size >= batch_size:
        with accelerator.autocast():
            out = model(images_BCHW, texts_BL)
        loss = loss_fn(out["image"], out["text"], out["logit_scale"], out.get("logit_bias"))
        accelerator.backward(loss)
        return StepOutput(loss.detach(), out["image"].detach(), out["text"].detach())

    slices = chunk_slices(batch_size, chunk_size)
    device = images_BCHW.device

    # Pass 1: embeddings without graphs; RNG state recorded before each tower's forward so a
    # tower can be replayed alone (a locked tower is not re-run).
    img_states, txt_states, img_chunks, txt_chunks = [], [], [], []
    with torch.no_grad(), accelerator.autocast():
        for sl in slices:
            img_states.append(RandState(device))
            img_chunks.append(model(images_BCHW[sl], None)["image"])
            txt_states.append(RandState(device))
            txt_chunks.append(model(None, texts_BL[sl])["text"])

    # Pass 2: the loss over the global batch, in float32 outside autocast (inside loss_fn), on
    # detached leaves; its gradient is the cache.
    img_emb_BD = torch.cat(img_chunks).float().requires_grad_(train_image)
    txt_emb_BD = torch.cat(txt_chunks).float().requires_grad_(train_text)
    scale_param, bias_param = _scale_parameters(model)
    scale = scale_param.detach().clone().requires_grad_(scale_param.requires_grad)
    bias = None if bias_param is None else bias_param.detach().clone().requires_grad_(bias_param.requires_grad)
    loss = loss_fn(img_emb_BD, txt_emb_BD, scale, bias)
    leaves = [t for t in (img_emb_BD, txt_emb_BD, scale, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    cached = {id(t): (torch.zeros_like(t) if g is None else g) for t, g in zip(leaves, grads, strict=True)}

    # fp16: the cached gradients enter backward where `accelerator.backward(loss)` would have
    # scaled the loss, so they go through the GradScaler (in float32, before the cast to the
    # compute dtype, where small gradients would underflow); `scaler.scale` also initialises the
    # scale that `unscale_` and the skip-on-overflow step rely on.
    scaler = getattr(accelerator, "scaler", None)

    # Pass 3: re-embed each chunk with graphs and back-propagate its slice of the cache.
    for i, sl in enumerate(slices):
        last = i == len(slices) - 1
        sync = gradient_sync_context(model, last, accelerator, grad_reduce)
        state = img_states[i] if train_image else txt_states[i]
        with sync:
            with state.replay(), accelerator.autocast():
                out = model(images_BCHW[sl] if train_image else None,
                            texts_BL[sl] if train_text else None)
            outputs, out_grads = [], []
            if train_image:
                outputs.append(out["image"])
                out_grads.append(cached[id(img_emb_BD)][sl])
            if train_text:
                outputs.append(out["text"])
                out_grads.append(cached[id(txt_emb_BD)][sl])
            if last:
                # The temperature's gradient enters once, through this forward, so that DDP
                # reduces it together with the encoders' (and finds every parameter used).
                for key, leaf in (("logit_scale", scale), ("logit_bias", bias)):
                    if leaf is not None and leaf.requires_grad:
                        outputs.append(out[key])
                        out_grads.append(cached[id(leaf)])
            if scaler is not None:
                out_grads = scaler.scale(out_grads)  # one call per chunk, as backward(loss) once
            torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, out_grads, strict=True)])

    return StepOutput(loss.detach(), img_emb_BD.detach(), txt_emb_BD.detach())
