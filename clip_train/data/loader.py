"""The loader the training loop uses (`build_train_loader`, `TrainLoader`) and the uint8
batches' trip to the device (`batch_to_device`).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import lru_cache
from typing import Any

import torch
import webdataset as wds
from webdataset.utils import make_seed

from clip_train.config import ConfigError, DataConfig, check_shards
from clip_train.data.captions import CaptionSpec
from clip_train.data.decode import ImageNormalization, split_normalize
from clip_train.data.fast import fast_transform
from clip_train.data.slots import BatchSlots
from clip_train.data.sources import _shard_weights, _split_sources, dataset_size, shard_sizes
from clip_train.data.stream import (
    BAD_KINDS,
    STATE_VERSION,
    BadSampleCeiling,
    DataError,
    _copy_state,
    _fresh_worker_state,
    _Stream,
    _StreamSpec,
    merge_bad_shards,
)
from clip_train.data.tokens import caption_tokenizer

log = logging.getLogger(__name__)


def _passthrough(batch: Any) -> Any:
    return batch


def init_worker(worker_id: int) -> None:
    """DataLoader workers' worker_init_fn (training and evaluation): `gc.freeze()`, then
    `ignore_stop_signals`.

    A forked worker inherits every Python object of the training process (torch, timm, open_clip,
    accelerate, W&B, the model: 0.4-1 million). Its garbage collector's full passes would walk
    them all, writing to each one's header -- copying the parent's pages -- and find nothing to
    free. Frozen first, they are left out and the collector walks only the worker's own objects.
    Measured on DataComp-like 224-px samples with 600,000 more objects in the parent, 4
    alternating pairs: 1.27-1.32 ms of worker CPU a sample without, 1.14-1.18 with (0.90x; no
    change with the benchmark's bare parent, docs/performance.md)."""
    gc.freeze()
    ignore_stop_signals(worker_id)


def ignore_stop_signals(worker_id: int) -> None:
    """Part of a DataLoader worker's start (`init_worker`). A cluster's stop (SIGTERM/SIGUSR1 to
    every process of the job) is the trainer's to act on: it saves a checkpoint and exits. A
    worker killed by the signal would crash the trainer first ("DataLoader worker ... is killed
    by signal"). So a worker ignores SIGUSR1 and every SIGTERM but its trainer's own: the
    DataLoader's shutdown and multiprocessing's exit handler end workers with SIGTERM, and a
    worker deaf to those would hang the trainer's exit. A thread reads SIGTERM's sender
    (sigwaitinfo) to tell them apart."""
    import multiprocessing
    import threading

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    trainer = parent.pid if parent is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer:
                os._exit(0)

    threading.Thread(target=watch, name="stop-signal-filter", daemon=True).start()


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
    `state_dict()` is where the stream stands; `bad_counts()`, `samples_read()` and
    `bad_shards()` are this process's cumulative counts (as of the batches consumed), judged
    over every process by `check_bad_samples`.

    Not for `accelerator.prepare()`: it already splits the data between processes (prepare would
    dispatch every batch from rank 0 or split it a second time).
    """

    def __init__(self, spec: _StreamSpec, num_samples: int, url_digest: str, state: dict | None, *,
                 loader_workers: int, pin_memory: bool, prefetch_factor: int,
                 image_normalization: ImageNormalization | None = None, train_seed: int | None = None,
                 weights: str | None = None):
        self._spec = spec
        self._train_seed = spec.seed if train_seed is None else train_seed
        self._weights = weights
        self.image_normalization = image_normalization
        self._loader_workers = loader_workers  # DataLoader processes (0: in this process)
        self.num_samples = num_samples
        self.steps_per_epoch = spec.steps_per_epoch
        self.local_batch_size = spec.local_batch_size
        self._digest = url_digest
        self._pin_memory = pin_memory
        self._prefetch_factor = prefetch_factor
        self._batches = 0
        self.slot_batches = 0  # batches that came in a worker's reusable buffer (`slots.BatchSlots`)
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
        return {"mode": "resampled" if s.resampled else "epoch", "seed": self._train_seed, "rank": s.rank,
                "world_size": s.world_size, "num_workers": s.num_workers,
                "local_batch_size": s.local_batch_size, "shards": self._digest,
                "steps_per_epoch": s.steps_per_epoch, "shuffle_buffer": s.shuffle_buffer,
                "weights": self._weights, "stream_seed": s.seed, "split": s.split,
                "sizes": None if s.shard_sizes is None else _digest(map(str, s.shard_sizes))}

    def state_dict(self) -> dict:
        """Where this process's stream stands after the batches consumed so far (JSON-friendly)."""
        return {"version": STATE_VERSION, **self._identity(), "batches": self._batches,
                "workers": _copy_state(self._workers)}

    def _load(self, state: dict) -> None:
        fresh = ("set train.resume_data=fresh to keep the model, optimizer and step and restart the "
                 "data stream from a new seed")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"train.resume: data-loader state version {state.get('version')} is not "
                              f"{STATE_VERSION}; {fresh}")
        keys = {"mode": "data.resampled", "seed": "train.seed", "rank": "the process rank",
                "world_size": "the number of processes", "num_workers": "data.workers",
                "local_batch_size": "train.local_batch_size", "shards": "data.train",
                "steps_per_epoch": "data.train_num_samples", "shuffle_buffer": "data.shuffle_buffer",
                "weights": "data.train_data_weights"}
        mine = self._identity()
        for name, key in keys.items():
            if name == "steps_per_epoch" and mine["mode"] == "resampled":
                continue  # epoch length does not shape a resampled stream
            if state.get(name) != mine[name]:
                raise ConfigError(
                    f"{key}: changed since the checkpoint ({name} {state.get(name)!r} -> {mine[name]!r}); "
                    f"the data stream can only resume exactly with the same value. Restore it, or {fresh}")
        # The stream's own seed (train.seed, or one derived from it by train.resume_data=fresh)
        # and the epoch split continue as they were, whatever this run would pick for a new one.
        stream_seed = state.get("stream_seed", state["seed"])
        split = state.get("split", "shards")
        if split == "samples" and state.get("sizes") != mine["sizes"]:
            raise ConfigError("data.train: the shard sizes (sizes.json) changed since the checkpoint; "
                              f"the epoch's split between workers depends on them. Restore them, or {fresh}")
        if split != self._spec.split and self._spec.rank == 0:
            log.info("data: the checkpoint's stream reads whole shards per worker; resuming it "
                     "exactly keeps that split (train.resume_data=fresh moves to the sample-level split)")
        self._spec = replace(self._spec, seed=stream_seed, split=split)
        self._batches = int(state["batches"])
        self._workers = _copy_state(state["workers"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        W = self._spec.num_workers
        workers = self._loader_workers
        # Batches a worker may have made and not yet had back: those queued (prefetch_factor),
        # the one the training step holds and the one it is about to take.
        slots = BatchSlots(W, self._prefetch_factor + 2) if workers > 0 else None
        spec = replace(self._spec, resume=tuple(_copy_state(self._workers)), worker_offset=self._batches % W,
                       slots=slots)
        # A DataLoader draws its workers' base seed when it starts; from the global CPU generator
        # that draw would shift the training's dropout masks (a resumed run starts its loader one
        # draw later than the uninterrupted run did). Its own generator, seeded from where the
        # stream stands, leaves training's generators alone and gives the same worker seeds.
        base_seed = torch.Generator().manual_seed(make_seed(spec.seed, spec.rank, self._batches, 0x10AD))
        loader = wds.WebLoader(
            _Stream(spec), batch_size=None, num_workers=workers, collate_fn=_passthrough,
            persistent_workers=workers > 0, pin_memory=self._pin_memory, worker_init_fn=init_worker,
            prefetch_factor=self._prefetch_factor if workers > 0 else None, generator=base_seed)
        for images, texts, meta in loader:
            expected = self._batches % W
            if meta["worker"] != expected:
                raise RuntimeError(f"data loader returned worker {meta['worker']}'s batch, expected {expected}")
            self._workers[expected] = meta["state"]
            if meta.get("slot") is not None:
                slots.received(images, meta["slot"])
                self.slot_batches += 1
            self._batches += 1
            yield images, texts

    def bad_counts(self) -> dict[str, int]:
        """Cumulative bad samples of this process by kind (every kind present, zeros included)."""
        return {k: sum(w["bad"].get(k, 0) for w in self._workers) for k in BAD_KINDS}

    def samples_read(self) -> int:
        """Samples this process's workers had read when they made the batches consumed: every raw
        sample taken from a shard (those still in the shuffle buffer too), one per unreadable
        shard. The denominator of the bad fraction (see `data.max_bad_fraction`)."""
        return sum(w.get("read") or w["good"] + sum(w["bad"].values()) for w in self._workers)

    def bad_shards(self) -> dict[str, int]:
        """The shards with the most bad samples in this process's workers: url -> bad samples."""
        return merge_bad_shards([w.get("bad_shards") or {} for w in self._workers])


def check_bad_samples(accelerator: Any, loader: TrainLoader, ceiling: BadSampleCeiling) -> dict[str, float]:
    """The bad-sample counts of every process summed (one small all-reduce), judged against
    `data.max_bad_fraction` (whole job and recent window), as metrics. Call it on every process
    at the same steps (train.py: the periodic stop check). Above the ceiling, every process
    raises the same DataError, naming the worst shards of every worker (a gather, only then).
    """
    from accelerate.utils import gather_object

    counts = loader.bad_counts()
    values = torch.tensor([loader.samples_read()] + [counts[k] for k in BAD_KINDS], dtype=torch.int64,
                          device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "sum")
    read, *bad = (int(v) for v in values.tolist())
    bad_by_kind = dict(zip(BAD_KINDS, bad, strict=True))
    verdict = ceiling.judge(read, sum(bad))
    if verdict is not None:
        shards = [loader.bad_shards()]
        if accelerator.num_processes > 1:
            shards = gather_object(shards)
        raise DataError(ceiling.message(verdict, bad_by_kind, merge_bad_shards(shards)))
    return {"data/samples_read": float(read), "data/bad_samples": float(sum(bad)),
            **{f"data/bad/{k}": float(v) for k, v in bad_by_kind.items()}}


def build_train_loader(cfg: DataConfig, *, transform: Callable, tokenizer: Callable,
                       local_batch_size: int, seed: int, rank: int, world_size: int,
                       state: dict | None = None, pin_memory: bool = False,
                       prefetch_factor: int = 2, uint8_images: bool = True,
                       stream_seed: int | None = None) -> TrainLoader:
    """The training stream of process `rank` of `world_size` (see the module docstring).

    `state`: this process's `TrainLoader.state_dict()` from a checkpoint, to continue exactly
    where that run stopped (its stream seed included). `uint8_images`: ship uint8 batches when
    the transform ends in ToTensor + Normalize (see `split_normalize`). `pin_memory`: for a CUDA
    device. `stream_seed`: the seed of a new stream when it is not `seed` (train.resume_data=fresh).
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
    num_samples = dataset_size(cfg)
    global_batch = local_batch_size * world_size
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"data.train_num_samples: {num_samples} samples are less than one global batch "
                          f"({local_batch_size} x {world_size} processes = {global_batch})")
    split, sizes = "shards", None
    if not cfg.resampled:
        split, sizes = _epoch_split(urls, world_size, num_workers, steps_per_epoch * global_batch, rank)
        weights_id = None
    else:
        weights_id = None if weights is None else _digest(map(repr, weights))
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
        text_key=cfg.text_key.lower(),
        bad_fraction_min_samples=cfg.bad_fraction_min_samples, transform=transform,
        tokenizer=caption_tokenizer(tokenizer), resume=(None,) * num_workers, worker_offset=0,
        captions=None if cfg.caption_list_key is None else CaptionSpec(
            cfg.caption_list_key, None if cfg.caption_probs is None else tuple(cfg.caption_probs),
            cfg.caption_list_with_text),
        split=split, shard_sizes=sizes)
    if stream_seed is not None:
        spec = replace(spec, seed=stream_seed)
    return TrainLoader(spec, num_samples, _digest(urls), state, loader_workers=cfg.workers,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       image_normalization=normalization, train_seed=seed,
                       weights=weights_id)


def fresh_stream_seed(seed: int, step: int) -> int:
    """The seed of the stream that train.resume_data=fresh starts at `step`: new for every
    step, the same on every process and on a rerun."""
    return make_seed(seed, step, 0xF4E5) % 2**31


def _digest(lines) -> str:
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


def _epoch_split(urls: list[str], world_size: int, num_workers: int, trained: int,
                 rank: int) -> tuple[str, tuple[int, ...] | None]:
    """Epoch mode's split between (rank, worker) units, with a warning (rank 0) saying what is
    not read exactly once. Sample-level when every shard's size is known (sizes.json or
    img2dataset stats) and covers an epoch's batches; whole shards otherwise."""
    units = world_size * num_workers
    known = shard_sizes(urls)
    total = None if known is None else sum(known.values())
    sizes = None if known is None else tuple(known[u] for u in urls)
    if total is not None and total >= trained:
        if total > trained and rank == 0:
            log.warning("data: epoch mode: %d samples, %d per epoch in whole global batches: %d samples "
                        "(a different random few each epoch) are not seen in each epoch",
                        total, trained, total - trained)
        return "samples", sizes
    if len(urls) < units:
        raise ConfigError(
            f"data.train: {len(urls)} shards for {world_size} processes x {num_workers} workers in "
            "epoch mode without known shard sizes, so some worker would get no shard; write the "
            "shards with `clip-train make-shards` (sizes.json), write more, smaller shards, lower "
            "data.workers, or set data.resampled=true")
    extra = len(urls) % units
    if rank == 0 and (extra or known is not None):
        why = ("no sizes.json or img2dataset stats next to the shards" if known is None else
               f"the shards hold {total} samples, fewer than data.train_num_samples implies ({trained})")
        uneven = (f"{len(urls)} shards over {world_size} processes x {num_workers} workers = {units}: "
                  f"{extra} workers read one shard more than the others, so " if extra else "")
        log.warning("data: epoch mode with whole shards per worker (%s): %sa worker whose shards hold "
                    "fewer samples than its share of the epoch's batches reads some twice, one with "
                    "more leaves some unseen each epoch", why, uneven)
    return "shards", sizes


