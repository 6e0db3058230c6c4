"""Weight-decay groups, per-tower learning rates, schedules, and LiT tower locking."""

import math

import pytest
import torch

from clip_train.config import ModelConfig, OptimConfig
from clip_train.model import build_model, tower_trainable
from clip_train.optim import build_optimizer, lr_at, param_groups, set_lr

TINY = "configs/models/tiny-vit.json"


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig(name=TINY)).model


def test_weight_decay_only_on_weight_matrices(tiny):
    groups = param_groups(tiny, OptimConfig(weight_decay=0.2))
    names = {id(p): n for n, p in tiny.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed.isdisjoint(plain) and decayed | plain == set(names.values())
    for name in ("logit_scale", "positional_embedding", "token_embedding.weight", "visual.class_embedding",
                 "visual.positional_embedding", "ln_final.weight", "ln_final.bias", "visual.ln_post.weight"):
        assert name in plain, name
    assert all(not n.endswith(".bias") and ".ln_" not in n for n in decayed)
    assert "visual.conv1.weight" in decayed and "text_projection" in decayed
    assert any(n.endswith("attn.in_proj_weight") for n in decayed)


def test_per_tower_learning_rate(tiny):
    opt = build_optimizer(tiny, OptimConfig(lr=1e-3, image_lr_scale=0.1))
    set_lr(opt, 1e-3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["image/decay"] == pytest.approx(1e-4) and lrs["image/no_decay"] == pytest.approx(1e-4)
    assert lrs["text/decay"] == pytest.approx(1e-3) and lrs["shared/no_decay"] == pytest.approx(1e-3)


def test_schedules():
    cos = OptimConfig(lr=1.0, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, cos, 110) == pytest.approx(0.1) and lr_at(9, cos, 110) == pytest.approx(1.0)
    assert lr_at(10, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, cos, 110) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(109, cos, 110) == pytest.approx(0.1, abs=1e-3)
    const = OptimConfig(lr=1.0, schedule="constant", warmup_steps=2)
    assert [lr_at(s, const, 10) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    cool = OptimConfig(lr=1.0, schedule="const-cooldown", cooldown_steps=4, min_lr=0.0)
    got = [lr_at(s, cool, 10) for s in range(10)]
    assert got[:6] == pytest.approx([1.0] * 6) and got[6:] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert all(math.isfinite(x) for x in got)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lit_locking_freezes_what_it_says():
    full = trainable(build_model(ModelConfig(name=TINY)).model)
    locked = build_model(ModelConfig(name=TINY, lock_image=True)).model
    assert not any(n.startswith("visual.") for n in trainable(locked))
    assert "logit_scale" in trainable(locked) and tower_trainable(locked) == (False, True)
    partial = trainable(build_model(ModelConfig(name=TINY, lock_image=True, lock_image_unlocked_groups=2)).model)
    visual = {n for n in partial if n.startswith("visual.")}
    # open_clip's ViT groups from the end: projection, then last block + final norm, ...
    assert visual and visual < {n for n in full if n.startswith("visual.")}
    assert {"visual.proj", "visual.ln_post.weight"} < visual
    assert any("resblocks.1." in n for n in visual) and not any("resblocks.0." in n for n in visual)
    text_locked = build_model(ModelConfig(name=TINY, lock_text=True)).model
    assert tower_trainable(text_locked) == (True, False)
    # open_clip's text groups from the end: projection, last block + final norm, ...
    assert trainable(build_model(ModelConfig(name=TINY, lock_text=True, lock_text_unlocked_layers=1)).model) \
        - {n for n in full if n.startswith("visual.")} == {"text_projection", "logit_scale"}
    two = trainable(build_model(ModelConfig(name=TINY, lock_text=True, lock_text_unlocked_layers=2)).model)
    text = {n for n in two if not n.startswith("visual.") and n != "logit_scale"}
    assert {"text_projection", "ln_final.weight"} < text
    assert any("transformer.resblocks.1." in n for n in text) and not any("transformer.resblocks.0." in n for n in text)


def test_both_towers_locked_is_an_error():
    model = build_model(ModelConfig(name=TINY, lock_image=True, lock_text=True)).model
    model.logit_scale.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())
    assert torch.is_tensor(model.logit_scale)
