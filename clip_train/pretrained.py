"""Pretrained weights named the open_clip way: a local file, an open_clip tag, or `hf-hub:org/repo`.

Tags and hub repositories are fetched by open_clip's own downloaders (huggingface_hub under the
hood), so files land in the Hugging Face cache (`HF_HOME`): pre-fetch them on a login node, then
run compute nodes with `HF_HUB_OFFLINE=1`. A file that is neither cached nor downloadable becomes
one `PretrainedError` line that names the weights and the command that pre-fetches them.

Per-tower initialisation (`model.pretrained_image_path`, `model.pretrained_text_path`) is loaded
here rather than through open_clip's arguments of the same name: open_clip only logs a failed or
mismatched tower load (strict=False) and carries on with random weights, which a fine-tune would
discover hours later.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import open_clip
import torch
from open_clip import pretrained as oc_pretrained
from open_clip.convert import convert_state_dict
from open_clip.factory import load_state_dict
from open_clip.model import (
    convert_to_custom_text_state_dict,
    resize_pos_embed,
    resize_text_pos_embed,
)
from torch import nn

from clip_train.config import ClipTrainError, ConfigError

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
# Suffixes that make a value a file path rather than an open_clip tag (for the error message).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Keys of a full open_clip CLIP state dict that belong to neither tower.
SHARED_KEYS = ("logit_scale", "logit_bias")


class PretrainedError(ClipTrainError):
    """Pretrained weights that cannot be found, fetched or loaded; the message says what to do."""


@dataclass
class Weights:
    path: str  # a local file (downloaded ones live in the Hugging Face cache)
    # open_clip's preprocessing for these weights (mean, std, interpolation, resize_mode,
    # fill_color), from
    # the tag's registry entry or the hub repo's open_clip_config.json; empty for a local file.
    preprocess: dict = field(default_factory=dict)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _fetch_failed(key: str, what: str, err: BaseException, prefetch: str) -> PretrainedError:
    reason = (f"not in the Hugging Face cache {hub_cache()} and HF_HUB_OFFLINE=1" if hub_offline()
              else f"download failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    return PretrainedError(f"{key}: {what} is {reason}; pre-fetch it on a machine with internet "
                           f"access and the same HF_HOME: {prefetch}")


def fetch_hub_repo(repo_id: str, key: str) -> Weights:
    """Weights (and preprocessing) of an open_clip `hf-hub:` repository, through open_clip."""
    prefetch = f"python -c \"import open_clip; open_clip.create_model('{HF_HUB_PREFIX}{repo_id}')\""
    try:
        # open_clip prefers open_clip_model.safetensors, then open_clip_pytorch_model.bin.
        path = oc_pretrained.download_pretrained_from_hf(repo_id)
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many kinds; all mean "not here"
        raise _fetch_failed(key, f"hf-hub:{repo_id}", err, prefetch) from None
    preprocess: dict = {}
    try:
        config = oc_pretrained.download_pretrained_from_hf(repo_id, filename="open_clip_config.json")
        with open(config, encoding="utf-8") as f:
            preprocess = json.load(f).get("preprocess_cfg", {})
    except Exception:  # noqa: BLE001 - a weights-only repo: open_clip's defaults apply
        log.info("%s: hf-hub:%s has no open_clip_config.json; default preprocessing", key, repo_id)
    return Weights(path, {k: v for k, v in preprocess.items() if k != "size"})


def check_quick_gelu(model_name: str, spec: str, force_quick_gelu: bool, key: str) -> None:
    """Refuse an open_clip tag trained with another activation than the model's (QuickGELU vs
    GELU), as one line naming the fix. open_clip only warns (and we hand it a file, so it would not
    even do that): the model would run with the wrong activation, silently worse."""
    if spec.startswith(HF_HUB_PREFIX) or os.path.isfile(spec):
        return
    tag_cfg = open_clip.get_pretrained_cfg(model_name, spec)
    model_cfg = open_clip.get_model_config(model_name)
    if not tag_cfg or model_cfg is None:
        return
    tag_quick = bool(tag_cfg.get("quick_gelu", False))
    model_quick = bool(model_cfg.get("quick_gelu", False)) or force_quick_gelu
    if tag_quick == model_quick:
        return
    if tag_quick:
        variant = f"{model_name}-quickgelu"
        fix = (f"use model.name={variant} or set model.force_quick_gelu=true"
               if variant in open_clip.list_models() else "set model.force_quick_gelu=true")
        raise ConfigError(f"{key}: open_clip tag {spec!r} was trained with QuickGELU but {model_name} uses "
                          f"GELU (open_clip warns 'QuickGELU mismatch'); {fix}")
    plain = model_name.removesuffix("-quickgelu")
    fix = "set model.force_quick_gelu=false" if force_quick_gelu else f"use model.name={plain}"
    raise ConfigError(f"{key}: open_clip tag {spec!r} was trained with GELU but the model uses QuickGELU "
                      f"(open_clip warns 'QuickGELU mismatch'); {fix}")


def fetch_tag(model_name: str, tag: str, key: str) -> Weights:
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub = cfg.get("hf_hub", "").rstrip("/")
    prefetch = f"python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{tag}')\""
    what = f"open_clip tag {tag!r} of {model_name} ({f'hf-hub:{hub}' if hub else cfg.get('url')})"
    try:
        path = oc_pretrained.download_pretrained(cfg)
    except Exception as err:  # noqa: BLE001
        raise _fetch_failed(key, what, err, prefetch) from None
    if not path:
        raise PretrainedError(f"{key}: {what} names no file to download")
    return Weights(path, {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill_color")
                          if k in cfg})


def resolve_weights(spec: str, model_name: str, key: str) -> Weights:
    """A local file, an open_clip tag of `model_name`, or `hf-hub:org/repo`, as a local file."""
    if spec.startswith(HF_HUB_PREFIX):
        repo_id = spec[len(HF_HUB_PREFIX):]
        if repo_id.count("/") != 1:
            raise ConfigError(f"{key}: {spec!r} should be hf-hub:org/repo")
        return fetch_hub_repo(repo_id, key)
    if os.path.isfile(spec):
        return Weights(spec)
    if open_clip.get_pretrained_cfg(model_name, spec):
        return fetch_tag(model_name, spec, key)
    if os.sep in spec or spec.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(f"{key}: no such file {spec!r}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained tags for it"
    raise ConfigError(f"{key}: {spec!r} is neither a file nor an open_clip tag of {model_name} "
                      f"({known}), nor hf-hub:org/repo")


def fetch_hub_model_config(name: str) -> None:
    """Make sure `model.name=hf-hub:org/repo` has its config and weights locally (open_clip would
    fall back to random weights with only a warning when the weights are missing)."""
    repo_id = name[len(HF_HUB_PREFIX):]
    prefetch = f"python -c \"import open_clip; open_clip.create_model('{name}')\""
    try:
        oc_pretrained.download_pretrained_from_hf(repo_id, filename="open_clip_config.json")
        oc_pretrained.download_pretrained_from_hf(repo_id)
    except Exception as err:  # noqa: BLE001
        raise _fetch_failed("model.name", name, err, prefetch) from None


def _tower_keys(state_dict: dict, tower: str) -> dict[str, torch.Tensor]:
    """The tower's entries of a full CLIP state dict, keeping their full-model names."""
    if tower == "image":
        return {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    return {k: v for k, v in state_dict.items() if not k.startswith("visual.") and k not in SHARED_KEYS}


def load_tower(model: nn.Module, path: str, tower: str, key: str) -> None:
    """Load one tower from a full open_clip checkpoint (its part is taken) or a tower state dict.

    The file first goes through the conversions open_clip's full load applies
    (`open_clip.load_checkpoint`, with open_clip's own helpers): third-party layouts, a CLIP-layout
    text tower into a CustomTextCLIP model, position embeddings resized to the model's image grid
    (force_image_size) or context length. Then strict on the tower: every tower parameter must be
    in the file, with the right shape."""
    state_dict = load_state_dict(path, device="cpu")
    if not any(k.startswith("visual.") for k in state_dict):  # a bare tower state dict
        if tower == "image":
            state_dict = {f"visual.{k}": v for k, v in state_dict.items()}
        elif hasattr(model, "text") and not any(k.startswith("text.") for k in state_dict):
            state_dict = {f"text.{k}": v for k, v in state_dict.items()}  # CustomTextCLIP
    state_dict = convert_state_dict(model, state_dict)
    if tower == "image":
        _resize_pos_embed(state_dict, model)
    else:
        if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
            state_dict = convert_to_custom_text_state_dict(state_dict)
        _resize_text_pos_embed(state_dict, model)
    wanted = _tower_keys(model.state_dict(), tower)
    given = _tower_keys(state_dict, tower)
    missing = sorted(set(wanted) - set(given))
    wrong = sorted(k for k in set(wanted) & set(given) if wanted[k].shape != given[k].shape)
    if missing or wrong:
        example = (f"e.g. {missing[0]!r} is missing" if missing else
                   f"e.g. {wrong[0]!r} is {tuple(given[wrong[0]].shape)} in the file, "
                   f"{tuple(wanted[wrong[0]].shape)} in the model")
        hint = ""
        if tower == "image" and any(k.startswith("visual.trunk.") and "pos_embed" in k for k in wrong):
            hint = ("; a timm trunk's position embeddings are resized (by timm's set_input_size) only in a "
                    "full load: give a full checkpoint as model.pretrained, or unset model.force_image_size")
        if tower == "text" and not hasattr(model, "text") and any(k.startswith("text.") for k in state_dict):
            hint = ("; the file's text tower is a CustomTextCLIP's (text.*), which open_clip does not convert "
                    "to a CLIP model: use a model config with \"custom_text\": true")
        raise PretrainedError(f"{key}: {path} does not fit the {tower} tower of this model "
                              f"({len(missing)} missing, {len(wrong)} of another shape; {example}){hint}")
    model.load_state_dict({k: given[k] for k in wanted}, strict=False)
    log.info("%s: %s tower loaded from %s", key, tower, path)


def _resize_pos_embed(state_dict: dict, model: nn.Module) -> None:
    """open_clip's resize_pos_embed (another image grid), where it applies: a file of another
    architecture (other width, or no grid) is left to the strict shape check's one line."""
    given = state_dict.get("visual.positional_embedding")
    own = getattr(model.visual, "positional_embedding", None)
    if given is not None and own is not None and given.ndim == own.ndim == 2 and given.shape[1] == own.shape[1] \
            and math.isqrt(given.shape[0] - 1) ** 2 == given.shape[0] - 1:
        resize_pos_embed(state_dict, model)


def _resize_text_pos_embed(state_dict: dict, model: nn.Module) -> None:
    """open_clip's resize_text_pos_embed (another context length), where it applies: it asserts
    on another width, which the strict shape check reports as one line instead."""
    given = state_dict.get("positional_embedding", state_dict.get("text.positional_embedding"))
    own = getattr(model, "positional_embedding", None)
    if own is None:
        own = getattr(getattr(model, "text", None), "positional_embedding", None)
    if given is not None and own is not None and given.ndim == own.ndim == 2 and given.shape[1] == own.shape[1]:
        resize_text_pos_embed(state_dict, model)
