"""Writing shards: `write_samples` (webdataset ShardWriter + sizes.json) and `make-shards`
(an image folder or a csv/tsv/jsonl/parquet manifest -> shards).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from clip_train.config import ConfigError
from clip_train.data.stream import WARN_FIRST

log = logging.getLogger(__name__)


# Writing shards

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_KEEP_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_FIXED_MTIME = 946684800.0  # 2000-01-01: fixed tar mtimes make re-runs byte-identical
_IMAGE_COLUMNS = ("image", "image_path", "filepath", "path", "file", "filename")
_CAPTION_COLUMNS = ("caption", "text", "txt", "title")


def _encode_value(key: str, value: Any, jpeg_quality: int = 95) -> bytes:
    """Bytes for one field of a sample: images by extension, text as UTF-8, ints, JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Image.Image):
        fmt = _PIL_FORMATS.get(key)
        if fmt is None:
            raise ValueError(f"cannot encode an image under key {key!r} (use jpg, png or webp)")
        out = io.BytesIO()
        image = value.convert("RGB") if fmt == "JPEG" and value.mode not in ("RGB", "L") else value
        image.save(out, format=fmt, **({"quality": jpeg_quality} if fmt in ("JPEG", "WEBP") else {}))
        return out.getvalue()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise ValueError(f"{key}: booleans are ambiguous in a shard; use an int or JSON")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise ValueError(f"{key}: cannot store a {type(value).__name__} in a shard")


def write_samples(samples: Iterable[dict], output_dir: str, samples_per_shard: int = 1000,
                  prefix: str = "shard", *, total: int | None = None, progress: bool = True,
                  overwrite: bool = True) -> dict[str, int]:
    """Write samples ({"__key__", "jpg"/"png": PIL image or bytes, "txt": str, "cls": int,
    "json": dict, ...}) to `{prefix}-000000.tar`, ... in `output_dir`, `samples_per_shard` each,
    and `sizes.json` ({shard file name: samples}) next to them; returns those sizes."""
    if samples_per_shard <= 0:
        raise ConfigError("--samples-per-shard: must be > 0")
    out = Path(output_dir)
    old = sorted(out.glob(f"{prefix}-*.tar")) if out.is_dir() else []
    if old and not overwrite:
        raise ConfigError(f"output_dir: {output_dir} already holds {len(old)} {prefix}-*.tar shards; "
                          "pass --overwrite or choose another folder")
    iterator = iter(samples)
    first = next(iterator, None)
    if first is None:
        raise ConfigError(f"no samples to write to {output_dir}")
    out.mkdir(parents=True, exist_ok=True)
    for path in old:  # stale shards of an earlier, longer run would join the brace pattern
        path.unlink()
    sizes: dict[str, int] = {}
    from tqdm import tqdm

    bar = tqdm(total=total, unit="sample", desc=f"writing {prefix} shards", disable=None if progress else True)
    # maxsize=inf: shard boundaries depend on sample counts only, so sizes are predictable.
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=samples_per_shard,
                         maxsize=float("inf"), verbose=0, encoder=False, mtime=_FIXED_MTIME) as writer:
        for sample in _chain_first(first, iterator):
            if "__key__" not in sample or "." in str(sample["__key__"]):
                raise ValueError(f"sample needs a '__key__' without dots, got {sample.get('__key__')!r}")
            encoded = {k: _encode_value(k, v) for k, v in sample.items() if not k.startswith("__")}
            writer.write({"__key__": str(sample["__key__"]), **encoded})
            name = os.path.basename(writer.fname)
            sizes[name] = sizes.get(name, 0) + 1
            bar.update(1)
    bar.close()
    with open(out / "sizes.json", "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
        f.write("\n")
    return sizes


def _chain_first(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


@dataclass(frozen=True)
class _Record:
    """One input of make-shards, before its image is read."""
    image: str  # path of the image file
    caption: str | None
    source: str  # what identifies the input in messages and in the sample's json
    cls: int | None
    extra: dict


def _folder_records(folder: Path) -> Iterator[_Record | tuple[str, str]]:
    """Images under `folder` (sorted) with same-named .txt captions, optional .cls and .json."""
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(folder).as_posix()
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            yield ("missing_caption", rel)
            continue
        caption = txt.read_text(encoding="utf-8", errors="strict").strip()
        cls_file, json_file = path.with_suffix(".cls"), path.with_suffix(".json")
        try:
            cls = int(cls_file.read_text().strip()) if cls_file.is_file() else None
        except ValueError:
            raise ConfigError(f"source: {cls_file} does not hold an integer class") from None
        extra = json.loads(json_file.read_text(encoding="utf-8")) if json_file.is_file() else {}
        if not isinstance(extra, dict):
            extra = {"meta": extra}
        yield _Record(str(path), caption, rel, cls, extra)


def _manifest_rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exn:
                        raise ConfigError(f"{path}:{line_no}: not JSON ({exn})") from None
    elif suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.read_parquet(path)
        except ImportError:
            raise ConfigError(f"{path}: reading Parquet needs pandas and pyarrow (pip install pandas "
                              "pyarrow), or convert the manifest to CSV/JSONL") from None
        for row in frame.to_dict(orient="records"):
            yield {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    else:
        raise ConfigError(f"{path}: unknown manifest type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")


def _pick_column(row: dict, given: str | None, candidates: tuple[str, ...], flag: str,
                 path: Path) -> str:
    if given is not None:
        if given not in row:
            raise ConfigError(f"{flag}: no column {given!r} in {path} (columns: {sorted(row)})")
        return given
    found = next((c for c in candidates if c in row), None)
    if found is None:
        raise ConfigError(f"{flag}: {path} has none of the columns {list(candidates)}; "
                          f"name yours (columns: {sorted(row)})")
    return found


def _manifest_records(path: Path, image_column: str | None, caption_column: str | None,
                      cls_column: str | None) -> Iterator[_Record | tuple[str, str]]:
    """Rows of a manifest in file order: image path (relative to the manifest), caption, extras."""
    columns: tuple[str, str] | None = None
    for row_no, row in enumerate(_manifest_rows(path)):
        if columns is None:
            columns = (_pick_column(row, image_column, _IMAGE_COLUMNS, "--image-column", path),
                       _pick_column(row, caption_column, _CAPTION_COLUMNS, "--caption-column", path))
            if cls_column is not None and cls_column not in row:
                raise ConfigError(f"--cls-column: no column {cls_column!r} in {path}")
        image_col, caption_col = columns
        image = row.get(image_col)
        if not image:
            yield ("missing_image", f"row {row_no}")
            continue
        image_path = Path(str(image))
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        caption = row.get(caption_col)
        cls = row.get(cls_column) if cls_column else None
        extra = {k: v for k, v in row.items() if k not in (image_col, caption_col, cls_column)}
        try:
            cls = None if cls in (None, "") else int(cls)
        except (TypeError, ValueError):
            raise ConfigError(f"--cls-column: row {row_no} of {path}: {cls!r} is not an integer") from None
        yield _Record(str(image_path), None if caption is None else str(caption).strip(),
                      str(image), cls, extra)


def _encode_record(record: _Record, image_size: int | None, jpeg_quality: int) -> tuple[dict | None, str]:
    """The sample of one input (without its key), or (None, why it was skipped)."""
    if not record.caption:
        return None, "empty_caption"
    try:
        with open(record.image, "rb") as f:
            data = f.read()
    except OSError:
        return None, "missing_image"
    suffix = Path(record.image).suffix.lower()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image_size is None and suffix in _KEEP_FORMATS:
                image.verify()  # keep the original bytes: no re-encoding loss
                ext = _KEEP_FORMATS[suffix]
            else:
                image.load()
                rgb = image.convert("RGB")
                if image_size is not None and min(rgb.size) > image_size:
                    scale = image_size / min(rgb.size)
                    new_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                    rgb = rgb.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
                ext = "jpg" if image_size is not None else "png"
                data = _encode_value(ext, rgb, jpeg_quality)
    except Exception:  # noqa: BLE001 - any PIL failure: the input image is unusable
        return None, "corrupt_image"
    sample: dict[str, Any] = {ext: data, "txt": record.caption,
                              "json": {"source": record.source, **record.extra}}
    if record.cls is not None:
        sample["cls"] = record.cls
    return sample, ""


def make_shards(source: str, output_dir: str, *, samples_per_shard: int = 1000,
                image_size: int | None = None, prefix: str = "shard", image_column: str | None = None,
                caption_column: str | None = None, cls_column: str | None = None,
                jpeg_quality: int = 95, workers: int = 1, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Write webdataset shards from a folder of images + same-named .txt captions (optional .cls,
    .json), or from a CSV/TSV/JSONL/Parquet manifest (image path, caption, other columns -> json).

    Images keep their bytes and format (jpg/png/webp; others become png) unless `image_size` is
    given: then the shorter side is reduced to it and they are stored as jpg. Inputs are read in
    sorted (folder) or file (manifest) order, so a re-run writes identical bytes. Returns a summary.
    """
    src = Path(source)
    if src.is_dir():
        records: Iterable = _folder_records(src)
    elif src.is_file():
        records = _manifest_records(src, image_column, caption_column, cls_column)
    else:
        raise ConfigError(f"source: {source!r} is neither a folder nor a manifest file")
    if image_size is not None and image_size <= 0:
        raise ConfigError("--image-size: must be > 0")
    skipped: dict[str, int] = {}
    listed = list(records)
    inputs = []
    for item in listed:
        if isinstance(item, tuple):
            skipped[item[0]] = skipped.get(item[0], 0) + 1
            log.warning("make-shards: skipping %s (%s)", item[1], item[0])
        else:
            inputs.append(item)
    if not inputs:
        raise ConfigError(f"source: no usable image-caption pair in {source!r} (skipped: {skipped or 'none'})")

    encode = partial(_encode_record, image_size=image_size, jpeg_quality=jpeg_quality)
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
        encoded: Iterable = pool.imap(encode, inputs, chunksize=16)  # imap keeps the input order
    else:
        encoded = map(encode, inputs)

    def samples() -> Iterator[dict]:
        index = 0
        for record, (sample, why) in zip(inputs, encoded, strict=True):
            if sample is None:
                skipped[why] = skipped.get(why, 0) + 1
                if skipped[why] <= WARN_FIRST:
                    log.warning("make-shards: skipping %s (%s)", record.source, why)
                continue
            yield {"__key__": f"{index:09d}", **sample}
            index += 1

    try:
        sizes = write_samples(samples(), output_dir, samples_per_shard, prefix, total=len(inputs),
                              progress=progress, overwrite=overwrite)
    finally:
        if pool is not None:
            pool.terminate()
    last = len(sizes) - 1
    pattern = f"{output_dir.rstrip('/')}/{prefix}-{{000000..{last:06d}}}.tar"
    return {"pattern": pattern, "num_samples": sum(sizes.values()), "num_shards": len(sizes),
            "sizes": sizes, "skipped": skipped}


def make_shards_main(argv: list[str]) -> int:
    """`clip-train make-shards SOURCE OUTPUT_DIR [...]`."""
    parser = argparse.ArgumentParser(
        prog="clip-train make-shards",
        description="Write webdataset shards (+ sizes.json) from a folder of images with same-named "
                    ".txt captions, or from a CSV/TSV/JSONL/Parquet manifest.")
    parser.add_argument("source", help="folder of images + .txt (.cls, .json optional), or a manifest")
    parser.add_argument("output_dir", help="folder for {prefix}-000000.tar ... and sizes.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=None,
                        help="reduce the shorter side to this many pixels and store jpg")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--image-column", help=f"manifest image-path column (default: first of {_IMAGE_COLUMNS})")
    parser.add_argument("--caption-column", help=f"manifest caption column (default: first of {_CAPTION_COLUMNS})")
    parser.add_argument("--cls-column", help="manifest integer class column, stored as `cls`")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--workers", type=int, default=1, help="processes reading/resizing images")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in output_dir")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = make_shards(args.source, args.output_dir, samples_per_shard=args.samples_per_shard,
                          image_size=args.image_size, prefix=args.prefix,
                          image_column=args.image_column, caption_column=args.caption_column,
                          cls_column=args.cls_column, jpeg_quality=args.jpeg_quality,
                          workers=args.workers, overwrite=args.overwrite,
                          progress=not args.no_progress)
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items())) or "none"
    print(f"wrote {summary['num_samples']} samples in {summary['num_shards']} shards "
          f"(skipped: {skipped})\ntrain with: data.train='{summary['pattern']}'", file=sys.stdout)
    return 0

