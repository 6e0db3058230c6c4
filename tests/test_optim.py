"""Weight-decay groups, per-tower learning rates, schedules, and LiT tower locking."""

import copy
import math

import pytest
import torch

from clip_train.config import ConfigError, ModelConfig, OptimConfig, load_config
from clip_train.model import build_model, tower_trainable
from clip_train.optim import build_optimizer, lr_at, optimizer_kwargs, param_groups, set_lr

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
    # open_clip's cooldown: the first of the 4 steps still at lr, min_lr is the step after the run.
    assert got[:7] == pytest.approx([1.0] * 7) and got[7:] == pytest.approx([0.75, 0.5, 0.25])
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


# ---------------------------------------------------------------------------------------------
# Optimizers through timm, weight-decay rules, layer-wise decay, cooldown power, fused AdamW


@pytest.mark.parametrize("opt, cls", [("adamw", "AdamW"), ("lion", "Lion"), ("lamb", "Lamb"),
                                      ("timm/adafactor", "Adafactor"), ("sgd", "SGD")])
def test_optimizer_by_name_through_timm(tiny, opt, cls):
    optimizer = build_optimizer(tiny, OptimConfig(opt=opt, lr=1e-3))
    assert type(optimizer).__name__ == cls
    # Our groups (weight decay, lr scale) reach the optimizer unchanged.
    assert {g["name"] for g in optimizer.param_groups} == {g["name"] for g in param_groups(tiny, OptimConfig())}
    assert all(g["weight_decay"] in (0.0, 0.2) for g in optimizer.param_groups)


def test_optimizer_kwargs_and_errors(tiny):
    lamb = build_optimizer(tiny, OptimConfig(opt="lamb", kwargs={"trust_clip": True, "max_grad_norm": 2.0}))
    assert lamb.defaults["trust_clip"] is True and lamb.defaults["max_grad_norm"] == 2.0
    assert lamb.defaults["betas"] == (0.9, 0.98)
    with pytest.raises(ConfigError, match="optim.opt: timm has no optimizer 'lamp'"):
        build_optimizer(tiny, OptimConfig(opt="lamp"))
    with pytest.raises(ConfigError, match="optim.kwargs"):
        build_optimizer(tiny, OptimConfig(opt="lion", kwargs={"no_such_arg": 1}))
    with pytest.raises(ConfigError, match="optim.kwargs.lr"):
        load_config(None, ["optim.kwargs.lr=0.1"])
    cfg = load_config(None, ["optim.opt=lamb", "optim.kwargs.decoupled_decay=true"])
    assert cfg.optim.kwargs == {"decoupled_decay": True}


def test_fused_adamw_on_cuda_only():
    assert optimizer_kwargs(OptimConfig(), "cuda")["fused"] is True
    assert "fused" not in optimizer_kwargs(OptimConfig(), "cpu")
    assert "fused" not in optimizer_kwargs(OptimConfig(opt="lion"), "cuda")
    assert optimizer_kwargs(OptimConfig(kwargs={"fused": False}), "cuda")["fused"] is False
    assert "fused" not in optimizer_kwargs(OptimConfig(kwargs={"foreach": True}), "cuda")
    # On the CPU the default AdamW is the plain (unfused) one, as before.
    assert not build_optimizer(build_model(ModelConfig(name=TINY)).model, OptimConfig()).defaults["fused"]


def test_no_decay_presets_and_patterns(tiny):
    def decayed(cfg):
        names = {id(p): n for n, p in tiny.named_parameters()}
        return {names[id(p)] for g in param_groups(tiny, cfg) if g["weight_decay"] > 0 for p in g["params"]}

    ours = decayed(OptimConfig())
    theirs = decayed(OptimConfig(no_decay="open_clip"))
    # open_clip_train decays the token and positional embeddings; we do not.
    assert theirs - ours == {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"}
    assert ours <= theirs
    extra = decayed(OptimConfig(no_decay_patterns=["visual.transformer.resblocks.0.*", "text_projection"]))
    assert extra == {n for n in ours if not n.startswith("visual.transformer.resblocks.0.") and n != "text_projection"}


def test_layer_wise_lr_decay(tiny):
    cfg = OptimConfig(lr=1.0, image_layer_decay=0.5, text_layer_decay=0.8, image_lr_scale=0.1)
    names = {id(p): n for n, p in tiny.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in param_groups(tiny, cfg) for p in g["params"]}
    # Tiny towers: embeddings (layer 0), 2 blocks, the output group (norm + projection).
    assert scale["visual.proj"] == scale["visual.ln_post.weight"] == pytest.approx(0.1)
    assert scale["visual.transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.1 * 0.5)
    assert scale["visual.transformer.resblocks.0.attn.in_proj_weight"] == pytest.approx(0.1 * 0.25)
    assert scale["visual.conv1.weight"] == scale["visual.class_embedding"] == pytest.approx(0.1 * 0.125)
    assert scale["text_projection"] == scale["ln_final.bias"] == pytest.approx(1.0)
    assert scale["transformer.resblocks.1.ln_1.weight"] == pytest.approx(0.8)
    assert scale["token_embedding.weight"] == scale["positional_embedding"] == pytest.approx(0.8 ** 3)
    assert scale["logit_scale"] == 1.0
    opt = build_optimizer(tiny, cfg)
    set_lr(opt, 2e-3)
    got = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert got["visual.conv1.weight"] == pytest.approx(2e-3 * 0.1 * 0.125)


@pytest.mark.parametrize("warmup, steps, cooldown, power, min_lr", [
    (0, 10, 4, 1.0, 0.1),  # the example: open_clip gives ..., 1.0, 1.0, 0.775, 0.55, 0.325
    (2, 20, 8, 2.0, 0.1),
    (3, 12, 9, 0.5, 0.0),  # warmup ends where the cooldown starts; sqrt cooldown
    (0, 5, 5, 1.0, 0.2),  # the whole run is cooldown
])
def test_const_cooldown_matches_open_clip(warmup, steps, cooldown, power, min_lr):
    """Every step's rate equals open_clip_train's const_lr_cooldown on the same arguments."""
    from open_clip_train.scheduler import const_lr_cooldown

    cfg = OptimConfig(lr=1.0, schedule="const-cooldown", warmup_steps=warmup, cooldown_steps=cooldown,
                      cooldown_power=power, min_lr=min_lr)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = const_lr_cooldown(opt, 1.0, warmup, steps, cooldown, cooldown_power=power, cooldown_end_lr=min_lr)
    ours = [lr_at(step, cfg, steps) for step in range(steps)]
    theirs = [reference(step) for step in range(steps)]
    assert ours == pytest.approx(theirs, rel=0, abs=1e-15)
    if (warmup, steps, cooldown) == (0, 10, 4):
        assert ours[-5:] == pytest.approx([1.0, 1.0, 0.775, 0.55, 0.325], abs=1e-15)


@pytest.mark.parametrize("opt", ["lion", "lamb"])
def test_optimizer_state_round_trip_with_layer_groups(opt):
    """Resuming from (model, optimizer) state dicts continues exactly, with layer-wise groups."""
    cfg = OptimConfig(opt=opt, lr=1e-2, image_layer_decay=0.7, text_layer_decay=0.7, weight_decay=0.1)

    def fresh():
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=TINY)).model
        return model, build_optimizer(model, cfg)

    def steps(model, optimizer, first, n):
        for k in range(first, first + n):
            gen = torch.Generator().manual_seed(k)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            set_lr(optimizer, lr_at(k, cfg, 10))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    model, optimizer = fresh()
    steps(model, optimizer, 0, 2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict())
    steps(model, optimizer, 2, 3)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(saved)
    resumed_opt.load_state_dict(saved_opt)
    assert [g["lr_scale"] for g in resumed_opt.param_groups] == [g["lr_scale"] for g in optimizer.param_groups]
    steps(resumed, resumed_opt, 2, 3)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_open_clip_preset_equals_open_clip_trains_rule(tiny):
    """Reference: open_clip_train/main.py's `exclude` (no weight decay) rule, restated."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    names = {id(p): n for n, p in tiny.named_parameters()}
    groups = param_groups(tiny, OptimConfig(no_decay="open_clip"))
    ours = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert ours == {n for n, p in tiny.named_parameters() if exclude(n, p)}


def test_adafactor_keeps_its_own_eps_and_betas(tiny):
    opt = build_optimizer(tiny, OptimConfig(opt="adafactor", lr=1e-3))
    assert opt.defaults["eps"] == 1e-30 and opt.defaults["beta1"] is None
    opt = build_optimizer(tiny, OptimConfig(opt="adafactor", lr=1e-3, kwargs={"eps": 1e-20}))
    assert opt.defaults["eps"] == 1e-20


def test_timm_trunk_embeddings_get_no_decay_as_timm_says(tmp_path):
    """The clip-train preset leaves a timm trunk's embeddings undecayed, as the trunk's own
    no_weight_decay() does through timm's param_groups_weight_decay (the reference)."""
    import json

    from timm.optim import param_groups_weight_decay

    tiny_text = json.loads(open(TINY).read())["text_cfg"]
    path = tmp_path / "tiny-timm-vit.json"
    path.write_text(json.dumps({"embed_dim": 32, "text_cfg": tiny_text, "vision_cfg": {
        "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "token",
        "timm_proj": "linear", "image_size": 224}}))
    model = build_model(ModelConfig(name=str(path))).model
    trunk = model.visual.trunk
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)] for g in param_groups(model, OptimConfig(weight_decay=0.2)) if g["weight_decay"] == 0
            for p in g["params"]}
    trunk_names = {id(p): f"visual.trunk.{n}" for n, p in trunk.named_parameters()}
    theirs = {trunk_names[id(p)] for g in param_groups_weight_decay(trunk, 0.2, no_weight_decay_list=trunk.no_weight_decay())
              if g["weight_decay"] == 0 for p in g["params"]}
    assert {"visual.trunk.pos_embed", "visual.trunk.cls_token"} <= theirs
    assert {n for n in ours if n.startswith("visual.trunk.")} == theirs
    # The open_clip preset stays open_clip_train's name rule: it decays the trunk's embeddings.
    open_clip_no_decay = {names[id(p)] for g in param_groups(model, OptimConfig(no_decay="open_clip"))
                          if g["weight_decay"] == 0 for p in g["params"]}
    assert "visual.trunk.pos_embed" not in open_clip_no_decay


def test_lock_image_freeze_bn_stats_is_open_clips(tmp_path):
    """model.lock_image_freeze_bn_stats: the locked BatchNorm tower is open_clip's
    lock_image_tower(freeze_bn_stats=True) on the same model, and a training-mode forward
    leaves its running statistics where they were (without the key they move)."""
    import json

    import open_clip

    tiny_text = json.loads(open(TINY).read())["text_cfg"]
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps({"embed_dim": 32, "text_cfg": tiny_text, "vision_cfg": {
        "image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32}}))

    def stats(model):
        return {n: b.clone() for n, b in model.visual.named_buffers() if "running_" in n}

    def train_forward(model):
        model.train()
        with torch.no_grad():
            model.encode_image(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))

    torch.manual_seed(0)
    ours = build_model(ModelConfig(name=str(path), lock_image=True, lock_image_freeze_bn_stats=True)).model
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-rn")
    reference.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    assert repr(ours.visual) == repr(reference.visual) and "FrozenBatchNorm2d" in repr(ours.visual)
    before = stats(ours)
    assert before and before.keys() == stats(reference).keys()
    train_forward(ours)
    train_forward(reference)
    for name, value in stats(ours).items():
        assert torch.equal(value, before[name]) and torch.equal(value, stats(reference)[name]), name
    assert tower_trainable(ours) == (False, True)
    # Without the key (open_clip's default) the locked tower's statistics follow the data.
    moving = build_model(ModelConfig(name=str(path), lock_image=True)).model
    start = stats(moving)
    train_forward(moving)
    assert any(not torch.equal(v, start[n]) for n, v in stats(moving).items())
    with pytest.raises(ConfigError, match="model.lock_image_freeze_bn_stats"):
        load_config(None, ["model.lock_image_freeze_bn_stats=true"])
