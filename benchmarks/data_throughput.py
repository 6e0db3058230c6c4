"""Data-loader throughput: samples per second per worker for decode + augment + tokenize, at 64 and
224 px, from local shards: clip_train's loader next to the raw tar-read rate and to open_clip's own
`open_clip_train.data.get_wds_dataset` on the same shards, same transforms and tokenizer.

Shards: synthetic 256x256 JPEGs (smooth colour fields with noise, ~img2dataset's 256-px output)
with short captions, written once per run to a temp folder. Each loader runs resampled (both
pipelines' cluster mode) with `--workers` DataLoader workers and batch 64; the first batches
(worker start-up, shuffle-buffer fill) are not timed. Two numbers per row:
- samples per worker-CPU-second: samples / CPU time (user+sys) the DataLoader worker processes
  spent in the timed window. The capacity of one worker core, and robust to other jobs sharing
  the machine (the wall clock is not);
- wall samples/s per worker: samples / wall seconds / workers, best of the repeats.
The two pipelines are measured alternately, `--repeats` times each. clip_train's loader ships
uint8 images as the trainer receives them (float conversion and normalisation happen later, on the
training device, and are not timed here); open_clip's ships normalised float32.

open_clip's `get_wds_dataset` fails on webdataset 1.0.2 (its tar grouping does not expect the
end-of-shard `{}` marker that 1.0.2 yields: KeyError 'fname', open_clip issue #935). This harness
patches `open_clip_train.data.tarfile_to_samples_nothrow`, *in this process only*, to drop the
marker (webdataset's `eof_value=None`); the output says so.

    python benchmarks/data_throughput.py            # 2048 samples, 24 timed batches per row
    python benchmarks/data_throughput.py --quick    # 512 samples, 6 timed batches per row
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = 64
WORDS = "a photo of the small large red green blue dog cat car tree house on in with near".split()


def write_shards(folder: Path, n: int, per_shard: int = 256) -> str:
    import numpy as np
    from PIL import Image

    from clip_train.data import write_samples

    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((256, 256), Image.Resampling.BICUBIC), np.float32)
            pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))
            yield {"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption}

    sizes = write_samples(samples(), str(folder), per_shard, prefix="bench", progress=False)
    return f"{folder}/bench-{{000000..{len(sizes) - 1:06d}}}.tar"


def raw_tar_rate(pattern: str, min_seconds: float) -> float:
    """Samples/s reading the tars into per-sample byte dicts (no decoding), in this process."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    from clip_train.config import expand_urls

    urls = expand_urls(pattern)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or count == 0:
        files = tar_file_expander(url_opener([{"url": u} for u in urls]))
        count += sum(1 for _ in group_by_keys(files))
    return count / (time.perf_counter() - start)


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


def timed(batches, warmup: int, timed_batches: int) -> tuple[float, float]:
    """(samples per wall second, samples per worker-CPU second) over `timed_batches` batches
    after `warmup` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start, cpu_start = time.perf_counter(), _workers_cpu_seconds()
    n = 0
    for _ in range(timed_batches):
        images, texts = next(it)[:2]
        n += images.shape[0]
    wall, cpu = time.perf_counter() - start, _workers_cpu_seconds() - cpu_start
    return n / wall, n / max(cpu, 1e-9)


def measure(pipeline: str, pattern: str, num_samples: int, image_size: int, workers: int,
            warmup: int, timed_batches: int) -> tuple[float, float]:
    import open_clip

    transform = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # open_clip's bundled BPE: no download
    if pipeline == "clip_train":
        from clip_train.config import DataConfig
        from clip_train.data import build_train_loader

        cfg = DataConfig(train=pattern, train_num_samples=num_samples, workers=workers,
                         shuffle_buffer=1000, resampled=True)
        loader = build_train_loader(cfg, transform=transform, tokenizer=tokenizer,
                                    local_batch_size=BATCH, seed=0, rank=0, world_size=1)
        return timed(loader, warmup, timed_batches)
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(train_data=pattern, val_data=None, dataset_resampled=True,
                           train_num_samples=num_samples, train_data_upsampling_factors=None,
                           seed=0, batch_size=BATCH, world_size=1, workers=workers)
    info = get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)
    return timed(_endless(info.dataloader), warmup, timed_batches)


def _endless(dataloader):
    while True:
        yield from dataloader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (a smoke test)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per loader (>= 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--repeats", type=int, default=None, help="runs per row (default 3, quick 1)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "data_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    n, warmup, timed_batches = (512, 3, 6) if args.quick else (2048, 4, 24)
    repeats = args.repeats or (1 if args.quick else 3)

    import torch

    torch.set_num_threads(1)
    patch_open_clip_for_webdataset_1_0_2()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), n)
        raw = raw_tar_rate(pattern, 1.0 if args.quick else 3.0)
        for size in args.sizes:
            runs: dict[str, list[tuple[float, float]]] = {"clip_train": [], "open_clip": []}
            for _ in range(repeats):
                for pipeline in runs:
                    runs[pipeline].append(measure(pipeline, pattern, n, size, args.workers, warmup, timed_batches))
            for pipeline, results in runs.items():
                cpu_rates = sorted(c for _, c in results)
                rows.append({"pipeline": pipeline, "image_size": size, "workers": args.workers,
                             "wall_samples_per_s_per_worker": max(w for w, _ in results) / args.workers,
                             "samples_per_worker_cpu_s": cpu_rates[len(cpu_rates) // 2],
                             "runs": results})
    print(f"\nData-loader throughput, {n} synthetic 256-px JPEG samples, batch {BATCH}, "
          f"{args.workers} worker(s), {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    print("open_clip's get_wds_dataset was patched in this benchmark only (drop webdataset 1.0.2's "
          "end-of-shard marker: KeyError 'fname', open_clip #935). clip_train ships uint8 images "
          "(normalised later on the training device), open_clip float32.\n")
    print(f"raw tar read (no decode, 1 process): {raw:,.0f} samples/s\n")
    print("| image px | pipeline | samples / worker-CPU-s | vs open_clip | wall samples/s per worker |")
    print("|---:|---|---:|---:|---:|")
    for size in args.sizes:
        ours, theirs = (next(r for r in rows if r["pipeline"] == p and r["image_size"] == size)
                        for p in ("clip_train", "open_clip"))
        for r in (ours, theirs):
            ratio = r["samples_per_worker_cpu_s"] / theirs["samples_per_worker_cpu_s"]
            print(f"| {size} | {r['pipeline']} | {r['samples_per_worker_cpu_s']:,.0f} | {ratio:.2f}x | "
                  f"{r['wall_samples_per_s_per_worker']:,.0f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "samples": n, "batch": BATCH,
                               "raw_tar_samples_per_s": raw, "rows": rows,
                               "repeats": repeats, "cpu_count": os.cpu_count(),
                               "load_average": os.getloadavg()}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
