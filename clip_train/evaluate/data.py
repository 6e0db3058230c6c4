"""Evaluation inputs: class names and templates, clip_benchmark's webdataset folders, sample
readers, per-rank loaders, and progress reporting.

Shards are split by rank (every world_size-th), then by loader worker, read in order, and batched
per shard: a batch never spans two shards, so its contents, and so every embedding, are the same
for any number of processes and workers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from tqdm import tqdm

from clip_train.config import ConfigError, clip_benchmark_folder, expand_urls
from clip_train.data.loader import init_worker

log = logging.getLogger("clip_train.evaluate")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Without a terminal, a long evaluation logs a progress line at most this often.
PROGRESS_LOG_EVERY_S = 60.0


# --------------------------------------------------------------------------------------------
# Class names and prompt templates


def _read_list(path: str, key: str) -> list[str]:
    """A JSON list of strings, or a text file with one entry per non-empty line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"{key}: {path} must hold a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines()]
    items = [s for s in items if s.strip()]
    if not items:
        raise ConfigError(f"{key}: {path} is empty")
    return items


def load_classnames(spec: str, key: str = "eval.classnames") -> list[str]:
    """Class names: `imagenet`, a JSON list or a one-per-line text file."""
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    return _read_list(spec, key)


@dataclass(frozen=True)
class _Template:
    # A picklable `str -> str` (loader workers may be spawned). str.format is avoided on purpose:
    # a template such as "a {} (with {braces})" would raise. clip_benchmark writes `{c}`.
    text: str

    def __call__(self, classname: str) -> str:
        slot = "{c}" if "{c}" in self.text else "{}"
        return self.text.replace(slot, classname)


def load_templates(spec: str | None, key: str = "eval.templates") -> list[Callable[[str], str]]:
    """Prompt templates with `{}` or `{c}`; None or `imagenet`: the 80 OpenAI templates."""
    if spec is None or spec == "imagenet":
        return list(OPENAI_IMAGENET_TEMPLATES)
    templates = _read_list(spec, key)
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise ConfigError(
            f"{key}: template {bad[0]!r} in {spec} has no '{{}}' (or '{{c}}') where the "
            f"class name goes ({len(bad)} of {len(templates)} templates lack it)"
        )
    return [_Template(t) for t in templates]


def template_text(template: Callable[[str], str]) -> str:
    """The template with `{}` for the class name: a key to share classifiers between data sets."""
    return template("{}")


@dataclass
class ZeroshotSource:
    """A resolved zero-shot entry: where the images are, and which names and prompts to use."""

    key: str  # the config key, named in errors
    kind: str  # "shards" | "imagefolder"
    data: str  # a shard spec (shards) or a directory (imagefolder)
    classnames: str  # spec of the class names, and the key it came from
    classnames_key: str
    templates: str | None
    templates_key: str


def resolve_zeroshot(
    key: str, data: str, classnames: str | None, templates: str | None, defaults: tuple
) -> ZeroshotSource:
    """Entry values first, then a clip_benchmark folder's own files, then eval.classnames /
    eval.templates (`defaults`)."""
    default_names, default_templates = defaults
    names_key = f"{key}.classnames" if key != "eval.zeroshot" else "eval.classnames"
    tmpl_key = f"{key}.templates" if key != "eval.zeroshot" else "eval.templates"
    if os.path.isdir(data) and clip_benchmark_folder(data):
        # clip_benchmark's layout: test/{0..n-1}.tar (n in test/nshards.txt), classnames.txt,
        # zeroshot_classification_templates.txt.
        test = os.path.join(data, "test")
        nshards = os.path.join(test, "nshards.txt")
        if os.path.isfile(nshards):
            n = int(open(nshards, encoding="utf-8").read().strip())
            shards = f"{test}/{{0..{n - 1}}}.tar" if n > 1 else f"{test}/0.tar"
        else:
            names = sorted(f for f in os.listdir(test) if f.endswith(".tar"))
            shards = "::".join(os.path.join(test, f) for f in names)
        own_names = os.path.join(data, "classnames.txt")
        own_templates = os.path.join(data, "zeroshot_classification_templates.txt")
        if classnames is None and os.path.isfile(own_names):
            classnames, names_key = own_names, f"{key} (its classnames.txt)"
        if templates is None and os.path.isfile(own_templates):
            templates, tmpl_key = own_templates, f"{key} (its zeroshot_classification_templates.txt)"
        kind, data = "shards", shards
    else:
        kind = "imagefolder" if os.path.isdir(data) else "shards"
    if classnames is None:
        classnames = default_names
    if templates is None:
        templates = default_templates
    if classnames is None:
        raise ConfigError(f"{names_key}: required for {key} (a file of class names, or 'imagenet')")
    return ZeroshotSource(key, kind, data, classnames, names_key, templates, tmpl_key)


# --------------------------------------------------------------------------------------------
# Samples and loaders


def rank_shards(spec: str, rank: int, world_size: int) -> list[tuple[int, str]]:
    """(global index, url) of the shards this rank reads: every world_size-th, in order."""
    return list(enumerate(expand_urls(spec)))[rank::world_size]


def _number_samples(src: Iterable[dict], shard_index: dict[str, int]) -> Iterator[dict]:
    # A global sample id, (shard index, position in shard), so gathered embeddings can be put
    # back in one canonical order whatever the process and worker count.
    last_url, pos = None, 0
    for sample in src:
        url = sample["__url__"]
        if url != last_url:
            last_url, pos = url, 0
        sample["__id__"] = (shard_index[url] << 32) | pos
        pos += 1
        yield sample


def _image(sample: dict) -> object | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def _captions(sample: dict) -> list[str]:
    """Captions of a retrieval sample: a JSON `captions` list if present, else the `txt` lines."""
    meta = sample.get("json")
    if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
        caps = [str(c) for c in meta["captions"]]
    else:
        caps = str(sample.get("txt", "")).splitlines()
    return [c.strip() for c in caps if c.strip()]


class ZeroshotSample:
    """sample -> (image tensor, class index or -1 when `cls` is missing, shard index)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, sample: dict) -> tuple | None:
        image = _image(sample)
        if image is None:
            return None
        return self.transform(image), int(sample.get("cls", -1)), sample["__id__"]


class RetrievalSample:
    """sample -> (image tensor, tokens [captions, L], sample id); None without captions."""

    def __init__(self, transform: Callable, tokenizer: Callable):
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, sample: dict) -> tuple | None:
        image, captions = _image(sample), _captions(sample)
        if image is None or not captions:
            return None
        return self.transform(image), self.tokenizer(captions), sample["__id__"]


class PairSample:
    """sample -> (image tensor, tokens [1, L] of the whole `txt`, as training reads it, id)."""

    def __init__(self, transform: Callable, tokenizer: Callable):
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, sample: dict) -> tuple | None:
        image, text = _image(sample), str(sample.get("txt", "")).strip()
        if image is None or not text:
            return None
        return self.transform(image), self.tokenizer([text]), sample["__id__"]


def collate_zeroshot(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = zip(*batch, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def collate_captions(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, all captions' tokens, owner of each caption in the batch, sample ids)."""
    images, tokens, ids = zip(*batch, strict=True)
    counts = torch.tensor([t.shape[0] for t in tokens])
    owner_local_T = torch.repeat_interleave(torch.arange(len(images)), counts)
    return torch.stack(images), torch.cat(tokens), owner_local_T, torch.tensor(ids, dtype=torch.long)


def _batched_per_shard(src: Iterable[tuple], batch_size: int, collate: Callable) -> Iterator:
    # The last item of every tuple is the sample id, whose high bits are the shard index.
    batch: list = []
    for item in src:
        if item is None:
            continue
        if batch and (item[-1] >> 32 != batch[-1][-1] >> 32 or len(batch) == batch_size):
            yield collate(batch)
            batch = []
        batch.append(item)
    if batch:
        yield collate(batch)


def shard_loader(
    shards: list[tuple[int, str]],
    to_tuple: Callable,
    collate: Callable,
    batch_size: int,
    workers: int,
) -> Iterable:
    """Batches from this rank's shards, in order; no shard for this rank: no batches."""
    if not shards:
        return []
    urls = [url for _, url in shards]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        # Shards, not samples, are split across workers: a worker without a shard yields nothing.
        wds.split_by_worker,
        # A missing or unreadable shard is an error (results would silently cover less data);
        # a corrupt image only skips its sample, alike for any process count.
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        functools.partial(_number_samples, shard_index={url: i for i, url in shards}),
        wds.decode("pil", handler=wds.warn_and_continue),
        wds.map(to_tuple, handler=wds.warn_and_continue),
        functools.partial(_batched_per_shard, batch_size=batch_size, collate=collate),
    )
    return torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=min(workers, len(urls)), generator=_own_generator(),
        worker_init_fn=init_worker
    )


def imagefolder_loader(
    source: ZeroshotSource,
    transform: Callable,
    num_classes: int,
    rank: int,
    world_size: int,
    batch_size: int,
    workers: int,
) -> Iterable:
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(source.data, transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(
            f"{source.key}: {source.data} is not a usable ImageFolder directory ({err})"
        ) from None
    if len(dataset.classes) != num_classes:
        raise ConfigError(
            f"{source.classnames_key}: {num_classes} class names, but {source.key} "
            f"({source.data}) has {len(dataset.classes)} class folders; class i is the i-th "
            "folder in sorted order"
        )
    # A strided subset: every rank gets a disjoint share, together all images exactly once.
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers,
                                       generator=_own_generator(), worker_init_fn=init_worker)


def _own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed when it starts: from this generator, not the
    global one, so an evaluation during training leaves the training's random stream alone."""
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------------
# Progress


def progress(iterable: Iterable, *, desc: str, show: bool, unit: str = "batches", total=None):
    """A tqdm bar at a terminal; otherwise (cluster logs) a log line every PROGRESS_LOG_EVERY_S
    seconds and one at the end. `show`: this process reports (the main process)."""
    if not show:
        return iterable
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False)
    return _logged(iterable, desc, unit, total)


def _logged(iterable: Iterable, desc: str, unit: str, total) -> Iterator:
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= PROGRESS_LOG_EVERY_S:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s, %.0f s", desc, done, of, unit, now - start)
    if time.monotonic() - start >= PROGRESS_LOG_EVERY_S:
        log.info("%s: done, %d %s in %.0f s", desc, done, unit, time.monotonic() - start)
