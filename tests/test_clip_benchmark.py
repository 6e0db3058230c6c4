"""clip_benchmark interop, for real: the `clip_benchmark eval` command line on clip-train's model
folder (`--model local-dir:<folder>`, nothing else) and a data set in clip_benchmark's webdataset
layout must report the zero-shot top-1 that `clip-train eval --checkpoint <folder>` reports.

clip-benchmark 1.6.2 breaks with numpy >= 2.3 (its top-k accuracy converts a 1-element array
with float()) and imports `requests` and `pycocoevalcap` at start-up without pinning numpy, so it
does not go into our environment: the fixture installs it, with numpy < 2.3, into a separate
directory (`pip install --no-deps --target`, cached in pytest's cache directory; the rest of what
it imports, torch, open_clip, webdataset, scikit-learn, comes from our environment) and runs its
CLI in a subprocess with that directory first on PYTHONPATH."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/models/tiny-vit.json"
# What clip_benchmark's CLI imports that our environment lacks or has in a version it breaks on.
CLIP_BENCHMARK_PACKAGES = ["clip-benchmark==1.6.2", "numpy>=2,<2.3", "pycocoevalcap==1.2", "requests"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30)}
TEMPLATES = ["a photo of a {c} square.", "a {c} square", "something {c}"]
SHARD_SIZES = (20, 17, 11)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def clip_benchmark_env(request, tmp_path_factory) -> Path:
    """A directory holding clip-benchmark and numpy < 2.3, made once and cached in pytest's cache
    directory (a session temp directory under -p no:cacheprovider). Set CLIP_BENCHMARK_ENV to
    use a directory prepared elsewhere."""
    if os.environ.get("CLIP_BENCHMARK_ENV"):
        return Path(os.environ["CLIP_BENCHMARK_ENV"])
    tag = hashlib.sha1(" ".join(CLIP_BENCHMARK_PACKAGES).encode()).hexdigest()[:10]
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("clip-benchmark-env") if cache is not None else tmp_path_factory.mktemp("cb")
    target = root / tag
    if (target / "READY").exists():
        return target
    tmp = target.with_name(f"{tag}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--timeout", "60", "--target", str(tmp), *CLIP_BENCHMARK_PACKAGES],
        capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        offline = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                   "Max retries exceeded", "ConnectTimeout", "ReadTimeout")
        if any(s in out for s in offline):
            pytest.skip(f"PyPI unreachable, cannot install clip-benchmark: {out.strip().splitlines()[-1]}")
        raise AssertionError(f"pip install of {CLIP_BENCHMARK_PACKAGES} failed:\n{out[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / "READY").write_text("\n".join(CLIP_BENCHMARK_PACKAGES))
    return target


def _color_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cls = int(rng.integers(len(COLORS)))
        rgb = np.array(list(COLORS.values())[cls])
        pixels = np.clip(rgb + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype("uint8")
        out.append({"png": Image.fromarray(pixels), "cls": cls})
    return out


def _fitted_tiny_model(samples: list[dict]):
    """The tiny model after a few contrastive steps on colour/caption pairs: right more often
    than chance, wrong sometimes, so the two tools have real decisions to agree on."""
    from clip_train.config import ModelConfig
    from clip_train.loss import contrastive_loss
    from clip_train.model import build_model

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name=str(TINY)))
    model = bundle.model
    names = list(COLORS)
    images = torch.stack([bundle.train_transform(s["png"]) for s in samples])
    texts = bundle.tokenizer([f"a photo of a {names[s['cls']]} square." for s in samples])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        idx = torch.randperm(len(samples), generator=g)[:24]
        loss = contrastive_loss(model.encode_image(images[idx]), model.encode_text(texts[idx]),
                                model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return bundle


def test_clip_benchmark_cli_gives_clip_train_top1(clip_benchmark_env, tmp_path):
    from helpers.clip_benchmark_data import write_clip_benchmark_folder

    from clip_train.config import Config, ModelConfig
    from clip_train.hub import RunFacts, write_model_folder

    samples = _color_samples(sum(SHARD_SIZES))
    folder = write_clip_benchmark_folder(tmp_path / "wds_colors", samples, list(COLORS), TEMPLATES,
                                         SHARD_SIZES)
    bundle = _fitted_tiny_model(_color_samples(96, seed=1))
    # The model folder a run writes at its end (open_clip's hub layout): both tools load it alone.
    model_dir = write_model_folder(tmp_path / "model", bundle.model, model=bundle.model, tokenizer=bundle.tokenizer,
                                   name=bundle.name, cfg=Config(model=ModelConfig(name=str(TINY))),
                                   facts=RunFacts(step=15))
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "open_clip_config.json",
                                                            "open_clip_model.safetensors"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Both command lines at once: each spends most of its time importing torch.
    ours = subprocess.Popen(
        [sys.executable, "-m", "clip_train", "eval", f"eval.zeroshot.colors={folder}",
         "eval.batch_size=16", "eval.workers=0", "--checkpoint", str(model_dir),
         "--output", str(tmp_path / "ours.json")],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    theirs = subprocess.Popen(
        [sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", f"local-dir:{model_dir}",
         "--dataset", "wds/colors", "--dataset_root", str(folder), "--task", "zeroshot_classification",
         "--no_amp", "--batch_size", "16", "--num_workers", "0", "--output", str(tmp_path / "theirs.json")],
        cwd=tmp_path, env={**env, "PYTHONPATH": os.pathsep.join([str(clip_benchmark_env), str(REPO)])},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for proc in (ours, theirs):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]

    got = json.loads((tmp_path / "ours.json").read_text())["results"]
    ref = json.loads((tmp_path / "theirs.json").read_text())["metrics"]
    print(f"clip_benchmark acc1={ref['acc1']:.6f} mean_per_class_recall={ref['mean_per_class_recall']:.6f}; "
          f"clip-train top1={got['zeroshot/colors/top1']:.6f} "
          f"mean_per_class_recall={got['zeroshot/colors/mean_per_class_recall']:.6f}")
    assert got["zeroshot/colors/num_samples"] == len(samples)
    assert 0.3 < got["zeroshot/colors/top1"] < 1.0  # real decisions, not chance or trivial
    # The same predictions: the same count of correct samples out of 48, so equal to 1e-12.
    assert got["zeroshot/colors/top1"] == pytest.approx(ref["acc1"], abs=1e-12)
    assert got["zeroshot/colors/mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-12)
