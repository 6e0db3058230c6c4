"""Parameter groups (no weight decay on gains, biases, embeddings, temperature) and LR schedules.

The schedule is a pure function of the optimizer step, so resuming needs only the step: no
scheduler object to checkpoint, and Accelerate's scheduler wrapper (which steps once per process
when batches are not split) stays out of the way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clip_train.config import OptimConfig

# Names open_clip gives to parameters that CLIP trains without weight decay: the temperature and
# bias, positional/class embeddings and token embeddings (besides every 1-D gain/bias tensor).
_NO_DECAY_NAMES = ("logit_scale", "logit_bias", "positional_embedding", "class_embedding",
                   "token_embedding", "cls_emb")


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for weight matrices; False for biases, norm gains, embeddings and the temperature."""
    if param.ndim < 2:
        return False
    return not any(part in name for part in _NO_DECAY_NAMES)


def tower_of(name: str) -> str:
    """'image', 'text' or 'shared' (temperature and bias) for an open_clip parameter name."""
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return "shared"
    return "text"


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups over the trainable parameters, by tower (for per-tower LR) and weight decay."""
    lr_scale = {"image": cfg.image_lr_scale, "text": cfg.text_lr_scale, "shared": 1.0}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower, decay = tower_of(name), uses_weight_decay(name, param)
        group = groups.setdefault((tower, decay), {
            "params": [], "name": f"{tower}/{'decay' if decay else 'no_decay'}",
            "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": lr_scale[tower]})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: both towers are locked (model.lock_image and model.lock_text)")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "const-cooldown":
        cooldown_start = total_steps - cfg.cooldown_steps
        if step < cooldown_start:
            return cfg.lr
        frac = (step - cooldown_start + 1) / cfg.cooldown_steps
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(frac, 1.0)
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
