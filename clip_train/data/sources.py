"""Shard lists and sizes: `data.train` expanded, per-shard weights, dataset size from
`sizes.json` / img2dataset stats, the epoch's shard order and each worker's batch quota.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any
from urllib.parse import urlparse

import webdataset as wds
from webdataset.utils import make_seed

from clip_train.config import ConfigError, DataConfig, expand_urls

log = logging.getLogger(__name__)


# Shard lists and dataset size


def _split_sources(spec: str) -> list[list[str]]:
    return [expand_urls(part) for part in spec.split("::") if part.strip()]


def _shard_weights(cfg: DataConfig, sources: list[list[str]]) -> list[float] | None:
    """Per-shard sampling weights from `data.train_data_weights` (open_clip's upsampling factors)."""
    if cfg.train_data_weights is None:
        return None
    parts = [p.strip() for p in cfg.train_data_weights.split("::")]
    if len(parts) != len(sources):
        raise ConfigError(f"data.train_data_weights: {len(parts)} weights for {len(sources)} `::`-joined "
                          "sources in data.train; give one weight per source")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.train_data_weights: {cfg.train_data_weights!r} is not `::`-joined "
                          "numbers, e.g. 1::0.5") from None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ConfigError("data.train_data_weights: weights must be >= 0 with a positive sum")
    return [w for w, urls in zip(weights, sources, strict=True) for _ in urls]


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and urlparse(url).scheme in ("", "file")


def _read_json(path: str) -> Any:
    """JSON next to the shards: a local file, or any URL fsspec can open; None when absent."""
    try:
        if _is_local(path):
            path = urlparse(path).path if path.startswith("file:") else path
            if not os.path.isfile(path):
                return None
            with open(path) as f:
                return json.load(f)
        import fsspec

        with fsspec.open(path, "r") as f:
            return json.load(f)
    except (OSError, ValueError, ImportError):
        return None


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from `sizes.json` next to the shards (written by make-shards; open_clip's
    layout) or img2dataset's per-shard `<name>_stats.json` ("successes"); None if any is unknown."""
    sizes: dict[str, int] = {}
    folders: dict[str, Any] = {}
    for url in urls:
        if url.startswith("pipe:"):
            return None
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if folder not in folders:
            folders[folder] = _read_json(f"{folder}/sizes.json") or {}
        if name in folders[folder]:
            sizes[url] = int(folders[folder][name])
            continue
        stats = _read_json(f"{folder}/{name.rsplit('.', 1)[0]}_stats.json")
        if not isinstance(stats, dict) or "successes" not in stats:
            return None
        sizes[url] = int(stats["successes"])
    return sizes


def dataset_size(cfg: DataConfig) -> int:
    """Samples in one pass over `data.train`: `train_num_samples`, else the sizes files."""
    if cfg.train_num_samples is not None:
        return cfg.train_num_samples
    sizes = shard_sizes(expand_urls(cfg.train))
    if sizes is None:
        raise ConfigError("data.train_num_samples: the dataset size is unknown (no sizes.json or "
                          "img2dataset *_stats.json next to the shards); set data.train_num_samples "
                          "or write the shards with `clip-train make-shards`")
    return sum(sizes.values())


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's global shard order: identical on every rank, different every epoch."""
    return [s["url"] for s in wds.SimpleShardList(urls, seed=make_seed(seed, epoch, 0x5EED))]


def epoch_quota(epoch: int, worker: int, steps_per_epoch: int, num_workers: int) -> int:
    """Batches logical `worker` makes in `epoch`: those with index i % num_workers == worker."""
    def before(n: int) -> int:  # count of i in [0, n) with i % num_workers == worker
        return max(0, (n - worker + num_workers - 1) // num_workers)

    return before((epoch + 1) * steps_per_epoch) - before(epoch * steps_per_epoch)



def epoch_ranges(world_size: int, num_workers: int, epoch: int, steps_per_epoch: int,
                 local_batch_size: int, total: int) -> list[tuple[int, int]]:
    """[start, end) of every (rank, worker) unit (index rank * num_workers + worker) in the
    epoch's sequence of `total` samples: each unit gets the samples its batch quota needs, and
    the samples beyond the epoch's whole global batches (fewer than one) are spread over the
    units, so the ones that go unseen are a random few of every worker's (its shuffle buffer's)
    rather than the tail of one shard. Contiguous and disjoint; they cover [0, total)."""
    units = world_size * num_workers
    need = [epoch_quota(epoch, w, steps_per_epoch, num_workers) * local_batch_size
            for _ in range(world_size) for w in range(num_workers)]
    spare = max(0, total - sum(need))
    ranges, start = [], 0
    for u in range(units):
        end = min(total, start + need[u] + spare // units + (u < spare % units))
        ranges.append((start, end))
        start = end
    return ranges


def epoch_pieces(urls: tuple[str, ...], sizes: tuple[int, ...], seed: int, epoch: int, rank: int,
                 world_size: int, worker: int, num_workers: int, steps_per_epoch: int,
                 local_batch_size: int) -> list[tuple[str, int, int | None]]:
    """(url, first sample, end sample or None for the whole rest) pieces of unit (rank, worker)'s
    range in the epoch's shard order (`epoch_ranges`): every sample once per epoch, whatever
    the number of shards, at the cost of reading a shard split between two workers twice."""
    size_of = dict(zip(urls, sizes, strict=True))
    order = epoch_shard_order(list(urls), seed, epoch)
    start, end = epoch_ranges(world_size, num_workers, epoch, steps_per_epoch, local_batch_size,
                              sum(sizes))[rank * num_workers + worker]
    pieces, offset = [], 0
    for url in order:
        n = size_of[url]
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            pieces.append((url, lo - offset, None if hi == offset + n else hi - offset))
        offset += n
        if offset >= end:
            break
    return pieces
