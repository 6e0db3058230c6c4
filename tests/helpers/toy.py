"""A two-tower toy with open_clip's encode_* interface, and an independent CLIP loss reference."""

import math

import torch
import torch.nn.functional as F
from torch import nn

D = 8


class ToyClip(nn.Module):
    """Dropout in both towers (p > 0) makes every forward random: RNG replay is then needed."""

    def __init__(self, p: float):
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Dropout(p), nn.Linear(16, D))
        self.token_embedding = nn.Embedding(20, 16)
        self.text_proj = nn.Sequential(nn.Dropout(p), nn.Linear(16, D))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, t):
        return self.text_proj(self.token_embedding(t).mean(1))


def clip_loss(img, txt, logit_scale, logit_bias=None):
    """Plain single-process CLIP loss over the whole batch (float32 unless given float64)."""
    dtype = torch.float64 if img.dtype == torch.float64 else torch.float32
    img, txt = F.normalize(img.to(dtype), dim=-1), F.normalize(txt.to(dtype), dim=-1)
    logits = logit_scale.to(dtype).exp() * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def toy_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 20, (n, 5), generator=g)
