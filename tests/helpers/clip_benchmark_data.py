"""Write a zero-shot data set in clip_benchmark's webdataset layout (what `clip_benchmark_export_wds`
writes and what its `wds/<name>` data sets on the Hugging Face hub hold):

    <folder>/test/0.tar, 1.tar, ...   samples: image under webp/png/jpg, class index under cls
    <folder>/test/nshards.txt         the number of shards
    <folder>/classnames.txt           one class name per line
    <folder>/zeroshot_classification_templates.txt   one template per line, `{c}` = class name
"""

from __future__ import annotations

import io
from pathlib import Path

import webdataset as wds
from PIL import Image


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    # Lossless webp: the decoded pixels equal the png's, so results can be compared exactly.
    image.save(buf, format=fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def write_clip_benchmark_folder(folder: Path, samples: list[dict], classnames: list[str],
                                templates: list[str], shard_sizes: tuple[int, ...]) -> Path:
    """samples: dicts with a PIL image under `png` and a class index under `cls`. The first
    shard stores webp (as clip_benchmark's published sets do), the others png."""
    assert sum(shard_sizes) == len(samples)
    test = folder / "test"
    test.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(shard_sizes):
        fmt = "webp" if i == 0 else "png"
        with wds.TarWriter(str(test / f"{i}.tar")) as sink:
            for j, s in enumerate(samples[start:start + n]):
                sink.write({"__key__": f"s{i:04d}_{j:05d}", fmt: _encoded(s["png"], fmt),
                            "cls": str(int(s["cls"])).encode()})
        start += n
    (test / "nshards.txt").write_text(f"{len(shard_sizes)}\n")
    (folder / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return folder
