"""The resumable per-worker stream and its bad-sample accounting: shard reading, the
resumable shuffle buffer, batches of exactly `local_batch_size` rows with their positions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import pick
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys
from webdataset.utils import make_seed

from clip_train.config import ClipTrainError
from clip_train.data.captions import CaptionSpec, _key_hash, draw_caption
from clip_train.data.decode import _Decoder, stack_images
from clip_train.data.slots import BatchSlots
from clip_train.data.sources import epoch_pieces, epoch_quota, epoch_shard_order
from clip_train.data.tar import expand_shards

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
SHARD_KINDS = ("unreachable_shard", "bad_tar")  # one count per shard: one "sample read" each
WARN_FIRST = 3  # warnings logged per kind and worker before going quiet
USELESS_FRACTION = 0.95  # a worker with no sample trained and this much of its reading bad stops
WORST_SHARDS_KEPT = 8  # shards with the most bad samples remembered per worker (named at a stop)
STATE_VERSION = 1


class DataError(ClipTrainError, RuntimeError):
    """The training data itself is broken (too many bad samples, or none usable)."""


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
    bad_fraction_min_samples: int
    transform: Callable
    tokenizer: Callable
    resume: tuple[dict | None, ...]  # per logical worker
    worker_offset: int
    captions: CaptionSpec | None = None  # several captions per sample (data.caption_list_key)
    # Epoch mode: "samples" splits the epoch's shard sequence into one contiguous range of
    # samples per (rank, worker), sized by its batch quota (needs `shard_sizes`); "shards": each
    # worker reads whole shards (`islice` by rank then by worker), the split of checkpoints
    # written before sample-level splitting existed.
    split: str = "shards"
    shard_sizes: tuple[int, ...] | None = None  # aligned with `urls`
    # Reusable shared-memory batch buffers (DataLoader workers only; see `slots.BatchSlots`).
    slots: BatchSlots | None = None


def _fresh_worker_state() -> dict:
    return {"epoch": 0, "pass": 0, "borrow": False, "batches_in_epoch": 0, "next": [0, 0], "buffer": [],
            "rng": None, "good": 0, "bad": dict.fromkeys(BAD_KINDS, 0), "read": 0, "bad_shards": {}}


class _Counts:
    """A worker's cumulative counts: samples read, trained (good) and unusable (bad, by kind).

    "Read" counts every raw sample taken from a shard (and one per unreadable shard), including
    those still waiting in the shuffle buffer, so bad / read is the fraction of what was read;
    a sample is bad as soon as a cheap check rejects it, or when its image fails to decode as it
    leaves the buffer. `bad_shards` remembers the shards with the most bad samples.
    """

    def __init__(self, spec: _StreamSpec, worker: int, state: dict):
        self.spec, self.worker = spec, worker
        self.good = state["good"]
        self.bad = {k: state["bad"].get(k, 0) for k in BAD_KINDS}
        # States written before `read` existed: the best estimate is what they counted.
        self.read = state.get("read") or self.good + sum(self.bad.values())
        self.bad_shards = dict(state.get("bad_shards") or {})
        self.warned = dict.fromkeys(BAD_KINDS, 0)
        self.pending = 0  # raw samples waiting in the shuffle buffer: read, not yet judged

    def add_bad(self, kind: str, url: str, what: str) -> None:
        self.bad[kind] += 1
        if kind in SHARD_KINDS:  # its samples were never read: the shard counts as one
            self.read += 1
        self._remember(url)
        if self.warned[kind] < WARN_FIRST:
            self.warned[kind] += 1
            more = " (no more warnings of this kind from this worker)" if self.warned[kind] == WARN_FIRST else ""
            log.warning("data: skipped %s in %s (rank %d, worker %d): %s%s", kind, url,
                        self.spec.rank, self.worker, what[:300], more)
        self._check_usable()

    def _remember(self, url: str) -> None:
        self.bad_shards[url] = self.bad_shards.get(url, 0) + 1
        if len(self.bad_shards) > WORST_SHARDS_KEPT:  # forget the least bad shard (not this one)
            least = min((u for u in self.bad_shards if u != url), key=self.bad_shards.__getitem__)
            del self.bad_shards[least]

    def _check_usable(self) -> None:
        """The per-worker guard, for a worker that reads nothing usable: no sample trained yet,
        `bad_fraction_min_samples` read and nearly all of them (USELESS_FRACTION) unusable, the
        rest still waiting in its shuffle buffer. The ceiling itself is judged over the whole
        job (`BadSampleCeiling`), where a worker's share of broken shards is diluted by the rest."""
        n_bad = sum(self.bad.values())
        if self.good == 0 and self.read >= self.spec.bad_fraction_min_samples and n_bad >= USELESS_FRACTION * self.read:
            kinds = ", ".join(f"{k}={v}" for k, v in self.bad.items() if v)
            raise DataError(
                f"rank {self.spec.rank} worker {self.worker}: not one usable sample yet, and {n_bad} of the "
                f"{self.read} samples read were unusable ({kinds}); worst shards: {format_shards(self.bad_shards)}. "
                "Check data.train (data.max_bad_fraction cannot help: nothing would train)")

    def note_kept(self, url: str, what: str) -> None:
        """A sample kept although part of it is unreadable (a corrupt json beside a fine txt):
        warned the first times, not counted as bad."""
        warned = self.warned.setdefault("kept", 0)
        if warned < WARN_FIRST:
            self.warned["kept"] = warned + 1
            more = " (no more warnings of this kind from this worker)" if warned + 1 == WARN_FIRST else ""
            log.warning("data: sample in %s (rank %d, worker %d) %s%s", url, self.spec.rank, self.worker,
                        what[:300], more)


def format_shards(bad_shards: dict[str, int], top: int = 5) -> str:
    """`url (n bad), ...` for the `top` shards with the most bad samples."""
    worst = sorted(bad_shards.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return ", ".join(f"{url} ({n} bad)" for url, n in worst) or "none recorded"


def merge_bad_shards(per_worker: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for shards in per_worker:
        for url, n in shards.items():
            merged[url] = merged.get(url, 0) + n
    return merged


class BadSampleCeiling:
    """`data.max_bad_fraction` judged over every process's samples: over the whole job, and
    over a recent window of at least `window_samples` samples (so bad data that starts late
    is caught too), both once the job has read `min_samples`.

    Call `judge` with the job's cumulative totals (summed over processes) at the same steps on
    every process; it keeps the totals of past calls to measure the window.
    """

    def __init__(self, max_fraction: float, min_samples: int, window_samples: int):
        self.max_fraction, self.min_samples, self.window_samples = max_fraction, min_samples, window_samples
        self._history: deque[tuple[int, int]] = deque()  # (read, bad) at past calls, oldest first

    def judge(self, read: int, bad: int) -> str | None:
        """None, or what is above the ceiling (the start of the stop message)."""
        self._history.append((read, bad))
        # Keep the newest past totals that still leave at least a full window before `read`.
        while len(self._history) > 2 and read - self._history[1][0] >= self.window_samples:
            self._history.popleft()
        if read < self.min_samples:
            return None
        if bad > self.max_fraction * read:
            return f"{bad} of the {read} samples read by all processes ({bad / read:.1%}) were unusable"
        read_0, bad_0 = self._history[0]
        w_read, w_bad = read - read_0, bad - bad_0
        if w_read >= self.window_samples and w_bad > self.max_fraction * w_read:
            return (f"{w_bad} of the last {w_read} samples read by all processes ({w_bad / w_read:.1%}) "
                    f"were unusable ({bad} of {read} in the whole run)")
        return None

    def message(self, verdict: str, bad: dict[str, int], bad_shards: dict[str, int]) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in bad.items() if v)
        return (f"{verdict}, above data.max_bad_fraction={self.max_fraction} ({kinds}); worst shards: "
                f"{format_shards(bad_shards)}. Check the shards (or raise data.max_bad_fraction if "
                "this is expected)")


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
        files = expand_shards(self._opened(), handler=self._on_tar_error)
        yield from group_by_keys(files, handler=self._on_tar_error)


def _worker_seed(rank: int, worker: int) -> int:
    return make_seed(rank, worker)


def _unit_shards(spec: _StreamSpec, worker: int, epoch: int, pass_: int,
                 borrow: bool) -> Iterator[tuple[str, int, int | None]]:
    """(url, first sample, end sample or None) pieces of one pass: endless whole-shard draws
    (resampled), this worker's part of the epoch (a contiguous range of samples of the epoch's
    shard sequence, or whole shards), or (`borrow`: its part held no usable sample) one draw per
    shard from the whole list."""
    if borrow:
        rng = random.Random(make_seed(spec.seed, spec.rank, worker, epoch, pass_, 0xB0))
        return iter([(rng.choice(spec.urls), 0, None) for _ in spec.urls])
    if spec.resampled:
        if spec.weights is None:
            shards = wds.ResampledShards(list(spec.urls), seed=spec.seed, deterministic=True,
                                         worker_seed=partial(_worker_seed, spec.rank, worker))
            return ((s["url"], 0, None) for s in shards)
        rng = random.Random(make_seed(spec.seed, spec.rank, worker, 0xD2A))
        return ((url, 0, None) for url in iter(lambda: rng.choices(spec.urls, weights=spec.weights)[0], None))
    if spec.split == "samples":
        return iter(epoch_pieces(spec.urls, spec.shard_sizes, spec.seed, epoch, spec.rank, spec.world_size,
                                 worker, spec.num_workers, spec.steps_per_epoch, spec.local_batch_size))
    order = epoch_shard_order(list(spec.urls), spec.seed, epoch)
    return ((url, 0, None) for url in islice(islice(order, spec.rank, None, spec.world_size),
                                             worker, None, spec.num_workers))


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
            def note(what: str) -> None:
                if count:
                    self.counts.note_kept(url, f"{sample.get('__key__')!r}: {what}")

            caption = draw_caption(sample, self.spec.text_key, self.spec.captions, seed, bad, note)
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
        for k, (url, start, stop) in enumerate(_unit_shards(self.spec, self.worker, self.epoch, self.pass_, self.borrow)):
            if k < first:
                continue
            # Count shard-level errors only past the resume point: earlier ones were counted. A
            # shard split between workers is judged by the one that reads it to its end (from
            # its start, so it sees every error); the others stop at their part's end.
            owner = stop is None
            counting = owner and (k > resume_at[0] or (k == resume_at[0] and resume_at[1] == 0))
            reader = _ShardReader(url, self.counts if counting else None)
            for off, sample in enumerate(reader):
                if stop is not None and off >= stop:
                    break  # the rest of the shard is another worker's
                if owner and (k, off + 1) >= resume_at:  # errors after this sample were not counted yet
                    reader.counts = self.counts
                if off < start:
                    continue  # another worker's part of the shard
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
                self.counts.read += 1
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


def _worker_batches(spec: _StreamSpec, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """The endless batch stream of one logical worker (runs inside the DataLoader worker)."""
    state = spec.resume[worker] or _fresh_worker_state()
    state = {**_fresh_worker_state(), **state}
    state.pop("last_bad_shard", None)  # written by older versions
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
        samples = iter(shuffle)
        good_before = counts.good
        # The samples this batch still needs, taken and decoded together (the fast decode's two
        # passes, `_Decoder`): the batch ends at the sample it ends at one by one.
        while taken := list(islice(samples, spec.local_batch_size - len(images))):
            for (_, sample), image in zip(taken, decode(epoch, pass_, taken), strict=True):
                if image is not None:
                    images.append(image)
                    captions.append(sample["caption"])
            if len(images) < spec.local_batch_size:
                continue
            state["batches_in_epoch"] += 1
            state.update(shuffle.position(), good=counts.good, bad=dict(counts.bad), read=counts.read,
                         bad_shards=dict(counts.bad_shards))
            slot, storage = None, None
            if spec.slots is not None:
                slot, storage = spec.slots.take(worker, len(images) * images[0].numel() * images[0].element_size())
            batch_images, batch_texts = stack_images(images, storage), spec.tokenizer(captions)
            images, captions = [], []
            yield batch_images, batch_texts, {"worker": worker, "state": _batch_state(state), "slot": slot}
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


def _batch_state(state: dict) -> dict:
    """The worker's state as a batch carries it: a new dict of the values just set. Every
    container in it was built for this batch (`_Pass.position`, the counts' dict copies) and the
    worker replaces rather than changes them, so later batches cannot reach this one's. A deep
    copy (JSON, `_copy_state`) of 1,000 buffered positions and the RNG's 625 words took 0.39 ms
    a batch (~0.5% of a 64-sample batch's decode and augmentation)."""
    return dict(state)


class _Stream(IterableDataset):
    def __init__(self, spec: _StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        return _worker_batches(self.spec, (physical + self.spec.worker_offset) % self.spec.num_workers)


