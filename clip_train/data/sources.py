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


# --------------------------------------------------------------------------------------------
# The per-worker stream


