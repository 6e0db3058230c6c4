"""Training data: webdataset shards streamed to every process, bad samples counted, shards written.

One stream per data-loader worker. Worker `w` of process `rank` runs the *logical* stream
`(w + offset) % W` (W workers, offset = batches consumed before a resume, mod W), because PyTorch's
DataLoader takes batch i from worker i % W: batch i of a process therefore always comes from
logical stream i % W, across resumes. A logical stream is

    shard urls -> raw samples (bytes; cheap caption checks) -> shuffle buffer of raw samples
               -> decode (PIL, RGB) + augment + tokenize -> batches of exactly local_batch_size

and it is a pure function of (seed, rank, logical worker, epoch, pass):

* resampled mode: `webdataset.ResampledShards` draws shards with replacement from a seed built
  from (seed, rank, worker); endless.
* epoch mode: the shard list is shuffled with a seed built from (seed, epoch) (the same order on
  every rank, a new one every epoch, whatever the DataLoader does with its workers), split by node
  then by worker (`islice(rank, None, world)`, `islice(worker, None, W)`, as webdataset's
  `split_by_node`/`split_by_worker` do, but from the explicit rank and logical worker instead of
  the environment). Every process yields exactly `steps_per_epoch` batches per epoch, so no
  process waits at a collective for one that ran out of data: logical worker l makes the batches
  i of the epoch with i % W == l. A worker whose shards hold fewer samples than that starts
  another pass over its shards (a few samples are seen twice this epoch); one with more stops
  early (its last samples, a random set thanks to the shuffle, wait for the next epoch). With
  shards of equal size split evenly, every sample is seen exactly once per epoch. A worker whose
  shards yield no usable sample at all (all unreachable, say) draws shards from the whole list
  for the rest of the epoch instead of stopping the run.

Exact resume: each batch carries its worker's position: the next raw sample to read (shard index
in the worker's shard sequence, sample index in the shard), the positions of the raw samples in
the shuffle buffer, the shuffle RNG state and the worker's good/bad counts. `TrainLoader` keeps the
position of the last batch consumed from each worker (never of prefetched ones), and a resumed
worker regenerates its shard sequence, skips whole shards without opening them, re-reads only the
shards that held buffered samples (no decoding), and continues. Augmentation is seeded per sample
from its position, so it is reproduced too.

Images travel as uint8 (B, 3, H, W): the train transform is split before its ToTensor +
Normalize (`split_normalize`), and the training process normalises each batch on its device
(`batch_to_device`, `normalize_images`) after a pinned, non-blocking copy, 4x less data through
the workers' shared memory and the host-to-device copy than float32. A transform that needs float
images after Normalize (timm's random erasing) keeps the float32 path.

Bad data never stops the run by itself: unreachable shards, broken tars, missing or empty or
undecodable captions, missing or corrupt images are skipped, counted by kind, and the first few
of each kind logged with the shard name. Only when more than `data.max_bad_fraction` of the
samples read are bad does the loader raise `DataError`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.autodecode import ImageHandler
from webdataset.filters import pick
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import make_seed

from clip_train.config import ClipTrainError, ConfigError, DataConfig, check_shards, expand_urls

log = logging.getLogger(__name__)

# Every kind of unusable input, in the order they are reported. `bad_counts()` always returns all
# of them so that per-process counts can be summed across processes key by key.
BAD_KINDS = (
    "unreachable_shard",  # the shard could not be opened or its `pipe:` command failed
    "bad_tar",  # truncated/empty/malformed tar (counted once per shard)
    "missing_image",  # no file with one of `data.image_key`'s extensions in the sample
    "missing_caption",  # no `data.text_key` file in the sample
    "empty_caption",  # caption is only whitespace
    "undecodable_text",  # caption is not UTF-8
    "corrupt_image",  # PIL cannot decode the image (or the transform fails on it)
)
WARN_FIRST = 3  # warnings logged per kind and worker before going quiet
STATE_VERSION = 1


class DataError(ClipTrainError, RuntimeError):
    """The training data itself is broken (too many bad samples, or none usable)."""


# --------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class CaptionSpec:
    list_key: str  # key of the caption list (or one string) in the sample's json
    probs: tuple[float, ...] | None  # weights by candidate position; the last shared by the rest
    with_text: bool  # the txt caption is candidate 0


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def caption_weights(positions: list[int], probs: tuple[float, ...] | None) -> list[float]:
    """Weights of the candidates at `positions`: probs[p], the last weight shared equally by the
    candidates from its position on; uniform without probs or when all present weights are 0."""
    if not probs:
        return [1.0] * len(positions)
    tail = len(probs) - 1
    in_tail = sum(p >= tail for p in positions)
    weights = [probs[p] if p < tail else probs[tail] / in_tail for p in positions]
    return weights if sum(weights) > 0 else [1.0] * len(positions)


def draw_caption(sample: dict, text_key: str, spec: CaptionSpec, seed: int,
                 bad: Callable[[str, str], None]) -> str | None:
    """One caption among the sample's txt caption (candidate 0, with spec.with_text) and the list
    under `spec.list_key` in its json, drawn with `seed`; None (counted by `bad`) if there is none."""
    candidates: list[tuple[int, str]] = []
    text = None
    if text_key in sample:
        try:
            text = sample[text_key].decode("utf-8")
        except UnicodeDecodeError as exn:
            bad("undecodable_text", str(exn))
            return None
    offset = 1 if spec.with_text else 0
    if spec.with_text and text is not None and text.strip():
        candidates.append((0, text))
    found = False
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as exn:
            bad("undecodable_text", f"json: {exn}")
            return None
        value = meta.get(spec.list_key) if isinstance(meta, dict) else None
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            found = found or bool(value)
            candidates += [(offset + i, c) for i, c in enumerate(value) if isinstance(c, str) and c.strip()]
    if not candidates and not spec.with_text and text is not None and text.strip():
        candidates.append((0, text))  # no list: fall back on the txt caption
    if not candidates:
        if text is None and not found:
            bad("missing_caption", f"no {text_key} file and no json {spec.list_key!r} list")
        else:
            bad("empty_caption", "every caption is empty")
        return None
    if len(candidates) == 1:
        return candidates[0][1]
    weights = caption_weights([p for p, _ in candidates], spec.probs)
    return random.Random(seed).choices([c for _, c in candidates], weights)[0]


@dataclass(frozen=True)
class _StreamSpec:
    urls: tuple[str, ...]
    weights: tuple[float, ...] | None
    resampled: bool
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers W (>= 1)
    steps_per_epoch: int
    local_batch_size: int
    shuffle_buffer: int
    image_keys: tuple[str, ...]
    text_key: str
    max_bad_fraction: float
    bad_fraction_min_samples: int
    transform: Callable
    tokenizer: Callable
    resume: tuple[dict | None, ...]  # per logical worker
    worker_offset: int
    captions: CaptionSpec | None = None  # several captions per sample (data.caption_list_key)


def _fresh_worker_state() -> dict:
    return {"epoch": 0, "pass": 0, "borrow": False, "batches_in_epoch": 0, "next": [0, 0], "buffer": [],
            "rng": None, "good": 0, "bad": dict.fromkeys(BAD_KINDS, 0), "last_bad_shard": None}


class _Counts:
    """A worker's cumulative good/bad counts; warns the first times, enforces the ceiling."""

    def __init__(self, spec: _StreamSpec, worker: int, state: dict):
        self.spec, self.worker = spec, worker
        self.good = state["good"]
        self.bad = {k: state["bad"].get(k, 0) for k in BAD_KINDS}
        self.last_bad_shard = state["last_bad_shard"]
        self.warned = dict.fromkeys(BAD_KINDS, 0)
        self.pending = 0  # raw samples waiting in the shuffle buffer: read, not yet judged

    def add_bad(self, kind: str, url: str, what: str) -> None:
        self.bad[kind] += 1
        self.last_bad_shard = url
        if self.warned[kind] < WARN_FIRST:
            self.warned[kind] += 1
            more = " (no more warnings of this kind from this worker)" if self.warned[kind] == WARN_FIRST else ""
            log.warning("data: skipped %s in %s (rank %d, worker %d): %s%s", kind, url,
                        self.spec.rank, self.worker, what[:300], more)
        check_bad_fraction(self.bad, self.good + self.pending, self.spec.max_bad_fraction,
                           self.spec.bad_fraction_min_samples, self.last_bad_shard,
                           f"rank {self.spec.rank}, worker {self.worker}")


def check_bad_fraction(bad: dict[str, int], good: int, ceiling: float, min_samples: int,
                       last_bad_shard: str | None, where: str) -> None:
    """Raise DataError when more than `ceiling` of at least `min_samples` samples were bad."""
    n_bad = sum(bad.values())
    read = n_bad + good
    if read >= min_samples and n_bad > ceiling * read:
        kinds = ", ".join(f"{k}={v}" for k, v in bad.items() if v)
        raise DataError(
            f"{n_bad} of {read} samples read ({n_bad / read:.1%}) were unusable ({where}: {kinds}), "
            f"above data.max_bad_fraction={ceiling}; latest bad shard: {last_bad_shard}. "
            "Check the shards (or raise data.max_bad_fraction if this is expected).")


def _open_stream(url: str):
    """gopen for local paths, `pipe:` and the schemes webdataset knows; fsspec for the others."""
    scheme = urlparse(url).scheme
    if url.startswith("pipe:") or scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


class _ShardReader:
    """Raw samples of one shard, in file order, with shard-level errors classified and counted."""

    def __init__(self, url: str, counts: _Counts | None):
        self.url, self.counts = url, counts
        self.failed = False  # set at the first error; samples after it are the broken remainder
        self.counted = False
        self.tar_error: BaseException | None = None

    def _count(self, kind: str, exn: BaseException) -> None:
        if not self.counted and self.counts is not None:  # one count per shard
            self.counts.add_bad(kind, self.url, repr(exn))
        self.counted = True

    def _fail_open(self, exn: BaseException) -> None:
        self.failed = True
        self._count("unreachable_shard", exn)

    def _on_tar_error(self, exn: BaseException) -> bool:
        # Judged when the stream closes: a failing `pipe:` command (curl, aws s3 cp) often shows
        # first as an empty or cut tar, and only its exit status says the shard was unreachable.
        self.failed = True
        if self.tar_error is None:
            self.tar_error = exn
        return True  # webdataset handler protocol: True = skip and continue

    def _judge_tar_error(self) -> None:
        if self.tar_error is not None:
            exn = self.tar_error
            unreachable = isinstance(exn, (ConnectionError, TimeoutError, FileNotFoundError, PermissionError))
            self._count("unreachable_shard" if unreachable else "bad_tar", exn)

    def _opened(self) -> Iterator[dict]:
        try:
            stream = _open_stream(self.url)
        except Exception as exn:  # noqa: BLE001 - any opener error means the shard is unreachable
            self._fail_open(exn)
            return
        try:
            yield {"url": self.url, "stream": stream}
        except GeneratorExit:  # stopped early (epoch quota reached): close without waiting
            with contextlib.suppress(Exception):
                stream.close()
            self._judge_tar_error()
            raise
        try:  # read to the end so that a `pipe:` command is not killed by SIGPIPE, then its status
            while stream.read(1 << 16):
                pass
            stream.close()
        except Exception as exn:  # noqa: BLE001 - `pipe:` exit status != 0
            self.failed = True
            self._count("unreachable_shard", exn)
        self._judge_tar_error()

    def __iter__(self) -> Iterator[dict]:
        files = tar_file_expander(self._opened(), handler=self._on_tar_error)
        yield from group_by_keys(files, handler=self._on_tar_error)


def _worker_seed(rank: int, worker: int) -> int:
    return make_seed(rank, worker)


def _unit_shards(spec: _StreamSpec, worker: int, epoch: int, pass_: int, borrow: bool) -> Iterator[str]:
    """The shard urls of one pass: endless draws (resampled) or this worker's share of the epoch
    (`borrow`: its share held no usable sample, so one draw per shard from the whole list)."""
    if borrow:
        rng = random.Random(make_seed(spec.seed, spec.rank, worker, epoch, pass_, 0xB0))
        return iter([rng.choice(spec.urls) for _ in spec.urls])
    if spec.resampled:
        if spec.weights is None:
            shards = wds.ResampledShards(list(spec.urls), seed=spec.seed, deterministic=True,
                                         worker_seed=partial(_worker_seed, spec.rank, worker))
            return (s["url"] for s in shards)
        rng = random.Random(make_seed(spec.seed, spec.rank, worker, 0xD2A))
        return iter(lambda: rng.choices(spec.urls, weights=spec.weights)[0], None)
    order = epoch_shard_order(list(spec.urls), spec.seed, epoch)
    return islice(islice(order, spec.rank, None, spec.world_size), worker, None, spec.num_workers)


class _Pass:
    """One pass of a worker: raw samples of its shard sequence through a resumable shuffle buffer.

    Same algorithm as webdataset's `shuffle` (fill the buffer, then `pick` a random element for
    each new one, drain at the end), but its buffer and RNG are visible so that a batch can record
    where the stream stands, and a resumed pass can rebuild the buffer from sample positions.
    """

    def __init__(self, spec: _StreamSpec, worker: int, counts: _Counts, state: dict):
        self.spec, self.worker, self.counts = spec, worker, counts
        self.epoch, self.pass_, self.borrow = state["epoch"], state["pass"], state["borrow"]
        self.rng = random.Random(make_seed(spec.seed, spec.rank, worker, self.epoch, self.pass_, 0x5F))
        if state["rng"] is not None:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        self.next = tuple(state["next"])
        self.resume_buffer = [tuple(p) for p in state["buffer"]]
        self.buffer: list[tuple[tuple[int, int], dict]] = []

    def position(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"next": list(self.next), "buffer": [list(p) for p, _ in self.buffer],
                "rng": [version, list(internal), gauss]}

    def _checked(self, sample: dict, url: str, count: bool, pos: tuple[int, int]) -> dict | None:
        """Cheap checks before the shuffle buffer: caption present, UTF-8, non-empty; image present."""
        def bad(kind: str, what: str) -> None:
            if count:
                self.counts.add_bad(kind, url, f"sample {sample.get('__key__')!r}: {what}")

        image_key = next((k for k in self.spec.image_keys if k in sample), None)
        if image_key is None:
            bad("missing_image", f"no {'/'.join(self.spec.image_keys)} file (has {sorted(sample)})")
            return None
        if self.spec.captions is not None:  # one of several captions, drawn reproducibly
            # Epoch mode: a function of (seed, key, epoch), whatever the process/worker layout;
            # resampled mode adds the stream position, since a sample is drawn again and again.
            where = (self.pass_, self.spec.rank, self.worker, *pos) if self.spec.resampled else ()
            seed = make_seed(self.spec.seed, _key_hash(sample["__key__"]), self.epoch, *where)
            caption = draw_caption(sample, self.spec.text_key, self.spec.captions, seed, bad)
            if caption is None:
                return None
            return {"key": sample["__key__"], "url": url, "image_key": image_key,
                    "image": sample[image_key], "caption": caption}
        if self.spec.text_key not in sample:
            bad("missing_caption", f"no {self.spec.text_key} file")
            return None
        try:
            caption = sample[self.spec.text_key].decode("utf-8")
        except UnicodeDecodeError as exn:
            bad("undecodable_text", str(exn))
            return None
        if not caption.strip():
            bad("empty_caption", "caption is empty")
            return None
        return {"key": sample["__key__"], "url": url, "image_key": image_key,
                "image": sample[image_key], "caption": caption}

    def _raw(self) -> Iterator[tuple[tuple[int, int], dict]]:
        """(position, checked raw sample) from `self.next` on.

        A resumed pass first re-reads, uncounted and undecoded, the shards that held the samples
        of its saved buffer; shards before them are skipped without being opened.
        """
        resume_at = self.next
        restoring = bool(self.resume_buffer) or resume_at != (0, 0)
        want = set(self.resume_buffer)
        first = min([p[0] for p in self.resume_buffer] + [resume_at[0]])
        found: dict[tuple[int, int], dict] = {}
        for k, url in enumerate(_unit_shards(self.spec, self.worker, self.epoch, self.pass_, self.borrow)):
            if k < first:
                continue
            # Count shard-level errors only past the resume point: earlier ones were counted.
            counting = k > resume_at[0] or (k == resume_at[0] and resume_at[1] == 0)
            reader = _ShardReader(url, self.counts if counting else None)
            for off, sample in enumerate(reader):
                if (k, off + 1) >= resume_at:  # errors after this sample were not counted yet
                    reader.counts = self.counts
                # Samples after a tar error are the incomplete one that was being read: part of
                # the `bad_tar` already counted, not a missing caption/image of their own.
                if reader.failed and not (self.spec.text_key in sample and any(
                        i in sample for i in self.spec.image_keys)):
                    continue
                if (k, off) < resume_at:
                    if (k, off) in want:
                        checked = self._checked(sample, url, count=False, pos=(k, off))
                        if checked is not None:
                            found[(k, off)] = checked
                    continue
                if restoring:
                    self._restore_buffer(found)
                    restoring = False
                self.next = (k, off + 1)
                checked = self._checked(sample, url, count=True, pos=(k, off))
                if checked is not None:
                    yield (k, off), checked
            if k >= resume_at[0]:
                self.next = (k + 1, 0)
        if restoring:
            self._restore_buffer(found)

    def _restore_buffer(self, found: dict) -> None:
        missing = [p for p in self.resume_buffer if p not in found]
        if missing:
            log.warning("data: %d buffered samples of rank %d worker %d were not found again on "
                        "resume (did the shards change?); continuing without them",
                        len(missing), self.spec.rank, self.worker)
        self.buffer = [(p, found[p]) for p in self.resume_buffer if p in found]
        self.resume_buffer = []

    def __iter__(self) -> Iterator[tuple[tuple[int, int], dict]]:
        for item in self._raw():
            self.buffer.append(item)
            self.counts.pending = len(self.buffer)
            if len(self.buffer) > self.spec.shuffle_buffer:
                yield pick(self.buffer, self.rng)
                self.counts.pending = len(self.buffer)
        while self.buffer:
            yield pick(self.buffer, self.rng)
            self.counts.pending = len(self.buffer)


class _Decoder:
    """PIL decode (RGB) + train transform with a per-sample seed, so augmentations are reproducible."""

    def __init__(self, spec: _StreamSpec, worker: int, counts: _Counts, in_main_process: bool):
        self.spec, self.worker, self.counts = spec, worker, counts
        self.pil = ImageHandler("pilrgb", extensions=list(spec.image_keys))
        self.in_main_process = in_main_process

    def __call__(self, epoch: int, pass_: int, pos: tuple[int, int], sample: dict) -> torch.Tensor | None:
        seed = make_seed(self.spec.seed, self.spec.rank, self.worker, epoch, pass_, pos[0], pos[1])
        # In the training process (workers=0) keep the global RNGs untouched for dropout etc.
        guard = _preserved_rngs() if self.in_main_process else contextlib.nullcontext()
        try:
            with guard:
                image = self.pil(f"x.{sample['image_key']}", sample["image"])
                if image is None:
                    raise ValueError(f"no image decoder for extension {sample['image_key']!r}")
                random.seed(seed)
                torch.random.default_generator.manual_seed(seed)  # CPU only: leave CUDA alone
                return self.spec.transform(image)
        except Exception as exn:  # noqa: BLE001 - any decode/transform failure skips the sample
            self.counts.add_bad("corrupt_image", sample["url"], f"sample {sample['key']!r}: {exn!r}")
            return None


@contextlib.contextmanager
def _preserved_rngs() -> Iterator[None]:
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)


def _worker_batches(spec: _StreamSpec, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """The endless batch stream of one logical worker (runs inside the DataLoader worker)."""
    state = spec.resume[worker] or _fresh_worker_state()
    state = {**_fresh_worker_state(), **state}
    counts = _Counts(spec, worker, state)
    decode = _Decoder(spec, worker, counts, in_main_process=get_worker_info() is None)
    images: list[torch.Tensor] = []
    captions: list[str] = []
    while True:
        epoch, pass_ = state["epoch"], state["pass"]
        quota = None if spec.resampled else epoch_quota(epoch, worker, spec.steps_per_epoch, spec.num_workers)
        if quota is not None and state["batches_in_epoch"] >= quota:
            state = {**_fresh_worker_state(), "epoch": epoch + 1}
            continue
        fresh_pass = state["next"] == [0, 0] and not state["buffer"]
        shuffle = _Pass(spec, worker, counts, state)
        good_before = counts.good
        for pos, sample in shuffle:
            image = decode(epoch, pass_, pos, sample)
            if image is None:
                continue
            counts.good += 1
            images.append(image)
            captions.append(sample["caption"])
            if len(images) < spec.local_batch_size:
                continue
            state["batches_in_epoch"] += 1
            state.update(shuffle.position(), good=counts.good, bad=dict(counts.bad),
                         last_bad_shard=counts.last_bad_shard)
            batch_images, batch_texts = torch.stack(images), spec.tokenizer(captions)
            images, captions = [], []
            yield batch_images, batch_texts, {"worker": worker, "state": _copy_state(state)}
            if quota is not None and state["batches_in_epoch"] >= quota:
                break  # epoch done; what is left of this pass waits for the next epoch
        else:
            if spec.resampled:
                raise DataError(f"rank {spec.rank} worker {worker}: the resampled shard stream ended")
            borrow = state["borrow"]
            if fresh_pass and counts.good == good_before:
                if borrow:
                    raise DataError(
                        f"rank {spec.rank} worker {worker}: not one usable sample in its shards of "
                        f"epoch {epoch} nor in {len(spec.urls)} shards drawn from all of data.train "
                        "(the warnings above say why); check data.train")
                # Rather than stopping the run for a few broken shards that all landed on this
                # worker, draw its shards from the whole list for the rest of the epoch.
                log.warning("data: rank %d worker %d: no usable sample in its shards of epoch %d; "
                            "drawing shards from all of data.train for the rest of the epoch",
                            spec.rank, worker, epoch)
                borrow = True
            # The shards ran out before the quota: another pass over them, newly shuffled.
            state = {**state, "pass": pass_ + 1, "borrow": borrow, "next": [0, 0], "buffer": [], "rng": None}


def _copy_state(state: dict) -> dict:
    return json.loads(json.dumps(state))


class _Stream(IterableDataset):
    def __init__(self, spec: _StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        return _worker_batches(self.spec, (physical + self.spec.worker_offset) % self.spec.num_workers)


def _passthrough(batch: Any) -> Any:
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers' worker_init_fn. A cluster's stop (SIGTERM/SIGUSR1 to every process of
    the job) is the trainer's to act on: it saves a checkpoint and exits. A worker killed by the
    signal would crash the trainer first ("DataLoader worker ... is killed by signal"). Workers
    still end with the trainer (the DataLoader's shutdown, and torch's watchdog on its parent)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# uint8 batches, normalised on the device


@dataclass(frozen=True)
class ImageNormalization:
    """Per-channel mean and std that the train transform's Normalize would have applied."""
    mean: tuple[float, ...]
    std: tuple[float, ...]


# The steps that turn a PIL image into a float tensor in [0, 1]: torchvision's, open_clip's and
# timm's. They consume no random numbers, so dropping them keeps every augmentation identical.
_TO_FLOAT_TENSOR = ("ToTensor", "MaybeToTensor")


def split_normalize(transform: Callable) -> tuple[Callable, ImageNormalization | None]:
    """(`transform` stopped at uint8 CHW, the Normalize it ended with), or (`transform`, None).

    Splits a Compose that ends in [..., ToTensor, Normalize] (open_clip's train and eval
    transforms, timm's without random erasing): the returned transform ends in timm's
    `MaybePILToTensor` (uint8, unscaled) instead, as timm's own GPU prefetcher does. Anything
    else (a custom callable, steps after Normalize that need float images, e.g. timm's
    RandomErasing) is returned unchanged with None: the loader then ships float32 as it is.
    """
    steps = list(getattr(transform, "transforms", None) or [])
    if len(steps) < 2:
        return transform, None
    to_tensor, normalize = steps[-2], steps[-1]
    if type(to_tensor).__name__ not in _TO_FLOAT_TENSOR or type(normalize).__name__ != "Normalize":
        return transform, None
    from timm.data.transforms import MaybePILToTensor
    from torchvision.transforms import Compose

    mean, std = (tuple(float(x) for x in torch.as_tensor(v).flatten()) for v in (normalize.mean, normalize.std))
    return Compose([*steps[:-2], MaybePILToTensor()]), ImageNormalization(mean, std)


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
    images = images.to(device, non_blocking=True)
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
            persistent_workers=workers > 0, pin_memory=self._pin_memory, worker_init_fn=ignore_stop_signals,
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


# --------------------------------------------------------------------------------------------
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
