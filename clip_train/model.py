"""open_clip model, transforms and tokenizer from a model name or a local model-config JSON.

The trained module stays a plain open_clip model; `DualEncoder` only routes both towers through
one `forward` so that DistributedDataParallel sees every parameter, the logit scale included.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn
from torchvision.transforms import Compose

from clip_train.config import AugConfig, ConfigError, ModelConfig
from clip_train.hub import LOCAL_DIR_PREFIX, is_model_folder
from clip_train.pretrained import (
    HF_HUB_PREFIX,
    PretrainedError,
    check_quick_gelu,
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

    `hf-hub:org/repo` is kept as it is, once its config and weights are in the local cache, and
    so is `local-dir:FOLDER` (open_clip's hub layout on disk, e.g. a run's `model/` folder)."""
    if name.startswith(HF_HUB_PREFIX):
        fetch_hub_model_config(name)
        return name
    if name.startswith(LOCAL_DIR_PREFIX):
        if not is_model_folder(name[len(LOCAL_DIR_PREFIX):]):
            raise ConfigError(f"model.name: {name} is not a model folder (it needs an open_clip_config.json, "
                              "e.g. the model/ folder of a finished run)")
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
    # hf-hub: and local-dir: names bring their own weights and preprocessing (open_clip's).
    hub_name = name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))
    sources = {"model.pretrained": cfg.pretrained, "model.pretrained_image_path": cfg.pretrained_image_path,
               "model.pretrained_text_path": cfg.pretrained_text_path}
    for key, spec in sources.items():  # before any download
        if spec is not None:
            check_quick_gelu(name, spec, cfg.force_quick_gelu, key)
    weights = resolve_weights(cfg.pretrained, name, "model.pretrained") if cfg.pretrained else None
    towers = {tower: resolve_weights(spec, name, f"model.pretrained_{tower}_path")
              for tower, spec in (("image", cfg.pretrained_image_path), ("text", cfg.pretrained_text_path))
              if spec is not None}
    # The image tower decides its preprocessing: key by key, the preprocessing that comes with
    # pretrained_image_path (a tag or hub repo; a local file carries none) wins over
    # model.pretrained's, and the config's wins over both; unset everywhere: open_clip's.
    preprocess = {**(weights.preprocess if weights is not None else {}),
                  **(towers["image"].preprocess if "image" in towers else {})}
    preprocess = {**preprocess, **{k: v for k, v in (
        ("mean", cfg.image_mean), ("std", cfg.image_std), ("interpolation", cfg.image_interpolation),
        ("resize_mode", cfg.image_resize_mode)) if v is not None}}
    try:
        with warnings.catch_warnings():
            # open_clip 3.3 warns that color_jitter/gray_scale_prob are unused although its non-timm
            # path applies them; options it really ignores are refused by AugConfig's checks.
            warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
            model, train_transform, eval_transform = open_clip.create_model_and_transforms(
                # open_clip ignores `pretrained` for hf-hub: names (it takes the repo's weights);
                # a file given with one (`clip-train eval --checkpoint FILE`) is loaded below.
                name, pretrained=weights.path if weights is not None and not hub_name else None,
                # open_clip's base tower weights (timm / Hugging Face) only for towers that no
                # checkpoint sets.
                pretrained_image=cfg.pretrained_image and "image" not in towers,
                pretrained_text=cfg.pretrained_text and "text" not in towers,
                image_mean=_channels(preprocess.get("mean")), image_std=_channels(preprocess.get("std")),
                image_interpolation=preprocess.get("interpolation"),
                image_resize_mode=preprocess.get("resize_mode"),
                force_image_size=cfg.force_image_size, force_quick_gelu=cfg.force_quick_gelu,
                aug_cfg=cfg.aug.open_clip_cfg(), output_dict=False,
            )
    except OSError as err:  # timm / transformers base weights that could not be fetched
        if not hub_offline():
            raise
        raise PretrainedError(f"model.pretrained_image/pretrained_text: base tower weights are not "
                              f"cached and HF_HUB_OFFLINE=1 ({str(err).splitlines()[0]}); run the "
                              f"same config once with internet access to fill HF_HOME") from None
    if hub_name and weights is not None:
        open_clip.load_checkpoint(model, weights.path)
    if "fill_color" in preprocess:
        # create_model_and_transforms takes no fill colour (padding of resize_mode=longest): set
        # the weights' own on the model and rebuild the evaluation transform with open_clip's
        # function (training crops, it never pads).
        fill = preprocess["fill_color"]
        pp = {**model.visual.preprocess_cfg, "fill_color": tuple(fill) if isinstance(fill, list) else fill}
        set_model_preprocess_cfg(model, pp)
        eval_transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    if cfg.aug.auto_augment is not None:
        train_transform = timm_train_transform(model, cfg.aug)
    if cfg.aug.use_timm:
        # timm's RandAugment/AugMix draw from numpy's global RNG, which the data pipeline does
        # not seed per sample (it seeds `random` and torch): seed numpy from torch first.
        train_transform = Compose([SeedNumpyFromTorch(), *train_transform.transforms])
    for tower, tower_weights in towers.items():
        load_tower(model, tower_weights.path, tower, f"model.pretrained_{tower}_path")
    tokenizer = open_clip.get_tokenizer(name)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                               freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return ModelBundle(model, name, train_transform, eval_transform, tokenizer)


def _channels(values: list[float] | tuple | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(values) * (3 if len(values) == 1 else 1)


def timm_train_transform(model: nn.Module, aug: AugConfig) -> Compose:
    """open_clip's use_timm training transform plus timm's auto-augment, which open_clip's
    AugmentationCfg has no field for: the same create_transform call with `auto_augment` added."""
    from timm.data import create_transform

    pp = model.visual.preprocess_cfg
    size = pp["size"]
    input_size = (3, *size[-2:]) if isinstance(size, (tuple, list)) else (3, size, size)
    kwargs = {k: v for k, v in aug.open_clip_cfg().items() if k != "use_timm"}
    kwargs.setdefault("color_jitter", None)  # open_clip's default with timm: no jitter
    return create_transform(input_size=input_size, is_training=True, hflip=0.0, mean=pp["mean"],
                            std=pp["std"], re_mode="pixel", interpolation=pp["interpolation"],
                            auto_augment=aug.auto_augment, **kwargs)


class SeedNumpyFromTorch:
    """Seeds numpy's global RNG from torch's (which the data pipeline seeds per sample), so that
    timm augmentations drawing from numpy are reproducible on resume."""

    def __call__(self, image):
        np.random.seed(int(torch.randint(0, 2**32 - 1, ())))
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
