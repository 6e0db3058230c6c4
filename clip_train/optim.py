"""Parameter groups (weight-decay rules, per-tower and layer-wise learning rates), the optimizer
through timm's factory, and LR schedules.

The schedule is a pure function of the optimizer step, so resuming needs only the step: no
scheduler object to checkpoint, and Accelerate's scheduler wrapper (which steps once per process
when batches are not split) stays out of the way. Each group carries an `lr_scale` (tower scale x
layer-decay factor) that `set_lr` multiplies in; the optimizer's state (moments, Lion/LAMB state)
is checkpointed by Accelerate with the model.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

from clip_train.config import ConfigError, OptimConfig

# Parameter names without weight decay, per `optim.no_decay` preset (fnmatch patterns; every
# 1-D tensor, i.e. biases and norm gains, is excluded as well).
NO_DECAY_PRESETS: dict[str, tuple[str, ...]] = {
    # CLIP's recipe: no decay on the temperature/bias and on any embedding table.
    "clip-train": ("*logit_scale*", "*logit_bias*", "*positional_embedding*", "*class_embedding*",
                   "*token_embedding*", "*cls_emb*"),
    # open_clip_train's `exclude` rule (main.py): decays the token and positional embeddings.
    "open_clip": ("*bn*", "*ln*", "*bias*", "*logit_scale*"),
}
# open_clip's names for the input end of a transformer tower (layer 0 of layer-wise decay) and
# its blocks (layers 1..L); everything else (final norm, projections) is the output group.
_OPEN_CLIP_LAYERS = {
    "stem": r"^(?:conv1|class_embedding|positional_embedding|ln_pre|token_embedding|patch_dropout)",
    "blocks": r"^transformer\.resblocks\.(\d+)",
}


def uses_weight_decay(name: str, param: torch.Tensor, patterns: tuple[str, ...] = NO_DECAY_PRESETS["clip-train"]) -> bool:
    """True for weight matrices whose name matches none of the no-decay patterns."""
    if param.ndim < 2:
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in patterns)


def tower_of(name: str) -> str:
    """'image', 'text' or 'shared' (temperature and bias) for an open_clip parameter name."""
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return "shared"
    return "text"


def layer_ids(model: nn.Module, tower: str) -> dict[str, int]:
    """Full parameter name -> layer index (0 = input end) of one tower, with timm's grouping
    (`group_with_matcher`, as timm's param_groups_layer_decay does): open_clip's block naming, or a timm
    trunk's own group_matcher. Names the matcher leaves out go to the last (output) group."""
    from timm.models import group_parameters
    from timm.models._manipulate import group_with_matcher  # what group_parameters calls

    if tower == "image":
        visual = model.visual
        trunk = getattr(visual, "trunk", None)
        if trunk is not None and hasattr(trunk, "group_matcher"):  # open_clip's TimmModel
            ids = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
            last = max(ids.values()) + 1
            return {f"visual.{n}": ids.get(n.removeprefix("trunk."), last) if n.startswith("trunk.") else last
                    for n, _ in visual.named_parameters()}
        named, prefix = list(visual.named_parameters()), "visual."
    else:
        text = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower in .text
        named, prefix = (list(text.named_parameters()), "text.") if text is not None else (
            [(n, p) for n, p in model.named_parameters() if tower_of(n) == "text"], "")
    ids = group_with_matcher(named, _OPEN_CLIP_LAYERS, reverse=True)
    return {prefix + n: i for n, i in ids.items()}


def trunk_no_decay_patterns(model: nn.Module) -> tuple[str, ...]:
    """A timm trunk's own no-decay names (`no_weight_decay()`: pos_embed, cls_token, reg_token,
    dist_token for a ViT), as full-model patterns: timm's names for the embeddings that the
    clip-train preset's open_clip names (*positional_embedding*, *class_embedding*) miss."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None or not hasattr(trunk, "no_weight_decay"):
        return ()
    return tuple(f"visual.trunk.{name}" for name in sorted(trunk.no_weight_decay()))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups over the trainable parameters: by tower (per-tower LR), weight decay and, with
    layer-wise decay, layer. Each group's `lr_scale` multiplies the scheduled learning rate."""
    patterns = NO_DECAY_PRESETS[cfg.no_decay] + tuple(cfg.no_decay_patterns)
    if cfg.no_decay == "clip-train":  # the open_clip preset stays open_clip_train's rule exactly
        patterns += trunk_no_decay_patterns(model)
    lr_scale = {"image": cfg.image_lr_scale, "text": cfg.text_lr_scale, "shared": 1.0}
    layer_decay = {"image": cfg.image_layer_decay, "text": cfg.text_layer_decay}
    layers: dict[str, tuple[dict[str, int], int]] = {}
    for tower, decay in layer_decay.items():
        if decay != 1.0:
            ids = layer_ids(model, tower)
            if len(set(ids.values())) < 3:
                raise ConfigError(f"optim.{tower}_layer_decay: the {tower} tower has no transformer blocks "
                                  "that open_clip or timm names; set it to 1 (off)")
            layers[tower] = (ids, max(ids.values()))
    groups: dict[tuple[str, bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower, decay = tower_of(name), uses_weight_decay(name, param, patterns)
        layer, scale = -1, lr_scale[tower]
        if tower in layers:
            ids, last = layers[tower]
            layer = ids[name]
            scale *= layer_decay[tower] ** (last - layer)
        group = groups.setdefault((tower, decay, layer), {
            "params": [], "name": f"{tower}/{'decay' if decay else 'no_decay'}" + (f"/layer{layer}" if layer >= 0 else ""),
            "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def optimizer_kwargs(cfg: OptimConfig, device_type: str) -> dict[str, Any]:
    """Keyword arguments for timm's factory: betas/eps (timm drops them for optimizers without
    them), fused AdamW on CUDA (one kernel for all parameters), then the user's optim.kwargs."""
    kwargs: dict[str, Any] = {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if _timm_name(cfg.opt).startswith("adafactor"):
        # Adafactor's eps and betas mean something else (a 1e-30 regulariser, optional
        # momentum): keep its own defaults unless optim.kwargs sets them.
        kwargs = {}
    if _timm_name(cfg.opt) in ("adamw", "adam") and device_type == "cuda" \
            and not {"fused", "foreach"} & set(cfg.kwargs):
        kwargs["fused"] = True
    return {**kwargs, **cfg.kwargs}


def _timm_name(opt: str) -> str:
    return opt.lower().removeprefix("timm/")


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """The optimizer `optim.opt` from timm's factory over `param_groups`; `device_type` is where
    the parameters will live (fused AdamW only on CUDA)."""
    from timm.optim import create_optimizer_v2, list_optimizers

    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: both towers are locked (model.lock_image and model.lock_text)")
    name = _timm_name(cfg.opt)
    if name.split("_")[-1] not in list_optimizers():
        close = [o for o in list_optimizers() if name[:3] in o][:8]
        raise ConfigError(f"optim.opt: timm has no optimizer {cfg.opt!r}"
                          + (f"; did you mean one of {close}?" if close else "; see timm.optim.list_optimizers()"))
    try:
        return create_optimizer_v2(groups, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   **optimizer_kwargs(cfg, device_type))
    except TypeError as err:  # an optim.kwargs key the optimizer does not take
        raise ConfigError(f"optim.kwargs: {err}") from None


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "const-cooldown":
        # As open_clip_train's const_lr_cooldown (so that a recipe ported from open_clip gets
        # the same rates): the first cooldown step still runs at lr, the last at
        # min_lr + (lr - min_lr) * (1 / cooldown_steps)^power; min_lr is the step after the run.
        cooldown_start = total_steps - cfg.cooldown_steps
        if step < cooldown_start:
            return cfg.lr
        frac = min((step - cooldown_start) / cfg.cooldown_steps, 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - frac) ** cfg.cooldown_power
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
