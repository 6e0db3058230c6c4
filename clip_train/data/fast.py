"""`data.decode=fast`: draw the crop first, decode the JPEG at the smallest DCT scale that still
covers it at the output resolution, resize once.

The exact path decodes every image at full resolution, converts it to RGB (a copy), crops (a
copy) and resamples the crop with PIL's antialiased filter: on web photos the resample costs
about twice the decode. The fast path keeps the train transform and its random draws, and only
replaces how its RandomResizedCrop gets its pixels:

1. the image is opened, not decoded (PIL reads the header: size and mode);
2. the crop draws its parameters from that size with the crop's own `get_params`, so it consumes
   exactly the random numbers the exact path consumes (same per-sample seed -> same box; and the
   steps after the crop -- flip, colour jitter, grayscale, timm's auto-augment -- draw the same
   numbers after it);
3. a JPEG is decoded at 1/s of its size (libjpeg-turbo's scaled IDCT), s in 1, 2, 4, 8 the
   largest that leaves the crop at least the output size on both sides (and moves its box by at
   most a quarter of an output pixel, below); other formats (PNG, WebP, ...) are decoded fully;
4. one antialiased resample, with the crop's own filter, from the crop box to the output size:
   torch's vectorised uint8 resample (Pillow's kernels, ~3x faster than Pillow's own here) of a
   dense channels-last copy of the crop for bicubic and bilinear; PIL's from the fractional box
   in the reduced image's coordinates for other filters.

The steps after the crop run unchanged on its output-size image, which is why every augmentation
of open_clip's and timm's train transforms is reproduced with the same parameters. What the fast
path cannot honour -- a transform that is not a Compose with a RandomResizedCrop, or a step
before the crop that needs the decoded pixels -- makes `fast_transform` return None and a
reason, and the loader then decodes exactly (one log line).

JPEGs (RGB or grayscale) are decoded by simplejpeg (libjpeg-turbo, straight into a numpy array:
~20% faster than PIL's decode and no copy out of PIL's 4-byte pixel layout; its output equals
PIL's bit for bit, reduced or not) and resampled by torch; other formats, CMYK JPEGs, filters
torch lacks (nearest, lanczos, ...) and JPEGs simplejpeg rejects (it is strict about damage that
PIL may tolerate) take PIL's route, which then decides as the exact path does.

Differences to `exact`, all in pixel values or below a pixel of the reduced image, never in the
augmentation: the DCT-scaled decode low-passes before the resample (the exact path's antialias
filter does the same job); the resample reads the real pixels just outside the crop box where
the exact path repeats the crop's edge; and with torch's resample from a reduced decode, the box
is rounded to whole pixels of the reduced image, and a reduction whose rounding would move an
edge by more than a quarter of an output pixel (MAX_SHIFT_PX) is halved until it does not (1/1
moves none): in the benchmark's photo-like batches this keeps fast within 40 dB PSNR of exact,
where rounding at any reduction fell to 35 dB per batch and below 30 for single images.
EXIF orientation is ignored by both paths alike (as webdataset's decoder does).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, RandomResizedCrop
from torchvision.transforms.functional import pil_modes_mapping

try:
    import simplejpeg
except ImportError:  # a platform without its wheel: PIL decodes every image
    simplejpeg = None

# Steps that may come before the crop: they do not read the pixels (timm's RNG bridge).
_PIXEL_FREE = ("SeedNumpyFromTorch",)
_DCT_SCALES = (8, 4, 2, 1)  # libjpeg's scaled IDCT: 1/8 .. 1/1
# Steps that hand a uint8 CHW tensor on unchanged (what a split transform ends with).
_TENSOR_PASSTHROUGH = ("MaybeConvertMode", "MaybePILToTensor")
_TORCH_FILTERS = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}
# The most a reduced decode may move the crop box's edges, in output pixels (see FastResizedCrop).
MAX_SHIFT_PX = 0.25


class FastCompose(Compose):
    """A train transform whose first pixel step is a `FastResizedCrop`: it takes an opened, not
    yet decoded PIL image (`open_image`), which is how `_Decoder` knows to skip the decode."""


class FastResizedCrop:
    """Stands in for a RandomResizedCrop (torchvision's or timm's RandomResizedCropAndInterpolation)
    at the head of a train transform: the same parameters from the same random numbers, pixels
    from a reduced decode (see the module docstring). Takes an opened PIL image; returns an RGB PIL image, or uint8 CHW with `tensor_out`."""

    def __init__(self, crop: Callable, tensor_out: bool = False):
        self.crop = crop
        self.size_hw = tuple(crop.size)
        # True when every later step passes a uint8 CHW tensor through (the split transforms'
        # MaybeConvertMode + MaybePILToTensor): the result may then be a tensor.
        self.tensor_out = tensor_out

    def __call__(self, image: Image.Image) -> Image.Image | torch.Tensor:
        crop = self.crop
        # The crop's own draws, in its own order: torchvision's from torch, timm's from `random`.
        top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
        box = (top, left, top + height, left + width)
        interpolation = crop.interpolation
        if isinstance(interpolation, (tuple, list)):  # timm's interpolation="random"
            import random

            interpolation = random.choice(interpolation)
        torch_filter = _TORCH_FILTERS.get(interpolation)
        scale = 1
        if not _loaded(image):
            by_simplejpeg = torch_filter is not None and _simplejpeg_decodes(image)
            scale = self._dct_scale(box, whole_pixels=by_simplejpeg)
            pixels_HWC = _decode_jpeg(image, scale) if by_simplejpeg else None
            if pixels_HWC is not None:
                return self._finish(_resize(pixels_HWC, box, scale, self.size_hw, torch_filter))
            if scale > 1:
                full_w, full_h = image.size
                drafted = image.draft(None, (full_w // scale, full_h // scale))
                scale = full_w / drafted[1][2] if drafted is not None else 1  # not a JPEG: full size
            image.load()
        if image.mode != "RGB":  # as the exact path: convert first (a palette resamples as NEAREST)
            image = image.convert("RGB")
        if scale == 1 and torch_filter is not None:
            with warnings.catch_warnings():  # read-only view of PIL's bytes; nothing writes to it
                warnings.simplefilter("ignore", UserWarning)
                pixels_HWC = torch.from_numpy(np.asarray(image))
            return self._finish(_resize(pixels_HWC, box, 1, self.size_hw, torch_filter))
        # A box in the reduced image's coordinates is fractional: PIL resamples from it directly.
        out_h, out_w = self.size_hw
        return image.resize((out_w, out_h), _pil_filter(interpolation),
                            box=(left / scale, top / scale, (left + width) / scale, (top + height) / scale))

    def _dct_scale(self, box: tuple[int, int, int, int], whole_pixels: bool) -> int:
        """The largest of libjpeg's reductions 1/8 .. 1/1 that leaves the crop `box` (top, left,
        bottom, right) at least the output size. `whole_pixels` (torch resamples whole pixels):
        one whose rounding of the box would move an edge by more than MAX_SHIFT_PX output pixels
        is halved until it does not (1/1 moves none)."""
        (out_h, out_w), (top, left, bottom, right) = self.size_hw, box
        step = ((bottom - top) / out_h, (right - left) / out_w)  # input pixels per output pixel
        scale = next(s for s in _DCT_SCALES if (step[0] >= s and step[1] >= s) or s == 1)
        while whole_pixels and scale > 1 and max(
                abs(round(e / scale) * scale - e) / step[k % 2] for k, e in enumerate(box)) > MAX_SHIFT_PX:
            scale //= 2
        return scale

    def _finish(self, image_CHW: torch.Tensor) -> Image.Image | torch.Tensor:
        """The resampled crop as the next step takes it: the tensor, or an RGB PIL image."""
        if self.tensor_out:
            return image_CHW
        return Image.fromarray(image_CHW.permute(1, 2, 0).numpy(), "RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


def _resize(pixels_HWC: torch.Tensor, box: tuple[int, int, int, int], scale: int, size_hw: tuple[int, int],
            mode: str) -> torch.Tensor:
    """Antialiased uint8 resample of the crop `box` (top, left, bottom, right, full-size pixels)
    of an (H, W, 3) image reduced by `scale`, to (3, *size_hw), channels-last in memory. The box
    is rounded to whole pixels of the reduced image (whole already when scale is 1)."""
    y0, x0, y1, x1 = (round(e / scale) for e in box)
    y1, x1 = min(max(y0 + 1, y1), pixels_HWC.shape[0]), min(max(x0 + 1, x1), pixels_HWC.shape[1])
    # A dense channels-last copy of the crop: torch's fastest uint8 path (~1.6x faster than the view).
    crop_1CHW = pixels_HWC[y0:y1, x0:x1].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(crop_1CHW, size=size_hw, antialias=True, mode=mode)[0]


def _simplejpeg_decodes(image: Image.Image) -> bool:
    """Whether simplejpeg takes this opened image: an RGB or grayscale JPEG (CMYK and other
    formats go to PIL), with its bytes (`open_image`), where simplejpeg is installed."""
    return (simplejpeg is not None and getattr(image, "encoded", None) is not None
            and image.format == "JPEG" and image.mode in ("RGB", "L"))


def _decode_jpeg(image: Image.Image, scale: int) -> torch.Tensor | None:
    """An image `_simplejpeg_decodes` decoded at 1/`scale` by simplejpeg, as (H, W, 3) uint8;
    None for a JPEG simplejpeg rejects (PIL then accepts or refuses it as the exact path does)."""
    full_w, full_h = image.size
    try:
        # The smallest of libjpeg-turbo's scales whose output is at least this: exactly 1/scale.
        pixels = simplejpeg.decode_jpeg(image.encoded, colorspace="RGB", min_height=-(-full_h // scale),
                                        min_width=-(-full_w // scale))
    except ValueError:
        return None
    return torch.from_numpy(pixels)


def _loaded(image: Image.Image) -> bool:
    return not getattr(image, "tile", None)  # an opened image file holds its tiles until load()


def _pil_filter(interpolation) -> Image.Resampling:
    if isinstance(interpolation, InterpolationMode):
        return Image.Resampling(pil_modes_mapping[interpolation])
    return Image.Resampling(interpolation)  # timm may hand PIL's own constants


def open_image(data: bytes) -> Image.Image:
    """The image opened (header read), not decoded: what a `FastCompose` takes. Its encoded
    bytes ride along (`encoded`) for simplejpeg."""
    image = Image.open(io.BytesIO(data))
    image.encoded = data
    return image


def _is_random_resized_crop(step: object) -> bool:
    if isinstance(step, RandomResizedCrop):
        return True
    try:
        from timm.data.transforms import RandomResizedCropAndInterpolation
    except ImportError:
        return False
    return isinstance(step, RandomResizedCropAndInterpolation)


def fast_transform(transform: Callable) -> tuple[FastCompose | None, str]:
    """(the fast version of `transform`, "") or (None, why it cannot have one).

    `transform` (split or not by `split_normalize`) must be a torchvision Compose whose steps
    before its RandomResizedCrop do not read pixels; every step after the crop is kept as is."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, Compose) or steps is None:
        return None, f"the train transform ({type(transform).__name__}) is not a torchvision Compose"
    for k, step in enumerate(steps):
        if _is_random_resized_crop(step):
            after = steps[k + 1:]
            tensor_out = all(type(t).__name__ in _TENSOR_PASSTHROUGH for t in after)
            return FastCompose([*steps[:k], FastResizedCrop(step, tensor_out), *after]), ""
        if type(step).__name__ not in _PIXEL_FREE:
            return None, f"its step {type(step).__name__} reads the pixels before the RandomResizedCrop"
    return None, "the train transform has no RandomResizedCrop"
