"""Trained-looking embeddings for precision tests: the late-training regime where each row's
positive logit dominates and the loss is ~1e-3..1e-6 (tests/test_loss.py, tests/test_negatives.py,
tests/helpers/dist_loss_check.py; benchmarks/loss_precision.py has its own copy)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def aligned_pairs(b: int, d: int, scale: float, *, k: int = 0, seed: int = 0,
                  margin: float = 14.0, noise: float = 0.02) -> tuple[torch.Tensor, ...]:
    """Raw (img, txt, queue_img, queue_txt), float64 holding float32 values (the comparison then
    measures the maths, not the rounding of the inputs). Every vector shares one direction, so
    negatives have cosine ~ 1 - (margin + log(b + k)) / scale, and each text is its image plus
    small noise (cosine ~0.9999): a row's loss is then ~e^-margin. The queue is k more pairs."""
    g = torch.Generator().manual_seed(seed)
    rho = min(max(0.0, 1.0 - (margin + math.log(b + k)) / scale), 0.98)
    common_D = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    common_D *= math.sqrt(d * rho / (1.0 - rho))
    img = torch.randn(b + k, d, generator=g, dtype=torch.float64) + common_D
    txt = img + noise * torch.randn(b + k, d, generator=g, dtype=torch.float64)
    img, txt = img.float().double(), txt.float().double()
    return img[:b], txt[:b], img[b:], txt[b:]


def siglip_bias(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """A SigLIP bias halfway between the lowest positive and the highest negative logit: every
    pair is classified with a margin, as late in training."""
    cos_BB = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    eye_BB = torch.eye(img.shape[0], dtype=torch.bool)
    middle = (float(cos_BB[eye_BB].min()) + float(cos_BB[~eye_BB].max())) / 2
    return float(torch.tensor(-scale * middle, dtype=torch.float32))
