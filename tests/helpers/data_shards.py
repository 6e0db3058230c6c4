"""Tiny shards whose samples carry their id, for the data-pipeline tests (also used by launches)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image


def png_bytes(value: int, size: int = 8) -> bytes:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = value % 256, value // 256
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_id_shards(out_dir: Path, per_shard: list[int], prefix: str = "t", first_id: int = 0,
                    sizes_file: bool = True, bad: Callable[[int], str | None] | None = None) -> str:
    """Shards of `per_shard[s]` samples each; sample `id` has caption str(id) and a PNG whose red
    and green channels hold the id. `bad(id)`: "caption" leaves that sample's caption out,
    "image" makes its image undecodable. Returns the brace pattern."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes, sample_id = {}, first_id
    for s, n in enumerate(per_shard):
        name = f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(out_dir / name), mtime=0) as sink:
            for _ in range(n):
                sample = {"__key__": f"{sample_id:06d}", "png": png_bytes(sample_id), "txt": str(sample_id)}
                kind = bad(sample_id) if bad is not None else None
                if kind == "caption":
                    del sample["txt"]
                elif kind == "image":
                    sample["png"] = b"not an image"
                sink.write(sample)
                sample_id += 1
        sizes[name] = n
    if sizes_file:
        (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return str(out_dir / f"{prefix}-{{000000..{len(per_shard) - 1:06d}}}.tar")


def truncate_inside_sample(path: Path, keep_samples: int) -> None:
    """Cut a tar in the middle of the image of sample `keep_samples` (0-based): the samples
    before it stay whole, that one loses its data and caption."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    image = [m for m in members if not m.name.endswith(".txt")][keep_samples]
    cut = image.offset_data + max(1, image.size // 2)
    path.write_bytes(path.read_bytes()[:cut])


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)


def noisy_tensor(image: Image.Image) -> torch.Tensor:
    """A random augmentation (global torch RNG), so reproducibility of augmentations is testable."""
    return to_tensor(image) + torch.rand(1)


def image_ids(images_BCHW: torch.Tensor) -> list[int]:
    pixel = images_BCHW[:, :, 0, 0].floor()
    return (pixel[:, 0] + 256 * pixel[:, 1]).long().tolist()


def id_tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[int(c), 0] for c in captions], dtype=torch.long)
