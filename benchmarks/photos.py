"""Photo-like JPEGs for the data benchmarks and tests/test_fast_decode.py: smooth shading,
sharp-edged objects and texture at every scale (1/f noise, as in natural images) plus sensor
grain, so that JPEG size and decode cost are those of real photos (about 2 bits per pixel at
quality 90), not of flat colour fields."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image of `width` x `height` with structure at every scale."""
    field = np.zeros((height, width, 3), np.float32)
    amplitude, cells = 70.0, 2
    while cells < max(width, height) // 2:  # octaves of 1/f noise: amplitude halves as detail doubles
        coarse = rng.normal(0, 1, (max(2, cells * height // max(width, height)),
                                   max(2, cells * width // max(width, height)), 3))
        octave = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize(
            (width, height), Image.Resampling.BICUBIC)) for c in coarse.transpose(2, 0, 1)], -1)
        field += amplitude * octave
        amplitude, cells = amplitude * 0.7, cells * 2
    image = Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):  # objects: sharp edges the decoders must keep
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 4, (height, width, 3))  # sensor grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def web_size(rng: np.random.Generator, longest: tuple[int, int] = (375, 1280)) -> tuple[int, int]:
    """(width, height): longest side uniform in `longest`, aspect ratio 1:2 .. 2:1."""
    side = int(rng.integers(longest[0], longest[1] + 1))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    short = max(16, round(side / max(aspect, 1 / aspect)))
    return (side, short) if aspect >= 1 else (short, side)


def jpeg_bytes(image: Image.Image, quality: int = 90, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, **save)
    return buf.getvalue()
