"""Config: YAML + dotted overrides, validation errors that name the key, every shipped config loads."""

from pathlib import Path

import pytest

from clip_train.config import Config, ConfigError, check_paths, expand_urls, load_config

REPO = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-3", "data.train=shards/train-{000000..000003}.tar",
                             "train.chunk_size=16", "train.local_batch_size=32", "wandb.tags=[a,b]"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.data.train == "shards/train-{000000..000003}.tar"
    assert cfg.train.chunk_size == 16
    assert cfg.wandb.tags == ["a", "b"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  warmup_steps: 5\ntrain:\n  steps: 50\ndata:\n  train: a.tar\n")
    cfg = load_config(str(path), ["train.steps=60"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML's 3e-4 read as a float, not a string
    assert cfg.optim.warmup_steps == 5 and cfg.train.steps == 60


@pytest.mark.parametrize("overrides, key", [
    (["optim.learning_rate=1e-3"], "optim.learning_rate"),   # unknown key
    (["train.steps=many"], "train.steps"),                   # wrong type
    (["optim.lr=-1"], "optim.lr"),                           # impossible value
    (["train.chunk_size=64", "train.local_batch_size=32"], "train.chunk_size"),
    (["loss.impl=fast"], "loss.impl"),
    (["train.precision=fp8"], "train.precision"),
    (["optim.schedule=const-cooldown"], "optim.cooldown_steps"),
    (["eval.zeroshot=val.tar"], "eval.classnames"),
    (["nonsense"], "nonsense"),
    (["model.name=hf-hub:org/repo", "model.pretrained=laion2b_s34b_b79k"], "model.pretrained"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x.tar", *overrides])
    assert key in str(err.value)


def test_missing_data_train_is_named_for_training_only():
    cfg = load_config(None, [])  # eval and export need no training data
    check_paths(cfg, training=False)
    with pytest.raises(ConfigError, match="data.train: required"):
        check_paths(cfg)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1e-3\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(path))


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  train: a.tar\n  shards: b.tar\n")
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(str(path))


def test_missing_shards_and_files_are_named(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    ok = load_config(None, [f"data.train={tmp_path}/train-{{000000..000000}}.tar"])
    check_paths(ok)
    cfg = load_config(None, [f"data.train={tmp_path}/train-{{000000..000002}}.tar"])
    with pytest.raises(ConfigError, match=r"data.train.*train-000001.tar.*and 1 more"):
        check_paths(cfg)
    cfg = load_config(None, [f"data.train={tmp_path}/train-000000.tar", "model.pretrained=/nope.pt"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        check_paths(cfg)
    # Tags and hub repos are resolved when the model is built; path-like values must exist.
    check_paths(load_config(None, [f"data.train={tmp_path}/train-000000.tar", "model.pretrained=laion2b_s34b_b79k",
                                   "model.pretrained_text_path=hf-hub:org/repo"]))
    with pytest.raises(ConfigError, match="model.pretrained_image_path"):
        check_paths(load_config(None, [f"data.train={tmp_path}/train-000000.tar",
                                       "model.pretrained_image_path=weights/image.safetensors"]))
    # Remote sources are checked when read, not here.
    check_paths(load_config(None, ["data.train=pipe:cat a.tar::s3://bucket/b-{0..3}.tar"]))


def test_expand_urls_braces_and_joins():
    assert expand_urls("a-{0..2}.tar::b.tar") == ["a-0.tar", "a-1.tar", "a-2.tar", "b.tar"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.train.steps > 0
    assert cfg.model.name.endswith(".json") is False or (REPO / cfg.model.name).is_file()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_name_real_models_tags_and_optimizers(path):
    """What needs open_clip/timm (no network): the model, its pretrained tag, the optimizer."""
    import open_clip
    from timm.optim import list_optimizers

    from clip_train.model import resolve_model_name

    cfg = load_config(str(path))
    name = resolve_model_name(str(REPO / cfg.model.name) if cfg.model.name.endswith(".json") else cfg.model.name)
    for spec in (cfg.model.pretrained, cfg.model.pretrained_image_path, cfg.model.pretrained_text_path):
        if spec and not spec.startswith(("/", "hf-hub:")):
            assert open_clip.get_pretrained_cfg(name, spec), f"{spec} is not an open_clip tag of {name}"
    assert cfg.optim.opt.removeprefix("timm/") in list_optimizers()
