"""The loader the training loop uses (`build_train_loader`, `TrainLoader`) and the uint8
batches' trip to the device (`batch_to_device`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import lru_cache
from typing import Any

import torch
import webdataset as wds

from clip_train.config import ConfigError, DataConfig, check_shards
from clip_train.data.captions import CaptionSpec
from clip_train.data.decode import ImageNormalization, split_normalize
from clip_train.data.fast import fast_transform
from clip_train.data.sources import _shard_weights, _split_sources, dataset_size
from clip_train.data.stream import (
    BAD_KINDS,
    STATE_VERSION,
    _copy_state,
    _fresh_worker_state,
    _Stream,
    _StreamSpec,
    check_bad_fraction,
)

log = logging.getLogger(__name__)


def _passthrough(batch: Any) -> Any:
    return batch


def normalize_images(images_BCHW: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> (x / 255 - mean) / std in `dtype`, on the images' device.

    The same float32 operations as torchvision's ToTensor + Normalize, so the result is the
    float path's, bit for bit (tested on the CPU). Every operand is a tensor on the images'
    device: a Python-number divisor would make CUDA multiply by its reciprocal instead (1 ulp
    off), and per-call host->device copies of the constants could stall the step."""
    if images_BCHW.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images_BCHW.dtype}")
    scale, mean_C11, std_C11 = _normalize_constants(tuple(mean), tuple(std), images_BCHW.device)
    float_BCHW = images_BCHW.to(torch.float32).div_(scale).sub_(mean_C11).div_(std_C11)
    return float_BCHW.to(dtype)


@lru_cache(maxsize=8)
def _normalize_constants(mean: tuple[float, ...], std: tuple[float, ...],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def put(values) -> torch.Tensor:  # once per device: the copy may wait, later steps do not
        return torch.tensor(values, dtype=torch.float32).to(device)

    return put(255.0), put(mean).view(-1, 1, 1), put(std).view(-1, 1, 1)


def batch_to_device(images: torch.Tensor, texts: torch.Tensor, device: torch.device,
                    normalization: ImageNormalization | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to `device` without waiting (the loader pins it on CUDA); normalise uint8
    images there. Float images (a transform that could not be split) arrive ready."""
    # contiguous on the device: the fast path's workers ship channels-last batches (see
    # `stack_images`); the copy there costs the device almost nothing.
    images = images.to(device, non_blocking=True).contiguous()
    texts = texts.to(device, non_blocking=True)
    if normalization is not None and images.dtype == torch.uint8:
        images = normalize_images(images, normalization.mean, normalization.std)
    return images, texts


# --------------------------------------------------------------------------------------------
# The loader the training loop uses


class TrainLoader:
    """Endless iterator of (images_BCHW, texts_BL long) for this process, every batch of
    exactly `local_batch_size` rows; epoch after epoch in epoch mode. Images are uint8 when
    `image_normalization` is set (normalise them with `batch_to_device`), else what the
    transform returned (float32).

    Attributes: `num_samples` (one pass over the data), `steps_per_epoch` (for the global batch),
    `image_normalization`, `epoch` and `batches_consumed` (of the next batch / so far).
    `state_dict()` is where the stream stands; `bad_counts()` and `samples_read()` are this
    process's cumulative counts.

    Not for `accelerator.prepare()`: it already splits the data between processes (prepare would
    dispatch every batch from rank 0 or split it a second time).
    """

    def __init__(self, spec: _StreamSpec, num_samples: int, url_digest: str, state: dict | None, *,
                 loader_workers: int, pin_memory: bool, prefetch_factor: int,
                 image_normalization: ImageNormalization | None = None):
        self._spec = spec
        self.image_normalization = image_normalization
        self._loader_workers = loader_workers  # DataLoader processes (0: in this process)
        self.num_samples = num_samples
        self.steps_per_epoch = spec.steps_per_epoch
        self.local_batch_size = spec.local_batch_size
        self._digest = url_digest
        self._pin_memory = pin_memory
        self._prefetch_factor = prefetch_factor
        self._batches = 0
        self._workers: list[dict] = [_fresh_worker_state() for _ in range(spec.num_workers)]
        if state is not None:
            self._load(state)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (in resampled mode: batches consumed // steps_per_epoch)."""
        return self._batches // self.steps_per_epoch

    @property
    def batches_consumed(self) -> int:
        return self._batches

    def _identity(self) -> dict:
        s = self._spec
        return {"mode": "resampled" if s.resampled else "epoch", "seed": s.seed, "rank": s.rank,
                "world_size": s.world_size, "num_workers": s.num_workers,
                "local_batch_size": s.local_batch_size, "shards": self._digest,
                "steps_per_epoch": s.steps_per_epoch, "shuffle_buffer": s.shuffle_buffer}

    def state_dict(self) -> dict:
        """Where this process's stream stands after the batches consumed so far (JSON-friendly)."""
        return {"version": STATE_VERSION, **self._identity(), "batches": self._batches,
                "workers": _copy_state(self._workers)}

    def _load(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"train.resume: data-loader state version {state.get('version')} is not "
                              f"{STATE_VERSION}; resume without the data state to restart the stream")
        keys = {"mode": "data.resampled", "seed": "train.seed", "rank": "the process rank",
                "world_size": "the number of processes", "num_workers": "data.workers",
                "local_batch_size": "train.local_batch_size", "shards": "data.train",
                "steps_per_epoch": "data.train_num_samples", "shuffle_buffer": "data.shuffle_buffer"}
        mine = self._identity()
        for name, key in keys.items():
            if name == "steps_per_epoch" and mine["mode"] == "resampled":
                continue  # epoch length does not shape a resampled stream
            if state.get(name) != mine[name]:
                raise ConfigError(
                    f"{key}: changed since the checkpoint ({name} {state.get(name)!r} -> {mine[name]!r}); "
                    "the data stream can only resume exactly with the same value. Restore it, or "
                    "resume without the saved data-loader state to start a fresh stream")
        self._batches = int(state["batches"])
        self._workers = _copy_state(state["workers"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        W = self._spec.num_workers
        spec = replace(self._spec, resume=tuple(_copy_state(self._workers)), worker_offset=self._batches % W)
        workers = self._loader_workers
        loader = wds.WebLoader(
            _Stream(spec), batch_size=None, num_workers=workers, collate_fn=_passthrough,
            persistent_workers=workers > 0, pin_memory=self._pin_memory,
            prefetch_factor=self._prefetch_factor if workers > 0 else None)
        for images, texts, meta in loader:
            expected = self._batches % W
            if meta["worker"] != expected:
                raise RuntimeError(f"data loader returned worker {meta['worker']}'s batch, expected {expected}")
            self._workers[expected] = meta["state"]
            self._batches += 1
            check_bad_fraction(self.bad_counts(), sum(w["good"] for w in self._workers),
                               self._spec.max_bad_fraction, self._spec.bad_fraction_min_samples,
                               meta["state"]["last_bad_shard"], f"rank {self._spec.rank}")
            yield images, texts

    def bad_counts(self) -> dict[str, int]:
        """Cumulative bad samples of this process by kind (every kind present, zeros included)."""
        return {k: sum(w["bad"].get(k, 0) for w in self._workers) for k in BAD_KINDS}

    def samples_read(self) -> int:
        """Good + bad samples this process's consumed batches account for."""
        return sum(w["good"] + sum(w["bad"].values()) for w in self._workers)


def build_train_loader(cfg: DataConfig, *, transform: Callable, tokenizer: Callable,
                       local_batch_size: int, seed: int, rank: int, world_size: int,
                       state: dict | None = None, pin_memory: bool = False,
                       prefetch_factor: int = 2, uint8_images: bool = True) -> TrainLoader:
    """The training stream of process `rank` of `world_size` (see the module docstring).

    `state`: this process's `TrainLoader.state_dict()` from a checkpoint, to continue exactly
    where that run stopped. `uint8_images`: ship uint8 batches when the transform ends in
    ToTensor + Normalize (see `split_normalize`). `pin_memory`: for a CUDA device.
    """
    if local_batch_size <= 0:
        raise ConfigError("train.local_batch_size: must be > 0")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    check_shards(cfg.train, "data.train")
    sources = _split_sources(cfg.train)
    urls = [u for source in sources for u in source]
    weights = _shard_weights(cfg, sources)
    if weights is not None and not cfg.resampled:
        raise ConfigError("data.train_data_weights: only used with data.resampled=true (epoch mode "
                          "reads every shard once); remove the weights or set data.resampled=true")
    num_workers = max(1, cfg.workers)
    if not cfg.resampled and len(urls) < world_size * num_workers:
        raise ConfigError(
            f"data.train: {len(urls)} shards for {world_size} processes x {num_workers} workers in "
            "epoch mode, so some worker would get no shard; write more, smaller shards "
            "(make-shards --samples-per-shard), lower data.workers, or set data.resampled=true")
    num_samples = dataset_size(cfg)
    global_batch = local_batch_size * world_size
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"data.train_num_samples: {num_samples} samples are less than one global batch "
                          f"({local_batch_size} x {world_size} processes = {global_batch})")
    normalization = None
    if uint8_images:
        transform, normalization = split_normalize(transform)
        if normalization is None:
            log.info("data: the train transform does not end in ToTensor + Normalize; batches "
                     "stay float32 (normalised in the loader workers)")
    if cfg.decode == "fast":
        fast, why_not = fast_transform(transform)
        if fast is not None:
            transform = fast
        elif rank == 0:
            log.info("data.decode=fast: %s, so images are decoded exactly (data.decode=exact)", why_not)
    spec = _StreamSpec(
        urls=tuple(urls), weights=None if weights is None else tuple(weights),
        resampled=cfg.resampled, seed=seed, rank=rank, world_size=world_size,
        num_workers=num_workers, steps_per_epoch=steps_per_epoch,
        local_batch_size=local_batch_size, shuffle_buffer=cfg.shuffle_buffer,
        image_keys=tuple(k.strip().lower() for k in cfg.image_key.split(";") if k.strip()),
        text_key=cfg.text_key.lower(), max_bad_fraction=cfg.max_bad_fraction,
        bad_fraction_min_samples=cfg.bad_fraction_min_samples, transform=transform,
        tokenizer=tokenizer, resume=(None,) * num_workers, worker_offset=0,
        captions=None if cfg.caption_list_key is None else CaptionSpec(
            cfg.caption_list_key, None if cfg.caption_probs is None else tuple(cfg.caption_probs),
            cfg.caption_list_with_text))
    digest = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]
    return TrainLoader(spec, num_samples, digest, state, loader_workers=cfg.workers,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       image_normalization=normalization)


