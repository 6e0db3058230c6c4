"""Decode and augmentation: PIL decode + the train transform with a per-sample seed; the
transform split before ToTensor + Normalize so that batches travel as uint8. With a
`fast.FastCompose` transform (`data.decode=fast`) the image is only opened here: the transform's
crop decodes it at reduced size after drawing its parameters (see `clip_train.data.fast`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import get_worker_info
from webdataset.autodecode import ImageHandler
from webdataset.utils import make_seed

from clip_train.data.fast import FastCompose, open_image

if TYPE_CHECKING:
    from clip_train.data.stream import _Counts, _StreamSpec

log = logging.getLogger(__name__)


class _Decoder:
    """PIL decode (RGB) + train transform with a per-sample seed, so augmentations are
    reproducible; each sample counted good or bad, in order."""

    def __init__(self, spec: _StreamSpec, worker: int, counts: _Counts, in_main_process: bool):
        self.spec, self.worker, self.counts = spec, worker, counts
        self.pil = ImageHandler("pilrgb", extensions=list(spec.image_keys))
        self.in_main_process = in_main_process
        # fast: open only (size and mode); the transform decodes after drawing its crop.
        self.fast = isinstance(spec.transform, FastCompose)
        transform = spec.transform
        self.two_passes = self.fast and not (transform.draws_after_crop and transform.seeds_numpy)
        # Steps after the crop that draw: each render starts from the RNG states its draw left.
        self.keep_rngs = self.two_passes and transform.draws_after_crop

    def __call__(self, epoch: int, pass_: int, samples: list[tuple[tuple[int, int], dict]]) -> list[torch.Tensor | None]:
        """The images of `samples` ((position, sample) pairs), None for those that fail to decode."""
        # In the training process (workers=0) keep the global RNGs untouched for dropout etc.
        with _preserved_rngs() if self.in_main_process else contextlib.nullcontext():
            if not self.two_passes:
                return [self._judged(sample, _outcome(self._transformed, epoch, pass_, pos, sample))
                        for pos, sample in samples]
            # Every sample's header and crop first, then every decode and resample: the Python of
            # the first pass runs from warm caches rather than after each image's decode and
            # resample evicted it (7-8% less CPU per DataComp-like sample at 224 px). The random
            # numbers are the ones drawn one sample at a time: the steps after the crop draw
            # nothing, or draw from the states `keep_rngs` kept (torch's and Python's).
            drawn = [_outcome(self._drawn, epoch, pass_, pos, sample) for pos, sample in samples]
            return [self._judged(sample, _outcome(self._rendered, *crop) if failed is None else (None, failed))
                    for (_, sample), (crop, failed) in zip(samples, drawn, strict=True)]

    def _opened(self, epoch: int, pass_: int, pos: tuple[int, int], sample: dict):
        """The sample's image, opened (fast) or decoded, with the RNGs seeded for its transform."""
        seed = make_seed(self.spec.seed, self.spec.rank, self.worker, epoch, pass_, pos[0], pos[1])
        image = open_image(sample["image"]) if self.fast else self.pil(f"x.{sample['image_key']}", sample["image"])
        if image is None:
            raise ValueError(f"no image decoder for extension {sample['image_key']!r}")
        random.seed(seed)
        torch.random.default_generator.manual_seed(seed)  # CPU only: leave CUDA alone
        return image

    def _transformed(self, epoch: int, pass_: int, pos: tuple[int, int], sample: dict) -> torch.Tensor:
        return self.spec.transform(self._opened(epoch, pass_, pos, sample))

    def _drawn(self, epoch: int, pass_: int, pos: tuple[int, int], sample: dict) -> tuple:
        """(the image, its crop, the RNG states the steps after the crop start from, or None)."""
        image, crop = self.spec.transform.draw(self._opened(epoch, pass_, pos, sample))
        return image, crop, (torch.random.default_generator.get_state(), random.getstate()) if self.keep_rngs else None

    def _rendered(self, image, crop: tuple, rngs: tuple | None) -> torch.Tensor:
        if rngs is not None:
            torch.random.default_generator.set_state(rngs[0])
            random.setstate(rngs[1])
        return self.spec.transform.render(image, crop)

    def _judged(self, sample: dict, outcome: tuple[torch.Tensor | None, Exception | None]) -> torch.Tensor | None:
        image, failed = outcome
        if failed is not None:  # any decode/transform failure skips the sample
            self.counts.add_bad("corrupt_image", sample["url"], f"sample {sample['key']!r}: {failed!r}")
            return None
        self.counts.good += 1
        return image


def _outcome(fn: Callable, *args) -> tuple[object, Exception | None]:
    """(fn(*args), None), or (None, the exception it raised)."""
    try:
        return fn(*args), None
    except Exception as exn:  # noqa: BLE001 - the caller counts the sample as bad
        return None, exn


def stack_images(images: list[torch.Tensor], storage: torch.UntypedStorage | None = None) -> torch.Tensor:
    """The batch of a worker's images. Images in channels-last layout (the fast path's torch
    resample) are stacked as (B, H, W, C), a plain copy, and returned as a (B, C, H, W) view of
    it: a stack into (B, C, H, W) would transpose every image in the worker, ~6x slower. The
    training process makes the batch contiguous on its device (`batch_to_device`).

    In a DataLoader worker the batch is stacked straight into shared memory, as PyTorch's
    default_collate does: the batch then crosses to the training process without another copy.
    `storage`: that shared memory, when the worker reuses a buffer (`slots.BatchSlots`); it must
    hold the batch exactly."""
    first = images[0]
    channels_last = first.dim() == 3 and first.stride(0) == 1 and first.shape[0] > 1
    parts = [image.permute(1, 2, 0) for image in images] if channels_last else images
    out = None
    shape = (len(parts), *parts[0].shape)
    if storage is None and get_worker_info() is not None:
        storage = first.untyped_storage()._new_shared(math.prod(shape) * first.element_size())
    if storage is not None:
        out = first.new(storage).view(shape)
    batch = torch.stack(parts, out=out)
    return batch.permute(0, 3, 1, 2) if channels_last else batch


@contextlib.contextmanager
def _preserved_rngs() -> Iterator[None]:
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)


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


