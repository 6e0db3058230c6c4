"""Pretrained weights the open_clip way (local file, open_clip tag, hf-hub:), per-tower loading,
and the one-line error when offline and not cached. Never touches the network: a Hugging Face
cache is built in a temp HF_HOME from the tiny model, and huggingface_hub runs offline."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip import pretrained as oc_pretrained
from safetensors.torch import save_file

from clip_train.__main__ import main
from clip_train.config import ClipTrainError, ModelConfig
from clip_train.model import build_model
from clip_train.pretrained import PretrainedError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/models/tiny-vit.json")
MEAN = [0.5, 0.25, 0.125]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline huggingface_hub whose cache is an empty temp folder (HF_HOME/hub)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import: point the live constants at the temp cache too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def tiny_weights(seed: int) -> dict[str, torch.Tensor]:
    build_model(ModelConfig(name=TINY))  # registers tiny-vit with open_clip
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-vit")
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def add_hub_repo(cache: Path, repo_id: str, state_dict: dict, *, config: bool = True) -> None:
    """Write an open_clip hf-hub repo in huggingface_hub's cache layout, as a download would."""
    org, name = repo_id.split("/")
    root = cache / f"models--{org}--{name}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    save_file(state_dict, str(snap / "open_clip_model.safetensors"))
    if config:
        cfg = json.loads(Path(TINY).read_text())
        (snap / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": cfg, "preprocess_cfg": {"mean": MEAN, "std": [0.5, 0.5, 0.5]}}))


def assert_same(model, state_dict, prefix=""):
    own = model.state_dict()
    keys = [k for k in state_dict if k.startswith(prefix)]
    assert keys
    for k in keys:
        torch.testing.assert_close(own[k], state_dict[k], rtol=0, atol=0, msg=k)


def normalize_mean(transform) -> list[float]:
    return list(next(t for t in transform.transforms if type(t).__name__ == "Normalize").mean)


def test_hf_hub_weights_and_model_load_offline(hub):
    weights = tiny_weights(1)
    add_hub_repo(hub, "test-org/tiny-clip", weights)
    bundle = build_model(ModelConfig(name=TINY, pretrained="hf-hub:test-org/tiny-clip"))
    assert_same(bundle.model, weights)
    # The repo's preprocessing comes with its weights.
    assert normalize_mean(bundle.eval_transform) == MEAN
    assert normalize_mean(bundle.train_transform) == MEAN
    # model.name=hf-hub:org/repo: architecture, weights and preprocessing from the repo.
    hub_bundle = build_model(ModelConfig(name="hf-hub:test-org/tiny-clip"))
    assert_same(hub_bundle.model, weights)
    assert normalize_mean(hub_bundle.eval_transform) == MEAN
    # With a weights file as well (`clip-train eval --checkpoint FILE`), the file wins.
    other = tiny_weights(7)
    save_file(other, str(hub / "other.safetensors"))
    assert_same(build_model(ModelConfig(name="hf-hub:test-org/tiny-clip")).model, weights)
    cfg = ModelConfig(name="hf-hub:test-org/tiny-clip")
    cfg.pretrained = str(hub / "other.safetensors")  # what run_eval does after validation
    assert_same(build_model(cfg).model, other)


def test_open_clip_tag_resolves_through_the_hub(hub, monkeypatch):
    # open_clip maps tags to hub repos in its registry (hf_hub='org/repo/'): a real one ...
    assert open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"] == \
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/"
    # ... and a fake one for the tiny model, served from the temp cache.
    weights = tiny_weights(2)
    add_hub_repo(hub, "test-org/tiny-tagged", weights, config=False)
    build_model(ModelConfig(name=TINY))
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "tiny-vit", {
        "tiny_test": oc_pretrained._pcfg(hf_hub="test-org/tiny-tagged/", mean=tuple(MEAN))})
    bundle = build_model(ModelConfig(name=TINY, pretrained="tiny_test"))
    assert_same(bundle.model, weights)
    assert normalize_mean(bundle.eval_transform) == MEAN  # the tag's preprocessing


def test_offline_and_not_cached_is_one_line(hub, tmp_path, capsys, monkeypatch):
    with pytest.raises(PretrainedError) as err:
        build_model(ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    message = str(err.value)
    assert isinstance(err.value, ClipTrainError)
    assert "laion2b_s34b_b79k" in message and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert "HF_HUB_OFFLINE=1" in message and str(hub) in message
    assert "open_clip.create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')" in message
    with pytest.raises(PretrainedError, match=r"hf-hub:nobody/nothing.*create_model\('hf-hub:nobody/nothing'\)"):
        build_model(ModelConfig(name=TINY, pretrained="hf-hub:nobody/nothing"))
    with pytest.raises(PretrainedError, match="model.name: hf-hub:nobody/nothing"):
        build_model(ModelConfig(name="hf-hub:nobody/nothing"))
    # Through the CLI: exit status 2, one line on stderr, no traceback.
    monkeypatch.setattr("clip_train.__main__._setup_logging", lambda: None)  # keep pytest's handlers
    (tmp_path / "val.tar").write_bytes(b"")
    rc = main(["eval", "model.name=ViT-B-32", "model.pretrained=laion2b_s34b_b79k",
               f"eval.retrieval={tmp_path}/val.tar"])
    err_text = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err_text
    lines = [line for line in err_text.splitlines() if line.startswith("clip-train: error:")]
    assert len(lines) == 1 and "laion2b_s34b_b79k" in lines[0] and "pre-fetch" in lines[0]


def test_unknown_tag_names_the_known_ones():
    with pytest.raises(ClipTrainError, match=r"model.pretrained: 'laion9b'.*laion2b_s34b_b79k"):
        build_model(ModelConfig(name="ViT-B-32", pretrained="laion9b"))


def test_per_tower_initialisation(hub, tmp_path):
    image_source, text_source = tiny_weights(3), tiny_weights(4)
    path = tmp_path / "image_source.pt"
    torch.save(image_source, path)
    add_hub_repo(hub, "test-org/text-source", text_source)
    bundle = build_model(ModelConfig(name=TINY, pretrained_image_path=str(path),
                                     pretrained_text_path="hf-hub:test-org/text-source"))
    model = bundle.model
    assert_same(model, image_source, "visual.")
    text = {k: v for k, v in text_source.items() if not k.startswith("visual.") and k != "logit_scale"}
    assert_same(model, text)
    # A bare image-tower state dict works too.
    bare = tmp_path / "visual.pt"
    torch.save({k.removeprefix("visual."): v for k, v in image_source.items() if k.startswith("visual.")}, bare)
    assert_same(build_model(ModelConfig(name=TINY, pretrained_image_path=str(bare))).model, image_source, "visual.")
    # A checkpoint of another architecture is refused, not half-loaded.
    wrong = tmp_path / "wrong.pt"
    torch.save({k: torch.zeros(3) for k in image_source}, wrong)
    with pytest.raises(PretrainedError, match="does not fit the image tower"):
        build_model(ModelConfig(name=TINY, pretrained_image_path=str(wrong)))


def test_base_tower_flags_reach_open_clip(monkeypatch, tmp_path):
    seen = {}
    real = open_clip.create_model_and_transforms

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    build_model(ModelConfig(name=TINY, pretrained_image=True, pretrained_text=True))
    assert seen["pretrained_image"] is True and seen["pretrained_text"] is True
    path = tmp_path / "w.pt"
    torch.save(tiny_weights(5), path)
    build_model(ModelConfig(name=TINY, pretrained_image=True, pretrained_text=True,
                            pretrained_text_path=str(path)))
    # A checkpoint for the text tower replaces the Hugging Face base weights.
    assert seen["pretrained_image"] is True and seen["pretrained_text"] is False


def serve_tag(hub, monkeypatch, repo_id: str, state_dict: dict, **tag_cfg) -> str:
    """A fake open_clip tag `tiny_tag` of tiny-vit whose weights live in the offline hub cache."""
    add_hub_repo(hub, repo_id, state_dict, config=False)
    build_model(ModelConfig(name=TINY))
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "tiny-vit", {
        "tiny_tag": oc_pretrained._pcfg(hf_hub=f"{repo_id}/", **tag_cfg)})
    return "tiny_tag"


def test_quick_gelu_tag_is_refused_or_forced_like_open_clip(hub, monkeypatch):
    """A tag trained with QuickGELU on a GELU model: open_clip warns 'QuickGELU mismatch'; we refuse
    in one line naming the fix. With force_quick_gelu both build the same QuickGELU model."""
    weights = tiny_weights(8)
    tag = serve_tag(hub, monkeypatch, "test-org/tiny-quickgelu", weights, quick_gelu=True)
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):
        open_clip.create_model("tiny-vit", pretrained=tag)
    with pytest.raises(ClipTrainError, match=r"model.pretrained: open_clip tag 'tiny_tag' was trained with "
                                             r"QuickGELU.*model.force_quick_gelu=true"):
        build_model(ModelConfig(name=TINY, pretrained=tag))
    with pytest.raises(ClipTrainError, match="model.pretrained_image_path: .*QuickGELU"):
        build_model(ModelConfig(name=TINY, pretrained_image_path=tag))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no mismatch left for open_clip to warn about
        reference = open_clip.create_model("tiny-vit", pretrained=tag, force_quick_gelu=True)
    model = build_model(ModelConfig(name=TINY, pretrained=tag, force_quick_gelu=True)).model
    assert_same(model, weights)
    act = type(model.visual.transformer.resblocks[0].mlp.gelu)
    assert act is type(reference.visual.transformer.resblocks[0].mlp.gelu) and act.__name__ == "QuickGELU"
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), reference.encode_image(image), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text), rtol=0, atol=0)
    # The real registry: checked before any download, naming open_clip's -quickgelu model.
    with pytest.raises(ClipTrainError, match=r"'laion400m_e31'.*use model.name=ViT-B-32-quickgelu"):
        build_model(ModelConfig(name="ViT-B-32", pretrained="laion400m_e31"))
    # A GELU tag on a forced-QuickGELU model is refused the other way round.
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "tiny-vit", {
        "tiny_tag": oc_pretrained._pcfg(hf_hub="test-org/tiny-quickgelu/")})
    with pytest.raises(ClipTrainError, match="trained with GELU.*model.force_quick_gelu=false"):
        build_model(ModelConfig(name=TINY, pretrained=tag, force_quick_gelu=True))


def test_per_tower_loading_converts_as_open_clips_full_load(tmp_path):
    """pretrained_image_path at another image size and a CLIP-layout text tower into a
    CustomTextCLIP model: the towers equal open_clip.load_checkpoint's on the same file."""
    source = tiny_weights(9)  # 32 px: a 4 x 4 grid of patches; CLIP layout (no text.*)
    path = tmp_path / "tiny.pt"
    torch.save(source, path)
    # Image tower at 64 px (8 x 8 grid): open_clip resizes visual.positional_embedding.
    reference = open_clip.create_model("tiny-vit", force_image_size=64)
    open_clip.load_checkpoint(reference, str(path))
    ours = build_model(ModelConfig(name=TINY, force_image_size=64, pretrained_image_path=str(path))).model
    want = {k: v for k, v in reference.state_dict().items() if k.startswith("visual.")}
    assert want["visual.positional_embedding"].shape[0] == 65 != source["visual.positional_embedding"].shape[0]
    assert_same(ours, want, "visual.")
    # Text tower into a CustomTextCLIP model (text.*): open_clip converts the CLIP layout.
    custom = json.loads(Path(TINY).read_text()) | {"custom_text": True}
    custom_path = tmp_path / "tiny-custom-text.json"
    custom_path.write_text(json.dumps(custom))
    ours = build_model(ModelConfig(name=str(custom_path), pretrained_text_path=str(path))).model
    reference = open_clip.create_model("tiny-custom-text")
    open_clip.load_checkpoint(reference, str(path))
    want = {k: v for k, v in reference.state_dict().items() if k.startswith("text.")}
    assert len(want) > 20 and "text.positional_embedding" in want
    assert_same(ours, want, "text.")
    # The other way (a CustomTextCLIP text tower into a CLIP model) open_clip does not convert:
    # refused in one line that names the fix.
    custom_weights = tmp_path / "custom.pt"
    torch.save(reference.state_dict(), custom_weights)
    with pytest.raises(PretrainedError, match=r"text tower .*CustomTextCLIP.*\"custom_text\": true"):
        build_model(ModelConfig(name=TINY, pretrained_text_path=str(custom_weights)))
    # A timm trunk at another size: open_clip resizes it (timm's set_input_size) only in a full
    # load, which model.pretrained is; per tower it is refused in one line naming that fix.
    timm_cfg = tmp_path / "tiny-timm.json"
    timm_cfg.write_text(json.dumps({"embed_dim": 32, "text_cfg": custom["text_cfg"], "vision_cfg": {
        "timm_model_name": "vit_tiny_patch16_224", "timm_pool": "token", "timm_proj": "linear", "image_size": 224}}))
    timm_weights = tmp_path / "timm.pt"
    torch.save(build_model(ModelConfig(name=str(timm_cfg))).model.state_dict(), timm_weights)
    with pytest.raises(PretrainedError, match=r"'visual.trunk.pos_embed' is \(1, 197, 192\) in the file, "
                                              r"\(1, 50, 192\) in the model.*as model.pretrained"):
        build_model(ModelConfig(name=str(timm_cfg), force_image_size=112, pretrained_image_path=str(timm_weights)))
    full = build_model(ModelConfig(name=str(timm_cfg), force_image_size=112, pretrained=str(timm_weights))).model
    assert full.visual.trunk.pos_embed.shape == (1, 50, 192)


def test_hub_fill_color_reaches_the_eval_transform(hub):
    """A hub repo's preprocess_cfg.fill_color (resize_mode=longest pads with it): our eval transform
    is open_clip's for that repo, pixel for pixel, on a non-square image."""
    weights = tiny_weights(10)
    add_hub_repo(hub, "test-org/tiny-longest", weights, config=False)
    snap = next((hub / "models--test-org--tiny-longest" / "snapshots").iterdir())
    (snap / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": json.loads(Path(TINY).read_text()),
        "preprocess_cfg": {"mean": MEAN, "std": [0.5, 0.5, 0.5], "resize_mode": "longest", "fill_color": 128}}))
    _, _, reference = open_clip.create_model_and_transforms("hf-hub:test-org/tiny-longest")
    ours = build_model(ModelConfig(name=TINY, pretrained="hf-hub:test-org/tiny-longest"))
    from PIL import Image
    image = Image.new("RGB", (64, 16), (10, 200, 30))
    expected = reference(image)
    assert not torch.equal(expected[:, 0], expected[:, 16])  # padded rows differ from the image's
    torch.testing.assert_close(ours.eval_transform(image), expected, rtol=0, atol=0)
    assert ours.model.visual.preprocess_cfg["fill_color"] == 128


def test_preprocessing_follows_the_image_tower(hub, tmp_path):
    """model.pretrained and pretrained_image_path both set: the image tower's preprocessing wins
    (key by key); a local tower file carries none, so model.pretrained's applies."""
    add_hub_repo(hub, "test-org/full", tiny_weights(11))  # mean MEAN
    image_repo = "test-org/image-tower"
    add_hub_repo(hub, image_repo, tiny_weights(12), config=False)
    snap = next((hub / "models--test-org--image-tower" / "snapshots").iterdir())
    (snap / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": json.loads(Path(TINY).read_text()), "preprocess_cfg": {"mean": [0.1, 0.2, 0.3]}}))
    both = build_model(ModelConfig(name=TINY, pretrained="hf-hub:test-org/full",
                                   pretrained_image_path=f"hf-hub:{image_repo}"))
    assert normalize_mean(both.eval_transform) == pytest.approx([0.1, 0.2, 0.3])
    std = next(t for t in both.eval_transform.transforms if type(t).__name__ == "Normalize").std
    assert list(std) == [0.5, 0.5, 0.5]  # not set by the tower's repo: model.pretrained's
    local = tmp_path / "tower.pt"
    torch.save(tiny_weights(13), local)
    with_file = build_model(ModelConfig(name=TINY, pretrained="hf-hub:test-org/full", pretrained_image_path=str(local)))
    assert normalize_mean(with_file.eval_transform) == MEAN
