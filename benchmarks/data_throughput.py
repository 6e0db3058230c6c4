"""Data-loader throughput: samples per worker-CPU-second for decode + augment + tokenize, at 224
and 64 px, from local shards of three families, each loader built the way train.py builds it
(ViT-B-32's train transform and tokenizer from `build_model`, `build_train_loader`):

- clip-train `data.decode=fast` (the default) and `data.decode=exact`;
- open_clip's own `open_clip_train.data.get_wds_dataset`, same transform and tokenizer;
- the decode-only limit: in this process, one thread, each image opened, its crop drawn as the
  transform draws it and decoded at the DCT scale that crop needs, nothing else: what any loader
  must spend. Two decoders are timed, PIL (`draft`: libjpeg-turbo's scaled IDCT; opened by PIL)
  and simplejpeg (the same libjpeg-turbo, straight into a numpy array, with the fast IDCT and
  chroma upsampling that the fast loader uses: `clip_train.data.fast.SIMPLEJPEG_OPTIONS`; the
  header read by simplejpeg, as the fast loader reads it; until 2026-12-07 this row opened each
  image with PIL, 18 us more per image, which made the limit ~3% lower); the limit is the faster
  of the two, and the fraction of PIL's is printed too (the issue's baseline). simplejpeg's
  accurate decode is timed as well, for comparison with earlier reports.

Shard families (JPEG quality 90, photo-like content: 1/f texture, sharp-edged objects, grain;
see benchmarks/photos.py; `--unique` distinct images cycled through the shards):
- `synthetic-256`: the earlier rows, 256x256 smooth colour fields with noise;
- `datacomp-512`: longest side 512 (DataComp's / img2dataset's resize), aspect 1:2 to 2:1;
- `web-originals`: longest side 375-1280 px, aspect 1:2 to 2:1, as photos are on the web.

Each loader runs resampled (both pipelines' cluster mode) with `--workers` DataLoader workers and
batch 64; the first batches (worker start-up, shuffle-buffer fill) are not timed. Numbers:
- samples per worker-CPU-second: samples / CPU time (user+sys) of the DataLoader worker
  processes in the timed window: the capacity of one worker core, robust to other jobs sharing
  the machine (the wall clock is not). The median of `--repeats` runs, the pipelines alternating;
- samples per total CPU-second: the same with the training process's CPU added (it receives the
  batches: open_clip's are float32, 4x the bytes of clip-train's uint8);
- ratio to open_clip, and fraction of the decode-only limit (same family and size).
clip-train ships uint8 images as the trainer receives them (float conversion and normalisation
happen later, on the training device, and are not timed here); open_clip ships normalised float32.

open_clip's `get_wds_dataset` fails on webdataset 1.0.2 (its tar grouping does not expect the
end-of-shard `{}` marker that 1.0.2 yields: KeyError 'fname', open_clip issue #935). This harness
patches `open_clip_train.data.tarfile_to_samples_nothrow`, *in this process only*, to drop the
marker (webdataset's `eof_value=None`); the output says so.

    python benchmarks/data_throughput.py            # 3 repeats, 16 timed batches per row
    python benchmarks/data_throughput.py --quick    # 1 repeat, 4 timed batches, few images
    python benchmarks/data_throughput.py --breakdown --families datacomp-512 --sizes 224
        # + where a fast loader's sample goes: tar read, crop draw, decode, resample, tokenise,
        #   batch copy, the rest (ms per sample, timed inside the worker)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = 64
MODEL = "ViT-B-32"
WORDS = "a photo of the small large red green blue dog cat car tree house on in with near".split()
FAMILIES = ("synthetic-256", "datacomp-512", "web-originals")
PIPELINES = ("clip_train fast", "clip_train exact", "open_clip")


def family_images(family: str, unique: int) -> list[bytes]:
    """`unique` JPEGs of the family (quality 90)."""
    import numpy as np
    from photos import jpeg_bytes, photo, web_size  # this script's folder
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(unique):
        if family == "synthetic-256":
            coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((256, 256), Image.Resampling.BICUBIC), np.float32)
            pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
            images.append(jpeg_bytes(Image.fromarray(pixels)))
        else:
            longest = (512, 512) if family == "datacomp-512" else (375, 1280)
            images.append(jpeg_bytes(photo(rng, *web_size(rng, longest))))
    return images


def write_shards(folder: Path, images: list[bytes], n: int, per_shard: int = 256) -> str:
    import numpy as np

    from clip_train.data import write_samples

    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))
            yield {"__key__": f"{i:09d}", "jpg": images[i % len(images)], "txt": caption}

    folder.mkdir(parents=True, exist_ok=True)
    sizes = write_samples(samples(), str(folder), per_shard, prefix="bench", progress=False)
    return f"{folder}/bench-{{000000..{len(sizes) - 1:06d}}}.tar"


def raw_tar_rate(pattern: str, min_seconds: float) -> float:
    """Samples per CPU-second reading the tars into per-sample byte dicts (no decoding), here:
    clip-train's tar reader (what its loader uses), webdataset's grouping."""
    from webdataset.tariterators import group_by_keys, url_opener

    from clip_train.config import expand_urls
    from clip_train.data.tar import expand_shards

    urls = expand_urls(pattern)
    count, start = 0, time.process_time()
    while time.process_time() - start < min_seconds or count == 0:
        files = expand_shards(url_opener([{"url": u} for u in urls]), handler=lambda exn: False)
        count += sum(1 for _ in group_by_keys(files))
    return count / (time.process_time() - start)


def patch_open_clip_for_webdataset_1_0_2() -> None:
    """Make open_clip's tar grouping drop webdataset 1.0.2's end-of-shard marker (open_clip #935)."""
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow


def _workers_cpu_seconds() -> float:
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed(batches, warmup: int, timed_batches: int, clocks=None) -> dict:
    """Rates over `timed_batches` batches after `warmup` untimed ones: samples per wall second,
    per worker-CPU second, per total (this process + workers) CPU second; with `clocks` (a
    `StageClocks.seconds`), the seconds its stages took in the same window."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    stages_start = list(clocks or [])
    start, cpu_start, own_start = time.perf_counter(), _workers_cpu_seconds(), time.process_time()
    n = 0
    for _ in range(timed_batches):
        images, texts = next(it)[:2]
        n += images.shape[0]
    wall, cpu = time.perf_counter() - start, _workers_cpu_seconds() - cpu_start
    own = time.process_time() - own_start
    stages = [end - begin for begin, end in zip(stages_start, list(clocks or []), strict=True)]
    return {"wall": n / wall, "worker_cpu": n / max(cpu, 1e-9), "total_cpu": n / max(cpu + own, 1e-9),
            "samples": n, **({"stage_s": stages} if clocks is not None else {})}


def model_pieces(image_size: int):
    """ViT-B-32's train transform and tokenizer at `image_size`, as train.py gets them."""
    from clip_train.config import ModelConfig
    from clip_train.model import build_model

    bundle = build_model(ModelConfig(name=MODEL, force_image_size=image_size))
    return bundle.train_transform, bundle.tokenizer


def measure(pipeline: str, pattern: str, num_samples: int, transform, tokenizer, workers: int,
            warmup: int, timed_batches: int, clocks=None) -> dict:
    if pipeline.startswith("clip_train"):
        from clip_train.config import DataConfig
        from clip_train.data import build_train_loader

        cfg = DataConfig(train=pattern, train_num_samples=num_samples, workers=workers,
                         shuffle_buffer=1000, resampled=True, decode=pipeline.split()[1])
        loader = build_train_loader(cfg, transform=transform, tokenizer=tokenizer,
                                    local_batch_size=BATCH, seed=0, rank=0, world_size=1)
        return timed(loader, warmup, timed_batches, clocks)
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(train_data=pattern, val_data=None, dataset_resampled=True,
                           train_num_samples=num_samples, train_data_upsampling_factors=None,
                           seed=0, batch_size=BATCH, world_size=1, workers=workers)
    info = get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)
    return timed(_endless(info.dataloader), warmup, timed_batches)


def _endless(dataloader):
    while True:
        yield from dataloader


def decode_limit(images: list[bytes], transform, min_seconds: float) -> dict:
    """Images per CPU-second (this process, one thread) of the decode alone -- open, then decode
    at the DCT scale that the sample's crop (drawn beforehand, untimed, as the transform draws
    it) needs, by PIL ("reduced"), by simplejpeg as the fast loader calls it ("simplejpeg") and
    with libjpeg-turbo's accurate IDCT and upsampling ("simplejpeg accurate") -- and of PIL's
    full decode to RGB ("full")."""
    import simplejpeg
    import torch
    from PIL import Image

    from clip_train.data.fast import SIMPLEJPEG_OPTIONS

    crop = next(t for t in transform.transforms if hasattr(t, "get_params") and hasattr(t, "scale"))
    out_h, out_w = crop.size
    scales = []
    for seed, data in enumerate(images):
        random.seed(seed)
        torch.random.default_generator.manual_seed(seed)
        _, _, h, w = crop.get_params(Image.open(io.BytesIO(data)), crop.scale, crop.ratio)
        scales.append(max(s for s in (1, 2, 4, 8) if s == 1 or (w / s >= out_w and h / s >= out_h)))

    def reduced(k: int) -> None:
        image = Image.open(io.BytesIO(images[k]))
        if scales[k] > 1:
            image.draft(None, (image.size[0] // scales[k], image.size[1] // scales[k]))
        image.load()

    def simple(k: int, **options) -> None:
        # The header as the fast path reads it (simplejpeg's: 1 us, where PIL's open takes 18).
        h, w, _, _ = simplejpeg.decode_jpeg_header(images[k])
        simplejpeg.decode_jpeg(images[k], colorspace="RGB", min_height=-(-h // scales[k]),
                               min_width=-(-w // scales[k]), **options)

    def simple_fast(k: int) -> None:
        simple(k, **SIMPLEJPEG_OPTIONS)

    def full(k: int) -> None:
        image = Image.open(io.BytesIO(images[k]))
        image.load()
        image.convert("RGB")

    rates = {}
    for name, fn in (("reduced", reduced), ("simplejpeg", simple_fast), ("simplejpeg accurate", simple),
                     ("full", full)):
        n, start = 0, time.process_time()
        while time.process_time() - start < min_seconds or n < len(images):
            fn(n % len(images))
            n += 1
        rates[name] = n / (time.process_time() - start)
    return rates


STAGES = ("tar read", "crop draw", "decode", "resample", "tokenise", "batch copy")


class StageClocks:
    """Where a `data.decode=fast` worker's time goes, timed inside the worker: the thread CPU time
    of every call of each stage's function, summed per stage into shared memory (`seconds`, in
    STAGES order) that the DataLoader workers forked after `stage_clocks()` add to.

    - tar read: the samples of a shard as the worker's reader hands them on (opening the shard,
      reading and parsing the tar, grouping files into samples);
    - crop draw: `fast.random_resized_crop_params`; decode: `fast._decode_jpeg`;
      resample: `fast._resize`; batch copy: `stream.stack_images`;
    - tokenise: the tokenizer the loader builds (`loader.caption_tokenizer`'s).
    Everything else a worker spends (the shuffle buffer, per-sample seeding, reading the JPEG's
    header, transfer to the training process, Python in between) is the worker's CPU time less
    these."""

    def __init__(self):
        import multiprocessing

        self.seconds = multiprocessing.Array("d", len(STAGES), lock=False)

    def timing(self, stage: str, fn):
        k, seconds = STAGES.index(stage), self.seconds

        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[k] += time.thread_time() - start

        return timed_call

    def timing_iterator(self, stage: str, fn):
        k, seconds = STAGES.index(stage), self.seconds

        @functools.wraps(fn)
        def timed_iterator(*args, **kwargs):
            items = fn(*args, **kwargs)
            while True:
                start = time.thread_time()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    seconds[k] += time.thread_time() - start
                yield item

        return timed_iterator


@contextlib.contextmanager
def stage_clocks():
    """A `StageClocks` whose stages are timed in `clip_train.data.fast` and `.stream` (patched in
    this process, for the workers it forks, and restored after)."""
    from clip_train.data import fast, loader, stream

    clocks = StageClocks()
    caption_tokenizer = loader.caption_tokenizer
    patches = [(stream, "group_by_keys", clocks.timing_iterator("tar read", stream.group_by_keys)),
               (fast, "random_resized_crop_params", clocks.timing("crop draw", fast.random_resized_crop_params)),
               (fast, "_decode_jpeg", clocks.timing("decode", fast._decode_jpeg)),
               (fast, "_resize", clocks.timing("resample", fast._resize)),
               (stream, "stack_images", clocks.timing("batch copy", stream.stack_images)),
               (loader, "caption_tokenizer", lambda tok: clocks.timing("tokenise", caption_tokenizer(tok)))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, patched in patches:
        setattr(module, name, patched)
    try:
        yield clocks
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def breakdown(pattern: str, num_samples: int, transform, tokenizer, workers: int, warmup: int,
              timed_batches: int, repeats: int) -> dict:
    """Milliseconds per sample of `data.decode=fast` through the loader with its workers, and of
    each of its STAGES timed inside the workers (`StageClocks`; "rest": the worker's CPU time
    less the stages), medians of `repeats` runs 4x `timed_batches` long (a worker's CPU time
    comes in 10 ms clock ticks)."""
    runs = []
    with stage_clocks() as clocks:
        for _ in range(repeats):
            result = measure("clip_train fast", pattern, num_samples, transform, tokenizer,
                             workers, warmup, 4 * timed_batches, clocks=clocks.seconds)
            sample_ms = 1000.0 / result["worker_cpu"]
            stage_ms = {s: 1000.0 * t / result["samples"] for s, t in zip(STAGES, result["stage_s"], strict=True)}
            runs.append({"sample": sample_ms, **stage_ms, "rest": sample_ms - sum(stage_ms.values())})
    return {"ms": {part: statistics.median(run[part] for run in runs) for part in runs[0]}, "runs": runs}


def batch_psnr(pattern: str, num_samples: int, transform, tokenizer, batches: int) -> dict:
    """PSNR (dB) of data.decode=fast vs exact batches (the same samples, crops and draws), through
    the loader in this process: over all `batches` batches, and the worst single image."""
    import math

    from clip_train.config import DataConfig
    from clip_train.data import build_train_loader

    def first(decode: str):
        cfg = DataConfig(train=pattern, train_num_samples=num_samples, workers=0, shuffle_buffer=1000,
                         resampled=True, decode=decode)
        loader = build_train_loader(cfg, transform=transform, tokenizer=tokenizer,
                                    local_batch_size=BATCH, seed=0, rank=0, world_size=1)
        it = iter(loader)
        return [next(it)[0].double() for _ in range(batches)]

    def psnr(mse: float) -> float:
        return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)

    errors = [(e - f) ** 2 for e, f in zip(first("exact"), first("fast"), strict=True)]
    per_image = [float(x.mean()) for err in errors for x in err]
    return {"batch_db": psnr(sum(float(e.mean()) for e in errors) / len(errors)), "worst_image_db": psnr(max(per_image))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (a smoke test)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per loader (>= 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=None, help="runs per row (default 3, quick 1)")
    parser.add_argument("--timed-batches", type=int, default=None, help="per run (default 16, quick 4)")
    parser.add_argument("--unique", type=int, default=None, help="distinct images per family (default 48)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "data_throughput.json"))
    parser.add_argument("--psnr-only", action="store_true", help="only the fast-vs-exact PSNR rows")
    parser.add_argument("--breakdown", action="store_true",
                        help="also: where a fast loader's sample time goes, stage by stage")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    n, warmup = (512, 2) if args.quick else (2048, 3)
    timed_batches = args.timed_batches or (4 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    unique = args.unique or (8 if args.quick else 48)

    import torch

    torch.set_num_threads(1)
    patch_open_clip_for_webdataset_1_0_2()
    load_start = os.getloadavg()
    started = time.perf_counter()
    rows, parts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        patterns, images, raw = {}, {}, {}
        for family in args.families:
            images[family] = family_images(family, unique)
            patterns[family] = write_shards(Path(tmp) / family, images[family], n)
            raw[family] = raw_tar_rate(patterns[family], 0.5 if args.quick else 2.0)
        psnr_rows = []
        for size in args.sizes:
            transform, tokenizer = model_pieces(size)
            for family in args.families:
                psnr_rows.append({"family": family, "image_size": size,
                                  **batch_psnr(patterns[family], n, transform, tokenizer, 2 if args.quick else 4)})
                print(f"{family} {size} px: fast vs exact {psnr_rows[-1]}", flush=True)
                if args.psnr_only:
                    continue
                runs: dict[str, list[dict]] = {p: [] for p in PIPELINES}
                limits = []
                for _ in range(repeats):  # alternate the pipelines: load changes hit them alike
                    for pipeline in PIPELINES:
                        runs[pipeline].append(measure(pipeline, patterns[family], n, transform, tokenizer,
                                                      args.workers, warmup, timed_batches))
                    limits.append(decode_limit(images[family], transform, 0.5 if args.quick else 2.0))
                print(f"{family} {size} px: " + ", ".join(
                    f"{p} {statistics.median(r['worker_cpu'] for r in runs[p]):,.0f}" for p in PIPELINES), flush=True)
                pil_limit = statistics.median(x["reduced"] for x in limits)
                full = statistics.median(x["full"] for x in limits)
                accurate = statistics.median(x["simplejpeg accurate"] for x in limits)
                limit = max(pil_limit, accurate, statistics.median(x["simplejpeg"] for x in limits))
                if args.breakdown:
                    parts.append({"family": family, "image_size": size, "limit_decode_ms": 1000.0 / limit,
                                  **breakdown(patterns[family], n, transform, tokenizer, args.workers, warmup,
                                              timed_batches, repeats)})
                theirs = statistics.median(r["worker_cpu"] for r in runs["open_clip"])
                for pipeline, results in runs.items():
                    rate = statistics.median(r["worker_cpu"] for r in results)
                    rows.append({"family": family, "image_size": size, "pipeline": pipeline,
                                 "samples_per_worker_cpu_s": rate,
                                 "samples_per_total_cpu_s": statistics.median(r["total_cpu"] for r in results),
                                 "wall_samples_per_s_per_worker": max(r["wall"] for r in results) / args.workers,
                                 "vs_open_clip": rate / theirs, "of_decode_limit": rate / limit,
                                 "of_pil_decode_limit": rate / pil_limit, "runs": results})
                rows.append({"family": family, "image_size": size, "pipeline": "decode-only limit",
                             "samples_per_worker_cpu_s": limit, "vs_open_clip": limit / theirs,
                             "of_decode_limit": 1.0, "of_pil_decode_limit": limit / pil_limit,
                             "pil_decode_per_cpu_s": pil_limit, "full_decode_per_cpu_s": full,
                             "accurate_simplejpeg_per_cpu_s": accurate, "runs": limits})
    print(f"\nData-loader throughput: {n} samples per family ({unique} distinct JPEGs, quality 90), "
          f"{MODEL} transform and tokenizer, batch {BATCH}, {args.workers} worker(s), {repeats} repeat(s) x "
          f"{timed_batches} timed batches, medians; {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}; load average {load_start[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - started:.0f} s")
    print("open_clip's get_wds_dataset was patched in this benchmark only (drop webdataset 1.0.2's "
          "end-of-shard marker: KeyError 'fname', open_clip #935). clip_train ships uint8 images "
          "(normalised later on the training device), open_clip float32.\n")
    print("raw tar read (no decode, 1 process, per CPU-s): " + ", ".join(f"{f} {r:,.0f} samples/s" for f, r in raw.items()))
    print("\n| family | px | fast vs exact PSNR, batches | worst image |\n|---|---:|---:|---:|")
    for r in psnr_rows:
        print(f"| {r['family']} | {r['image_size']} | {r['batch_db']:.1f} dB | {r['worst_image_db']:.1f} dB |")
    print("\n| family | px | pipeline | samples / worker-CPU-s | vs open_clip | of decode limit | "
          "of PIL decode limit | samples / total CPU-s | wall samples/s per worker |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["pipeline"] == "decode-only limit":
            print(f"| {r['family']} | {r['image_size']} | decode-only limit (PIL: "
                  f"{r['pil_decode_per_cpu_s']:,.0f}; simplejpeg, accurate IDCT: "
                  f"{r['accurate_simplejpeg_per_cpu_s']:,.0f}; PIL full decode: {r['full_decode_per_cpu_s']:,.0f}) | "
                  f"{r['samples_per_worker_cpu_s']:,.0f} | {r['vs_open_clip']:.2f}x | 1.00 | "
                  f"{r['of_pil_decode_limit']:.2f} | | |")
        else:
            print(f"| {r['family']} | {r['image_size']} | {r['pipeline']} | {r['samples_per_worker_cpu_s']:,.0f} | "
                  f"{r['vs_open_clip']:.2f}x | {r['of_decode_limit']:.2f} | {r['of_pil_decode_limit']:.2f} | "
                  f"{r['samples_per_total_cpu_s']:,.0f} | "
                  f"{r['wall_samples_per_s_per_worker']:,.0f} |")
    if parts:
        print("\nWhere a fast loader's sample goes (ms per sample of worker CPU, medians; each stage timed "
              "inside the worker: benchmarks/data_throughput.py's StageClocks; rest: the worker's CPU time "
              "less the stages). Best fraction of the limit: the limit's decode over the loader's decode + "
              "resample, as if nothing else cost anything.\n")
        print("| family | px | sample | " + " | ".join(STAGES) + " | rest | limit's decode | best fraction "
              "of the limit |\n|---|---:|" + "---:|" * (len(STAGES) + 4))
        for r in parts:
            ms = r["ms"]
            print(f"| {r['family']} | {r['image_size']} | {ms['sample']:.3f} | "
                  + " | ".join(f"{ms[s]:.3f}" for s in STAGES)
                  + f" | {ms['rest']:.3f} | {r['limit_decode_ms']:.3f} | "
                  f"{r['limit_decode_ms'] / (ms['decode'] + ms['resample']):.2f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "samples": n, "unique_images": unique, "batch": BATCH,
                               "model": MODEL, "raw_tar_samples_per_s": raw, "rows": rows, "psnr": psnr_rows,
                               "breakdown": parts,
                               "repeats": repeats, "timed_batches": timed_batches,
                               "cpu_count": os.cpu_count(), "load_average_start": load_start,
                               "load_average_end": os.getloadavg()}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
