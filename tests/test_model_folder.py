"""The model folder's pieces without a training run (the run's folder is checked end to end in
test_train.py and test_clip_benchmark.py), and the run's first line in words."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import REPO

from clip_train.config import load_config
from clip_train.hub import RunFacts, write_model_folder
from clip_train.model import build_model
from clip_train.runtime import describe_run

TINY = str(REPO / "configs/models/tiny-vit.json")


def test_folder_keeps_forced_image_size_preprocessing_and_loads_in_open_clip(tmp_path):
    cfg = load_config(None, [f"model.name={TINY}", "model.force_image_size=48", "model.image_interpolation=bilinear",
                             "model.image_mean=[0.5,0.5,0.5]", "model.image_std=[0.25,0.25,0.25]"])
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    folder = write_model_folder(tmp_path / "m", bundle.model, model=bundle.model, tokenizer=bundle.tokenizer,
                                name=bundle.name, cfg=cfg, facts=RunFacts(step=None))
    saved = json.loads((folder / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["vision_cfg"]["image_size"] == 48  # open_clip's registry still says 32
    assert open_clip.get_model_config(bundle.name)["vision_cfg"]["image_size"] == 32
    pp = saved["preprocess_cfg"]
    assert (pp["mean"], pp["std"], pp["interpolation"], pp["size"]) == ([0.5] * 3, [0.25] * 3, "bilinear", [48, 48])
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    ref = bundle.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    # The eval transform open_clip builds from the folder is clip-train's eval transform.
    from PIL import Image

    image = Image.fromarray((torch.arange(70 * 90 * 3) % 251).reshape(70, 90, 3).to(torch.uint8).numpy())
    assert torch.equal(preprocess(image), bundle.eval_transform(image))
    card = (folder / "README.md").read_text()
    assert "| steps | (unknown) |" in card and "Not evaluated when this folder was written" in card
    # Writing again replaces the folder whole (no stale file from an older export).
    (folder / "stale.bin").write_bytes(b"x")
    write_model_folder(folder, bundle.model, model=bundle.model, tokenizer=bundle.tokenizer,
                       name=bundle.name, cfg=cfg, facts=RunFacts(step=3, processes=2))
    assert not (folder / "stale.bin").exists()


def test_first_line_in_words():
    def line(overrides, **kwargs):
        cfg = load_config(None, ["train.local_batch_size=32", "train.output_dir=runs/x", *overrides])
        args = dict(model_name="ViT-B-32", processes=8, device_type="cuda", mixed_precision="bf16",
                    sharded=False, uint8_batches=True)
        return describe_run(cfg, **{**args, **kwargs})

    assert line(["train.chunk_size=8", "train.steps=100"]) == (
        "training ViT-B-32: DDP over 8 GPU processes (full replicas, gradients all-reduced); global batch 256 "
        "(8 x 32); bf16 autocast, TF32 float32 matmuls; gradient cache on (chunks of 8 of 32 samples per "
        "process); data: fast decode, 2 loader workers per process, uint8 batches normalised on the device; "
        "100 steps; "
        "outputs in runs/x")
    fsdp = line(["train.chunk_size=16", "train.sharded_grad_reduce=last_chunk", "train.tf32=false",
                 "train.remote_dir=s3://b/x"], sharded=True, mixed_precision="fp16", start_step=40)
    assert "FSDP2 over 8 GPU processes (parameters, gradients and optimizer state sharded" in fsdp
    assert "; fp16 autocast with loss scaling; " in fsdp and "gradients reduced last chunk)" in fsdp
    assert "1000 steps (resuming at step 40); outputs in runs/x (mirrored to s3://b/x)" in fsdp
    one = line(["data.workers=0"], processes=1, device_type="cpu", mixed_precision="no", uint8_batches=False)
    assert "one process on the CPU; global batch 32 (1 x 32); fp32; gradient cache off; data: fast decode, decoded " \
           "in the training process, float32 batches" in one
    # The data.decode path is named.
    cfg = load_config(None, ["data.decode=exact"])
    assert "data: exact decode, 2 loader workers" in describe_run(
        cfg, model_name="m", processes=1, device_type="cpu", mixed_precision="no", sharded=False,
        uint8_batches=True)


@pytest.mark.parametrize("name", ["local-dir:/nonexistent/folder"])
def test_model_name_local_dir_must_be_a_model_folder(name):
    from clip_train.config import ConfigError, check_paths

    with pytest.raises(ConfigError, match="model.name: .* not a model folder"):
        check_paths(load_config(None, [f"model.name={name}"]), training=False)
