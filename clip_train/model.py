"""open_clip model, transforms and tokenizer from a model name or a local model-config JSON.

The trained module stays a plain open_clip model; `DualEncoder` only routes both towers through
one `forward` so that DistributedDataParallel sees every parameter, the logit scale included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from clip_train.config import ConfigError, ModelConfig
from clip_train.pretrained import (
    HF_HUB_PREFIX,
    PretrainedError,
    fetch_hub_model_config,
    hub_offline,
    load_tower,
    resolve_weights,
)

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    model: nn.Module  # the open_clip model (CLIP / CustomTextCLIP)
    name: str  # open_clip's name for it (a local JSON is registered under its file stem)
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable


def resolve_model_name(name: str) -> str:
    """Return open_clip's name for `name`, registering a local model-config JSON first.

    `hf-hub:org/repo` is kept as it is, once its config and weights are in the local cache."""
    if name.startswith(HF_HUB_PREFIX):
        fetch_hub_model_config(name)
        return name
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model.name: no such model-config file {name!r}")
        open_clip.add_model_config(path)
        if path.stem not in open_clip.list_models():
            raise ConfigError(f"model.name: {name} is not an open_clip model config "
                              "(it needs 'embed_dim', 'vision_cfg' and 'text_cfg')")
        return path.stem
    if open_clip.get_model_config(name) is None:
        close = [m for m in open_clip.list_models() if name.lower().replace("/", "-") in m.lower()][:5]
        hint = f" Did you mean one of {close}?" if close else " See open_clip.list_models()."
        raise ConfigError(f"model.name: open_clip has no model {name!r}.{hint}")
    return name


def build_model(cfg: ModelConfig) -> ModelBundle:
    """Create the open_clip model (on CPU, fp32), its transforms and tokenizer; apply locking."""
    name = resolve_model_name(cfg.name)
    weights = resolve_weights(cfg.pretrained, name, "model.pretrained") if cfg.pretrained else None
    towers = {tower: resolve_weights(spec, name, f"model.pretrained_{tower}_path")
              for tower, spec in (("image", cfg.pretrained_image_path), ("text", cfg.pretrained_text_path))
              if spec is not None}
    preprocess = weights.preprocess if weights is not None else {}
    if "image" in towers and weights is None:
        preprocess = towers["image"].preprocess  # the image tower decides its preprocessing
    try:
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name, pretrained=weights.path if weights is not None else None,
            # open_clip's base tower weights (timm / Hugging Face) only for towers that no
            # checkpoint sets.
            pretrained_image=cfg.pretrained_image and "image" not in towers,
            pretrained_text=cfg.pretrained_text and "text" not in towers,
            image_mean=preprocess.get("mean"), image_std=preprocess.get("std"),
            image_interpolation=preprocess.get("interpolation"),
            image_resize_mode=preprocess.get("resize_mode"),
            output_dict=False,
        )
    except OSError as err:  # timm / transformers base weights that could not be fetched
        if not hub_offline():
            raise
        raise PretrainedError(f"model.pretrained_image/pretrained_text: base tower weights are not "
                              f"cached and HF_HUB_OFFLINE=1 ({str(err).splitlines()[0]}); run the "
                              f"same config once with internet access to fill HF_HOME") from None
    for tower, tower_weights in towers.items():
        load_tower(model, tower_weights.path, tower, f"model.pretrained_{tower}_path")
    tokenizer = open_clip.get_tokenizer(name)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=False)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return ModelBundle(model, name, train_transform, eval_transform, tokenizer)


def tower_trainable(model: nn.Module) -> tuple[bool, bool]:
    """(image tower has trainable parameters, text tower has trainable parameters)."""
    image = any(p.requires_grad for p in model.visual.parameters())
    text_params = [p for n, p in model.named_parameters()
                   if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")]
    return image, any(p.requires_grad for p in text_params)


class DualEncoder(nn.Module):
    """One forward for both towers, returning raw (unnormalised) embeddings and the temperature.

    Why a wrapper: open_clip's `forward` normalises embeddings in the compute dtype and returns
    `logit_scale.exp()`; we normalise in float32 inside the loss, and the gradient cache feeds a
    cached gradient to the raw logit-scale parameter through this forward so that DDP reduces it
    together with the encoder gradients.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor | None, texts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {"logit_scale": self.clip.logit_scale}
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        if images is not None:
            out["image"] = self.clip.encode_image(images)
        if texts is not None:
            out["text"] = self.clip.encode_text(texts)
        return out
