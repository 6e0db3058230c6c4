"""`data.decode=fast`: draw the crop first, decode the JPEG at the smallest DCT scale that still
covers it at the output resolution, resize once.

The exact path decodes every image at full resolution, converts it to RGB (a copy), crops (a
copy) and resamples the crop with PIL's antialiased filter: on web photos the resample costs
about twice the decode. The fast path keeps the train transform and its random draws, and only
replaces how its RandomResizedCrop gets its pixels:

1. the image is opened, not decoded: only its header is read (size and colour space), by
   simplejpeg for JPEGs it decodes (`JpegHeader`, ~20x cheaper than opening it with PIL), by PIL
   for the rest;
2. the crop draws its parameters from that size as the crop's own `get_params` does, so it
   consumes exactly the random numbers the exact path consumes (same per-sample seed -> same box;
   and the steps after the crop -- flip, colour jitter, grayscale, timm's auto-augment -- draw the
   same numbers after it). torchvision's RandomResizedCrop draws through
   `random_resized_crop_params`, the same numbers in a dozen torch calls where torchvision makes
   seven per attempt, up to ten (see there);
3. a JPEG is decoded at 1/s of its size (libjpeg-turbo's scaled IDCT), s in 1, 2, 4, 8 the
   largest that leaves the crop at least the output size on both sides (and that torch's
   resample can place, below); other formats (PNG, WebP, ...) are decoded fully;
4. one antialiased resample, with the crop's own filter, from the crop box to the output size:
   torch's vectorised uint8 resample (Pillow's kernels, ~3x faster than Pillow's own here) for
   bicubic and bilinear, vertical pass first (`_resize`); PIL's from the fractional box in the
   reduced image's coordinates for other filters.

The steps after the crop run unchanged on its output-size image, which is why every augmentation
of open_clip's and timm's train transforms is reproduced with the same parameters. A call is
`render(*draw(image))` (`FastCompose`): a worker draws a batch's crops first and renders them
after (`decode._Decoder`; one at a time where numpy's state would have to be kept). What the fast
path cannot honour -- a transform that is not a Compose with a RandomResizedCrop, or a step
before the crop that needs the decoded pixels -- makes `fast_transform` return None and a
reason, and the loader then decodes exactly (one log line).

JPEGs (RGB or grayscale) are decoded by simplejpeg (libjpeg-turbo, straight into a numpy array:
~20% faster than PIL's decode and no copy out of PIL's 4-byte pixel layout), with libjpeg-turbo's
fast integer IDCT and chroma upsampling (`SIMPLEJPEG_OPTIONS`: ~10% faster at full size; 38-40 dB
from PIL's accurate decode there, 48 dB at 1/2, equal at 1/4), and resampled by torch; other formats, CMYK JPEGs, filters
torch lacks (nearest, lanczos, ...) and JPEGs simplejpeg rejects (it is strict about damage that
PIL may tolerate) take PIL's route, which then decides as the exact path does.

Differences to `exact`, all in pixel values or below a pixel of the reduced image, never in the
augmentation: the DCT-scaled decode low-passes before the resample (the exact path's antialias
filter does the same job); the two passes run in the other order than Pillow's (both round to
uint8 in between); at the crop's leading edges the resample may read real pixels just
outside it where the exact path repeats the crop's edge; and from a reduced decode the box
starts at a fraction of a reduced pixel, which torch's resample cannot take: it computes a few
outputs ahead of the box and drops them, so that its start falls on a whole pixel to within
MAX_SHIFT_PX (0.1) output pixels (`_axis`); a reduction no lead can place is halved (1/1 needs
none); the fast IDCT and chroma upsampling. In the benchmark's photo-like batches fast is within
42-45 dB PSNR of exact (worst image 34 dB; 42-54 dB with the accurate decode); rounding the
box to whole reduced pixels instead gave 35 dB per batch and below 30 for single images.
EXIF orientation is ignored by both paths alike (as webdataset's decoder does).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

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
# The most torch's resample from a reduced decode may move the crop box, in output pixels (_axis).
MAX_SHIFT_PX = 0.1
_MAX_LEAD = 32  # the most outputs computed ahead of a crop and dropped, to place it (see _axis)
_EXP_MARGIN = 1e-6  # math.exp vs torch's float32 exp: within 1.2e-7 (random_resized_crop_params)
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries ten boxes before its central crop
# JPEG colour spaces simplejpeg decodes to RGB as PIL does (PIL's modes RGB and L); CMYK/YCCK: PIL.
_SIMPLEJPEG_SPACES = ("YCbCr", "RGB", "Gray")
# libjpeg-turbo's fast integer IDCT and chroma upsampling: decodes ~10% faster at full size (no
# effect at 1/4 and below); 38-40 dB from the accurate decode at full size, 48 dB at 1/2, and
# after the resample to 224 px 43 dB instead of 51 from the exact path's batches (photo-like
# shards, benchmarks/data_throughput.py).
SIMPLEJPEG_OPTIONS = {"fastdct": True, "fastupsample": True}


@dataclass(frozen=True)
class JpegHeader:
    """An RGB or grayscale JPEG whose header simplejpeg has read: what `open_image` returns for
    the JPEGs simplejpeg decodes. `size` is (width, height), as PIL's."""
    encoded: bytes
    size: tuple[int, int]

    def pil(self) -> Image.Image:
        """The image opened by PIL (its route: filters torch lacks, JPEGs simplejpeg rejects)."""
        return Image.open(io.BytesIO(self.encoded))


class FastCompose(Compose):
    """A train transform whose first pixel step is a `FastResizedCrop`: it takes an image opened,
    not decoded, by `open_image`, which is how `_Decoder` knows to skip the decode.

    Calling it is `render(*draw(image))`: `draw` runs the steps before the crop (pixel-free) and
    the crop's random draws, `render` the decode, the resample and the steps after. A worker may
    draw every sample of a batch first and render them after (`_Decoder`): the same images from
    the same random numbers, where the later steps draw nothing (`draws_after_crop` False:
    open_clip's train transform, split by `split_normalize`) or draw from torch's and Python's
    RNGs, whose states the worker keeps from each draw to its render (colour jitter, grayscale).
    Where a step before the crop seeds numpy (timm's, `seeds_numpy`), it takes one at a time."""

    def __init__(self, transforms: list):
        super().__init__(transforms)
        self._crop = next(k for k, step in enumerate(transforms) if isinstance(step, FastResizedCrop))
        # Steps after the crop that pass its uint8 tensor on unchanged consume no random numbers.
        self.draws_after_crop = not transforms[self._crop].tensor_out
        # numpy's state kept from a draw to its render would cost ~70 us a sample (get and set).
        self.seeds_numpy = any(type(step).__name__ == "SeedNumpyFromTorch" for step in transforms[:self._crop])

    def draw(self, image: Image.Image | JpegHeader) -> tuple:
        """(the image after the steps before the crop, the crop's drawn parameters)."""
        for step in self.transforms[:self._crop]:
            image = step(image)
        return image, self.transforms[self._crop].draw(image)

    def render(self, image: Image.Image | JpegHeader, crop: tuple):
        """The transform's output for `image` and the crop `draw` gave for it."""
        out = self.transforms[self._crop].render(image, crop)
        for step in self.transforms[self._crop + 1:]:
            out = step(out)
        return out

    def __call__(self, image: Image.Image | JpegHeader):
        return self.render(*self.draw(image))


class FastResizedCrop:
    """Stands in for a RandomResizedCrop (torchvision's or timm's RandomResizedCropAndInterpolation)
    at the head of a train transform: the same parameters from the same random numbers, pixels
    from a reduced decode (see the module docstring). Takes what `open_image` returns (a
    `JpegHeader` or an opened PIL image); returns an RGB PIL image, or uint8 CHW with `tensor_out`."""

    def __init__(self, crop: Callable, tensor_out: bool = False):
        self.crop = crop
        self.size_hw = tuple(crop.size)
        # True when every later step passes a uint8 CHW tensor through (the split transforms'
        # MaybeConvertMode + MaybePILToTensor): the result may then be a tensor.
        self.tensor_out = tensor_out

    def __call__(self, image: Image.Image | JpegHeader) -> Image.Image | torch.Tensor:
        return self.render(image, self.draw(image))

    def draw(self, image: Image.Image | JpegHeader) -> tuple[tuple[int, int, int, int], object]:
        """The crop's random draws for `image`, in its own order: (box (top, left, bottom, right),
        interpolation)."""
        top, left, height, width = self._params(image)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):  # timm's interpolation="random"
            import random

            interpolation = random.choice(interpolation)
        return (top, left, top + height, left + width), interpolation

    def render(self, image: Image.Image | JpegHeader, crop: tuple[tuple[int, int, int, int], object]
               ) -> Image.Image | torch.Tensor:
        """The crop `draw` gave for `image`, decoded and resampled to the output size."""
        box, interpolation = crop
        torch_filter = _TORCH_FILTERS.get(interpolation)
        if isinstance(image, JpegHeader):
            if torch_filter is not None:
                scale, axes = self._reduction(box)
                pixels_HWC = _decode_jpeg(image, scale)
                if pixels_HWC is not None:
                    return self._finish(_resize(pixels_HWC, axes, self.size_hw, torch_filter))
            image = image.pil()
        scale = 1
        if not _loaded(image):
            scale = self._dct_scale(box)
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
            return self._finish(_resize(pixels_HWC, self._axes(box, 1), self.size_hw, torch_filter))
        # A box in the reduced image's coordinates is fractional: PIL resamples from it directly.
        (out_h, out_w), (top, left, bottom, right) = self.size_hw, box
        return image.resize((out_w, out_h), _pil_filter(interpolation),
                            box=(left / scale, top / scale, right / scale, bottom / scale))

    def _params(self, image: Image.Image | JpegHeader) -> tuple[int, int, int, int]:
        """The crop's (top, left, height, width), drawn as its own `get_params` draws them:
        torchvision's from torch, timm's from `random`."""
        crop = self.crop
        width, height = image.size
        if _is_torchvision_crop(crop):
            return random_resized_crop_params(height, width, crop.scale, crop.ratio)
        # get_params reads only the image's size: a header stands in as a strided empty tensor.
        sized = image if isinstance(image, Image.Image) else torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, height, width)
        return crop.get_params(sized, crop.scale, crop.ratio)

    def _dct_scale(self, box: tuple[int, int, int, int]) -> int:
        """The largest of libjpeg's reductions 1/8 .. 1/1 that leaves the crop `box` (top, left,
        bottom, right) at least the output size."""
        (out_h, out_w), (top, left, bottom, right) = self.size_hw, box
        return next(s for s in _DCT_SCALES if ((bottom - top) / out_h >= s and (right - left) / out_w >= s) or s == 1)

    def _reduction(self, box: tuple[int, int, int, int]) -> tuple[int, tuple[_Axis, _Axis]]:
        """The reduction and the two axes' `_Axis` for torch's resample of `box`: the largest
        reduction that `_dct_scale` allows and `_axis` can place within MAX_SHIFT_PX (halved until
        it can; 1/1 always can)."""
        scale = self._dct_scale(box)
        while None in (axes := self._axes(box, scale)):
            scale //= 2
        return scale, axes

    def _axes(self, box: tuple[int, int, int, int], scale: int) -> tuple[_Axis | None, _Axis | None]:
        """`_axis` of `box` (top, left, bottom, right) for y and x at reduction `scale`."""
        (out_h, out_w), (top, left, bottom, right) = self.size_hw, box
        return _axis(top, bottom, scale, out_h), _axis(left, right, scale, out_w)

    def _finish(self, image_CHW: torch.Tensor) -> Image.Image | torch.Tensor:
        """The resampled crop as the next step takes it: the tensor, or an RGB PIL image."""
        if self.tensor_out:
            return image_CHW
        return Image.fromarray(image_CHW.permute(1, 2, 0).numpy(), "RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


class _Axis(NamedTuple):
    """One axis of torch's resample of a crop: input pixels [first, stop) of the reduced image,
    `lead` outputs computed ahead of the crop and dropped, `step` input pixels per output."""
    first: int
    stop: int
    lead: int
    step: float


def _axis(start: int, end: int, scale: int, out: int) -> _Axis | None:
    """How torch resamples [start, end) of an axis (full-size pixels, the crop box's) from the
    image reduced by `scale` to `out` pixels; None where no lead up to _MAX_LEAD places it.

    torch's antialiased resample takes output i from input position (i + 0.5) * step, counted
    from the start of its input, a whole pixel; the box starts at start / scale, a fraction of a
    reduced pixel. So the input starts `lead` outputs (step * lead) before the box, with the
    smallest lead that brings that start within MAX_SHIFT_PX output pixels of a whole pixel,
    and those outputs are dropped: the kept ones are the box's at the box's scale. At 1/1 the
    box is whole (lead 0). The input stops at the box's end (rounded), as the exact path's crop
    does; on the left the kernel reads the pixels before the box that the lead needs, and
    `first` is negative where they lie before the image's edge (`_resize` repeats the edge)."""
    step = (end - start) / (scale * out)
    for lead in range(_MAX_LEAD + 1):
        origin = start / scale - step * lead
        first = round(origin)
        if abs(origin - first) <= MAX_SHIFT_PX * step:
            return _Axis(first, max(first + 1, round(end / scale)), lead, step)
    return None


def _resize(pixels_HWC: torch.Tensor, axes: tuple[_Axis, _Axis], size_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased uint8 resample (Pillow's kernels, torch's vectorised code) of an (H, W, 3)
    image along `axes` (y, x; see `_axis`) to (3, *size_hw), channels-last in memory.

    Two passes, vertical first: the crop's rows at the image's full width (a contiguous band of
    the decoded image, read in place), then the crop's columns of that (a small copy). One call
    of torch's kernel would resample horizontally first, from a copy of the crop: ~5% slower per
    sample (the copy, and the horizontal pass over every input row). Either order rounds to uint8
    in between, as Pillow's resample does: the orders differ by rounding (55 dB)."""
    (y, x), (out_h, out_w) = axes, size_hw
    # The kernels F.interpolate calls, which takes no scale with an output size.
    resample = torch._C._nn._upsample_bicubic2d_aa if mode == "bicubic" else torch._C._nn._upsample_bilinear2d_aa
    # No scale where the input is the box (1/1): torch then computes it as F.interpolate does.
    scale_y, scale_x = [None if (a.stop - a.first) / n == a.step else 1 / a.step for a, n in ((y, out_h), (x, out_w))]
    # narrow() rather than indexing: each multi-slice index costs ~10 us of Python-side parsing,
    # a tenth of a pass.
    band_HWC = pixels_HWC.narrow(0, max(y.first, 0), y.stop - max(y.first, 0))
    if y.first < 0:  # the lead starts above the image: its top row repeated (only dropped outputs read much of it)
        band_HWC = torch.cat([band_HWC[:1].expand(-y.first, -1, -1), band_HWC])
    # (1, 3, H, W) with (H, W, 3) memory, torch's fast uint8 path, when the view's strides are the
    # canonical channels-last ones: `permute(2, 0, 1)[None]` gives batch stride 3, which torch reads
    # as NCHW (a 1.5-2x slower kernel, and an NCHW result). A band of whole rows is contiguous.
    band = band_HWC.unsqueeze(0).permute(0, 3, 1, 2)
    rows = resample(band, [y.lead + out_h, band.shape[3]], False, scale_y, None)
    if y.lead:
        rows = rows.narrow(2, y.lead, out_h)
    rows = rows.narrow(3, max(x.first, 0), x.stop - max(x.first, 0))
    if x.first < 0:  # as above, on the left
        rows = torch.cat([rows[..., :1].expand(-1, -1, -1, -x.first), rows], dim=3)
    out = resample(rows.contiguous(memory_format=torch.channels_last), [out_h, x.lead + out_w], False, None, scale_x)[0]
    return out.narrow(2, x.lead, out_w) if x.lead else out


def random_resized_crop_params(height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` for a `height` x `width` image: the same box
    from the same state of torch's generator, which it leaves in the same state.

    torchvision makes seven torch calls per attempt (each ~3 us of dispatch), and a photo whose
    aspect the ratio range cannot take uses all ten attempts (most web photos at open_clip's
    scale 0.9-1: 0.2 ms a sample). Each attempt draws an area fraction, then a log aspect ratio,
    one generator word each, in the same kernel whatever the tensor's length: so the twenty
    draws are made at once, twice from the same start (once as fractions, once as log ratios),
    and attempt k takes fraction 2k and log ratio 2k + 1. The aspect is exp of that float32 in
    torch; math.exp is within 1e-7 of it, so torch computes it only where a 1e-6 change would
    change the box's rounded sides. The generator is then set to where torchvision's would be:
    after the attempts made, before the two randint draws of a success, made as it makes them."""
    generator = torch.random.default_generator
    start = generator.get_state()
    log_ratio = _log_ratio(tuple(ratio))
    fractions = torch.empty(2 * _ATTEMPTS).uniform_(scale[0], scale[1]).tolist()[0::2]
    generator.set_state(start)
    log_ratios = torch.empty(2 * _ATTEMPTS).uniform_(log_ratio[0], log_ratio[1]).tolist()[1::2]

    def sides(target_area: float, aspect: float) -> tuple[int, int]:
        return int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))

    area = height * width
    for attempt, (fraction, log_aspect) in enumerate(zip(fractions, log_ratios, strict=True)):
        aspect = math.exp(log_aspect)
        w, h = sides(area * fraction, aspect * (1 - _EXP_MARGIN))
        if (w, h) != sides(area * fraction, aspect * (1 + _EXP_MARGIN)):
            w, h = sides(area * fraction, torch.exp(torch.tensor([log_aspect])).item())
        if 0 < w <= width and 0 < h <= height:
            generator.set_state(start)
            torch.empty(2 * attempt + 2).uniform_()  # the words of the attempts made
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            return top, torch.randint(0, width - w + 1, size=(1,)).item(), h, w
    # All twenty words are drawn (the generator is where torchvision's is): its central crop.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=16)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's log of the ratio range: float32 logs, which uniform_ takes as doubles."""
    low, high = torch.log(torch.tensor(ratio)).tolist()
    return low, high


def _is_torchvision_crop(crop: object) -> bool:
    """A torchvision RandomResizedCrop drawing with torchvision's own get_params (not one that a
    subclass or a caller replaced): `random_resized_crop_params` may stand in for it."""
    return (isinstance(crop, RandomResizedCrop) and "get_params" not in vars(crop)
            and type(crop).get_params is RandomResizedCrop.get_params)


def _decode_jpeg(image: JpegHeader, scale: int) -> torch.Tensor | None:
    """A JPEG decoded at 1/`scale` by simplejpeg, as (H, W, 3) uint8; None for a JPEG simplejpeg
    rejects (PIL then accepts or refuses it as the exact path does)."""
    full_w, full_h = image.size
    try:
        # The smallest of libjpeg-turbo's scales whose output is at least this: exactly 1/scale.
        pixels = simplejpeg.decode_jpeg(image.encoded, colorspace="RGB", min_height=-(-full_h // scale),
                                        min_width=-(-full_w // scale), **SIMPLEJPEG_OPTIONS)
    except ValueError:
        return None
    return torch.from_numpy(pixels)


def _loaded(image: Image.Image) -> bool:
    return not getattr(image, "tile", None)  # an opened image file holds its tiles until load()


def _pil_filter(interpolation) -> Image.Resampling:
    if isinstance(interpolation, InterpolationMode):
        return Image.Resampling(pil_modes_mapping[interpolation])
    return Image.Resampling(interpolation)  # timm may hand PIL's own constants


def open_image(data: bytes) -> Image.Image | JpegHeader:
    """The image opened (header read), not decoded: what a `FastCompose` takes. A JPEG that
    simplejpeg decodes (RGB or grayscale, where it is installed) as a `JpegHeader`; anything else
    (other formats, CMYK, a header simplejpeg cannot read) as PIL opens it."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # PIL then opens it, or refuses it as the exact path does
        if colorspace in _SIMPLEJPEG_SPACES:
            return JpegHeader(data, (width, height))
    return Image.open(io.BytesIO(data))


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
