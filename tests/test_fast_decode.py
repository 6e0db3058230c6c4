"""data.decode=fast against exact: the same crop and augmentation draws, pixels within 30 dB
PSNR on photo-like JPEGs, every image kind; exact is today's decode bit for bit; the fallback."""

from __future__ import annotations

import io
import logging
import random
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import open_clip
import PIL
import pytest
import torch
import webdataset as wds
from data_shards import id_tokenizer, to_tensor
from PIL import Image, ImageFile
from torchvision import transforms as T
from torchvision.transforms import Compose
from webdataset.autodecode import ImageHandler
from webdataset.utils import make_seed

from clip_train.config import DataConfig
from clip_train.data import build_train_loader, epoch_shard_order, split_normalize
from clip_train.data.fast import FastCompose, fast_transform, open_image
from clip_train.model import SeedNumpyFromTorch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from photos import jpeg_bytes, photo, web_size  # noqa: E402 - the benchmarks' photo-like JPEGs

pytestmark = pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")  # open_clip 3.3
MIN_PSNR_DB = 30.0
PILRGB = ImageHandler("pilrgb", ["jpg", "png", "webp"])  # the exact path's decoder


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def seed_all(seed: int) -> None:  # as the loader seeds each sample
    random.seed(seed)
    torch.random.default_generator.manual_seed(seed)


def exact_and_fast(transform, data: bytes, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample both ways: `transform` (split to uint8) on the full decode, its fast version on
    the opened image. Also checks that both leave the RNGs in the same state (same draws)."""
    split, _ = split_normalize(transform)
    fast, why = fast_transform(split)
    assert fast is not None, why
    seed_all(seed)
    exact = split(PILRGB("x.jpg", data))
    after_exact = (random.random(), torch.rand(1).item())
    seed_all(seed)
    quick = fast(open_image(data))
    assert (random.random(), torch.rand(1).item()) == after_exact
    assert quick.dtype == exact.dtype == torch.uint8 and quick.shape == exact.shape
    return exact, quick


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Photo-like JPEGs at quality 90: web originals (375-1280 px, mixed aspect) and
    DataComp-like (longest side 512)."""
    rng = np.random.default_rng(0)
    sizes = [web_size(rng) for _ in range(5)] + [web_size(rng, (512, 512)) for _ in range(3)]
    return [jpeg_bytes(photo(rng, w, h)) for w, h in sizes]


def _transforms():
    yield "open_clip default 224", open_clip.image_transform(224, is_train=True)
    yield "open_clip scale 0.08 64", open_clip.image_transform(64, is_train=True, aug_cfg={"scale": (0.08, 1.0)})
    yield "open_clip jitter + gray 96", open_clip.image_transform(
        96, is_train=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
        aug_cfg={"color_jitter_prob": 0.8, "color_jitter": (0.4, 0.4, 0.4, 0.1), "gray_scale_prob": 0.5})
    yield "timm random interpolation + ratio 96", open_clip.image_transform(
        96, is_train=True, interpolation="random",
        aug_cfg={"use_timm": True, "scale": (0.3, 1.0), "ratio": (0.5, 2.0)})


@pytest.mark.parametrize("name", [n for n, _ in _transforms()])
def test_fast_draws_the_same_crop_and_is_within_30_db(name, photos):
    transform = dict(_transforms())[name]
    crop = transform.transforms[0]
    boxes = []
    crop.get_params = lambda *args, get=crop.get_params: boxes.append(get(*args)) or boxes[-1]
    exact, fast = zip(*(exact_and_fast(transform, data, seed) for seed, data in enumerate(photos)), strict=True)
    assert boxes[0::2] == boxes[1::2]  # the same box for each sample from exact and fast
    assert len(set(boxes)) == len(photos)  # ... and a different one per sample (seeds differ)
    batch = psnr_db(torch.stack(exact), torch.stack(fast))
    worst = min(psnr_db(e, f) for e, f in zip(exact, fast, strict=True))
    print(f"{name}: batch PSNR {batch:.1f} dB, worst sample {worst:.1f} dB")
    assert batch >= MIN_PSNR_DB + 5 and worst >= MIN_PSNR_DB


def _image_kinds():
    rng = np.random.default_rng(1)
    rgb = photo(rng, 600, 400)
    def save(image: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": ignored by both paths (webdataset's decoder ignores it)
    yield "jpeg with EXIF orientation", jpeg_bytes(rgb, exif=exif.tobytes())
    yield "grayscale jpeg", jpeg_bytes(rgb.convert("L"))
    yield "cmyk jpeg", jpeg_bytes(rgb.convert("CMYK"))
    yield "progressive jpeg", jpeg_bytes(rgb, progressive=True)
    yield "rgba png", save(rgb.convert("RGBA"), "PNG")
    yield "palette png", save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    yield "webp", save(rgb, "WEBP", quality=90)
    yield "small jpeg (upsampled)", jpeg_bytes(photo(rng, 50, 40))


@pytest.mark.parametrize("name", [n for n, _ in _image_kinds()])
def test_every_image_kind_decodes_fast_like_exact(name):
    data = dict(_image_kinds())[name]
    for size in (64, 224):
        exact, fast = exact_and_fast(open_clip.image_transform(size, is_train=True), data, seed=3)
        assert psnr_db(exact, fast) >= MIN_PSNR_DB, (name, size, psnr_db(exact, fast))


@pytest.mark.parametrize("decoder", ["simplejpeg", "pil"])
def test_fast_decodes_jpegs_at_the_smallest_dct_scale_covering_the_crop(photos, monkeypatch, decoder):
    import clip_train.data.fast as fast_module

    decoded = []  # (width, height) of each decode, in order
    if decoder == "simplejpeg":
        real = fast_module.simplejpeg
        assert real is not None, "simplejpeg is a dependency"

        class Recording:
            decode_jpeg_header = real.decode_jpeg_header

            @staticmethod
            def decode_jpeg(*args, **kwargs):
                pixels = real.decode_jpeg(*args, **kwargs)
                decoded.append((pixels.shape[1], pixels.shape[0]))
                return pixels

        monkeypatch.setattr(fast_module, "simplejpeg", Recording)
    else:  # no simplejpeg (a platform without its wheel): PIL's draft
        monkeypatch.setattr(fast_module, "simplejpeg", None)
        loads = {}  # id(image) -> its size when decoded (load() is called again on a loaded image)
        real_load = ImageFile.ImageFile.load  # decodes an opened file
        monkeypatch.setattr(ImageFile.ImageFile, "load",
                            lambda im: loads.setdefault(id(im), im.size) and real_load(im))
    fast, _ = fast_transform(split_normalize(open_clip.image_transform(64, is_train=True))[0])
    crop = fast.transforms[0].crop
    boxes = []
    crop.get_params = lambda *args, get=crop.get_params: boxes.append(get(*args)) or boxes[-1]
    sizes = [open_image(data).size for data in photos]
    opened = []
    for seed, data in enumerate(photos):
        seed_all(seed)
        opened.append(open_image(data))  # kept alive: ids stay unique
        fast(opened[-1])
    if decoder == "pil":
        decoded = list(loads.values())
    used = []
    for (w, h), (top, left, crop_h, crop_w), size in zip(sizes, boxes, decoded, strict=True):
        s = max(s for s in (1, 2, 4, 8) if crop_w / s >= 64 and crop_h / s >= 64)
        if decoder == "simplejpeg":
            # torch's resample starts at a whole pixel of the reduced image: a reduction is halved
            # until some lead of at most 32 outputs puts a whole pixel within 0.1 output pixel
            # of where the box starts, on both axes.
            def placed(start: int, extent: int, s: int = s) -> bool:
                step = extent / (s * 64)
                return any(abs(o - round(o)) <= 0.1 * step for o in (start / s - step * n for n in range(33)))
            while s > 1 and not (placed(top, crop_h) and placed(left, crop_w)):
                s //= 2
        assert size == (-(-w // s), -(-h // s))  # libjpeg's scaled size: ceil(w / s)
        used.append(s)
    assert min(used) >= 2 and 8 in used  # 375-1280 px photos for 64 px: every one reduced


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resample_from_a_reduced_image_places_the_fractional_box(mode):
    """torch's resample of a box that starts at a fraction of a reduced pixel (the lead outputs
    dropped, the image's edge repeated where the lead starts before it) against Pillow's resample
    from that fractional box, the geometry the reduced decode must keep; rounding the box to
    whole pixels instead (the placement `_axis` replaces) is far off."""
    from clip_train.data.fast import _axis, _resize

    rng = np.random.default_rng(2)
    reduced = photo(rng, 160, 120)  # an image reduced by 4 (full size 640 x 480)
    pixels = torch.from_numpy(np.array(reduced))
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[mode]
    placed, rounded = [], []
    for top, left, height, width, out in [(1, 3, 470, 610, 64), (13, 22, 440, 599, 96), (6, 0, 474, 629, 50),
                                          (7, 9, 301, 283, 64), (2, 27, 455, 511, 40)]:
        axes = _axis(top, top + height, 4, out), _axis(left, left + width, 4, out)
        assert None not in axes and max(a.lead for a in axes) > 0
        ours = _resize(pixels, axes, (out, out), mode)
        box = (left / 4, top / 4, (left + width) / 4, (top + height) / 4)
        reference = torch.from_numpy(np.asarray(reduced.resize((out, out), resample, box=box))).permute(2, 0, 1)
        whole = tuple(round(e) for e in box)
        naive = torch.from_numpy(np.asarray(reduced.resize((out, out), resample, box=whole))).permute(2, 0, 1)
        placed.append(((ours.double() - reference.double()) ** 2).mean().item())
        rounded.append(((naive.double() - reference.double()) ** 2).mean().item())
    placed_db, rounded_db = (10 * np.log10(255.0**2 / np.array(mse)) for mse in (placed, rounded))
    print(f"{mode}: placed {placed_db.round(1)} dB, rounded {rounded_db.round(1)} dB")
    # Each box within 38 dB (a shift of up to 0.1 output pixel remains), better than rounded,
    # and over the five boxes (mean squared error) at least 4 dB better.
    assert placed_db.min() >= 38 and (placed_db > rounded_db).all()
    assert 10 * np.log10(np.mean(rounded) / np.mean(placed)) >= 4


def test_resample_of_a_whole_box_is_torchs_interpolate_of_the_crop():
    """At 1/1 the box is whole pixels: the resample is F.interpolate of the cropped pixels, height
    then width, bit for bit; within rounding of F.interpolate in one call (width first); and
    channels-last whatever the crop (a full-width crop's view once came back NCHW)."""
    from clip_train.data.fast import _axis, _resize

    interpolate = torch.nn.functional.interpolate
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (300, 360, 3), dtype=torch.uint8, generator=generator)
    for top, left, height, width, out, mode in [(0, 0, 300, 360, 224, "bicubic"), (7, 31, 211, 287, 64, "bicubic"),
                                                (13, 2, 150, 97, 96, "bilinear"), (40, 50, 33, 45, 64, "bicubic"),
                                                (20, 0, 250, 360, 224, "bicubic"), (0, 100, 64, 200, 64, "bilinear")]:
        ours = _resize(pixels, (_axis(top, top + height, 1, out), _axis(left, left + width, 1, out)), (out, out), mode)
        crop = pixels[top:top + height, left:left + width].permute(2, 0, 1)[None]
        rows = interpolate(crop, size=(out, width), mode=mode, antialias=True)
        assert torch.equal(ours, interpolate(rows, size=(out, out), mode=mode, antialias=True)[0]), (top, left, mode)
        one_call = interpolate(crop, size=(out, out), mode=mode, antialias=True)[0]
        assert (ours.int() - one_call.int()).abs().float().mean() < 0.5 and psnr_db(ours, one_call) > 40
        assert ours.shape == (3, out, out) and ours.permute(1, 2, 0).is_contiguous(), (top, left, ours.stride())


def test_simplejpeg_decodes_close_to_pil_and_leaves_damaged_jpegs_to_pil(photos):
    """simplejpeg's pixels, with libjpeg-turbo's fast IDCT and chroma upsampling, are within
    35 dB PSNR of PIL's accurate decode (full and reduced, RGB and grayscale; measured 38-40 dB
    at full size, 48 at 1/2, equal at 1/4 on web-size photos); a JPEG it rejects goes to PIL,
    which decodes or refuses it as the exact path does."""
    from clip_train.data.fast import JpegHeader, _decode_jpeg

    gray = jpeg_bytes(Image.open(io.BytesIO(photos[0])).convert("L"))
    for data in (photos[0], photos[-1], gray):
        for scale in (1, 2, 4):
            ours = _decode_jpeg(open_image(data), scale)
            reference = Image.open(io.BytesIO(data))
            if scale > 1:
                reference.draft(None, (reference.size[0] // scale, reference.size[1] // scale))
            reference = torch.from_numpy(np.asarray(reference.convert("RGB")))
            assert ours.shape == reference.shape and psnr_db(ours, reference) >= 35, (scale, psnr_db(ours, reference))
    # Bytes after the end-of-image marker: libjpeg warns (simplejpeg refuses), PIL decodes it.
    trailing = photos[0][:-2] + b"\x00" * 16 + photos[0][-2:]
    assert _decode_jpeg(open_image(trailing), 1) is None
    fast, _ = fast_transform(split_normalize(open_clip.image_transform(64, is_train=True))[0])
    seed_all(0)
    assert fast(open_image(trailing)).shape == (3, 64, 64)
    cmyk = open_image(jpeg_bytes(Image.open(io.BytesIO(photos[0])).convert("CMYK")))
    assert isinstance(open_image(photos[0]), JpegHeader) and isinstance(open_image(gray), JpegHeader)
    assert isinstance(cmyk, Image.Image) and cmyk.mode == "CMYK"  # CMYK: PIL's
    with pytest.raises(PIL.UnidentifiedImageError):  # a header simplejpeg cannot read: PIL's, which refuses it
        open_image(photos[0][:2] + b"\x00" * 64)


@pytest.mark.parametrize("scale, ratio", [((0.9, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3)),
                                          ((0.5, 0.6), (0.2, 5.0)), ((1.0, 1.0), (1.0, 1.0))])
@pytest.mark.parametrize("exp_margin", [1e-6, 0.5])
def test_crop_params_are_torchvisions_draw_for_draw(scale, ratio, exp_margin, monkeypatch):
    """`random_resized_crop_params` against torchvision's get_params: the same box and the same
    generator state after it, over sizes that succeed at the first attempt, after several, or
    never (the central crop), including tiny and extreme-aspect images. With a margin of 0.5 every
    aspect ratio is taken from torch's exp (the path of sides that math.exp leaves in doubt)."""
    import clip_train.data.fast as fast_module
    from clip_train.data.fast import random_resized_crop_params

    monkeypatch.setattr(fast_module, "_EXP_MARGIN", exp_margin)

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 1400, size=(100, 2))] + [(512, 256), (300, 1200), (1, 1)]
    attempts = set()
    for seed, (height, width) in enumerate(sizes * 2):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width), scale, ratio)
        after = torch.random.get_rng_state()
        torch.manual_seed(seed)
        assert random_resized_crop_params(height, width, scale, ratio) == expected, (height, width, seed)
        assert torch.equal(torch.random.get_rng_state(), after), (height, width, seed)
        if scale != (0.9, 1.0):
            continue
        for words in range(1, 23):  # how many generator words the draw took
            torch.manual_seed(seed)
            torch.empty(words).uniform_()
            if torch.equal(torch.random.get_rng_state(), after):
                break
        attempts.add(words)
    if scale == (0.9, 1.0):  # a success at the first and at the tenth attempt, and central crops
        assert {4, 20, 22} <= attempts, attempts


def test_fallback_to_exact_says_why_once(color_shards, caplog):
    odd = T.Compose([T.Grayscale(3), T.RandomResizedCrop(32), T.PILToTensor()])
    assert fast_transform(odd) == (None, "its step Grayscale reads the pixels before the RandomResizedCrop")
    assert fast_transform(open_clip.image_transform(32, is_train=False))[0] is None  # no crop
    with caplog.at_level(logging.INFO, logger="clip_train.data"):
        L = build_train_loader(DataConfig(train=color_shards, workers=0), transform=to_tensor,
                               tokenizer=id_tokenizer, local_batch_size=4, seed=0, rank=0, world_size=1)
    lines = [r.getMessage() for r in caplog.records if "data.decode=fast" in r.getMessage()]
    assert lines == ["data.decode=fast: the train transform (function) is not a torchvision Compose, "
                     "so images are decoded exactly (data.decode=exact)"]
    assert L._spec.transform is to_tensor


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory, photos) -> str:
    folder = tmp_path_factory.mktemp("photo_shards")
    for s in range(2):
        with wds.TarWriter(str(folder / f"p-{s:06d}.tar")) as sink:
            for i in range(4):
                n = 4 * s + i
                sink.write({"__key__": f"{n:06d}", "jpg": photos[n], "txt": str(n)})
    return str(folder / "p-{000000..000001}.tar")


def _loader(shards: str, decode: str, state: dict | None = None, workers: int = 0):
    cfg = DataConfig(train=shards, train_num_samples=8, workers=workers, shuffle_buffer=0,
                     resampled=False, decode=decode)
    return build_train_loader(cfg, transform=open_clip.image_transform(64, is_train=True),
                              tokenizer=id_tokenizer, local_batch_size=2, seed=5, rank=0,
                              world_size=1, state=state)


def test_loader_batches_exact_bit_for_bit_fast_close_and_resumable(photo_shards, photos):
    exact_loader, fast_loader = _loader(photo_shards, "exact"), _loader(photo_shards, "fast", workers=1)
    assert isinstance(fast_loader._spec.transform, FastCompose)
    exact = list(islice(exact_loader, 4))
    fast = list(islice(fast_loader, 4))
    # exact: the full decode + the split open_clip transform, seeded from each sample's position
    # (epoch 0, pass 0, shard k of this worker's sequence, sample i), computed here independently.
    split, _ = split_normalize(open_clip.image_transform(64, is_train=True))
    urls = [photo_shards.replace("{000000..000001}", f"{s:06d}") for s in range(2)]
    order = epoch_shard_order(urls, 5, 0)
    reference = {}
    for k, url in enumerate(order):
        for i in range(4):
            n = int(url[-10:-4]) * 4 + i
            seed_all(make_seed(5, 0, 0, 0, 0, k, i))
            reference[n] = split(PILRGB("x.jpg", photos[n]))
    for (images, texts), (fast_images, fast_texts) in zip(exact, fast, strict=True):
        assert torch.equal(texts, fast_texts)  # same samples in the same order
        assert torch.equal(images, torch.stack([reference[int(t)] for t in texts[:, 0]]))
        assert psnr_db(images, fast_images) >= MIN_PSNR_DB
    # fast resumes exactly: batches 3 and 4 again from the state after batch 2
    first = _loader(photo_shards, "fast")
    list(islice(first, 2))
    resumed = list(islice(_loader(photo_shards, "fast", state=first.state_dict()), 2))
    for (a, ta), (b, tb) in zip(fast[2:], resumed, strict=True):
        assert torch.equal(ta, tb) and torch.equal(a, b)


def test_batches_stack_channels_last_and_arrive_contiguous():
    from clip_train.data import batch_to_device
    from clip_train.data.decode import stack_images

    hwc = [torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8) for _ in range(4)]
    images = [x.permute(2, 0, 1) for x in hwc]  # what pil_to_tensor and the fast resample give
    batch = stack_images(images)
    assert torch.equal(batch, torch.stack(images)) and batch.is_contiguous(memory_format=torch.channels_last)
    moved, _ = batch_to_device(batch, torch.zeros(4, 2, dtype=torch.long), torch.device("cpu"), None)
    assert moved.is_contiguous() and torch.equal(moved, torch.stack(images))
    contiguous = [x.contiguous() for x in images]  # e.g. a float transform's output: plain stack
    assert stack_images(contiguous).is_contiguous()


def test_a_truncated_jpeg_fails_in_fast_as_in_exact():
    data = jpeg_bytes(photo(np.random.default_rng(2), 640, 480))[:20000]  # cut in the scan data
    fast, _ = fast_transform(split_normalize(open_clip.image_transform(64, is_train=True))[0])
    with pytest.raises(OSError, match="truncated"):
        PILRGB("x.jpg", data)
    with pytest.raises(OSError, match="truncated"):  # -> counted as corrupt_image by the loader
        fast(open_image(data))


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, photos) -> str:
    """Photos with unusable samples among them -- a JPEG cut in its scan data (fails when
    decoded), bytes that are no image (fail when opened) -- and images PIL decodes: a PNG and a
    grayscale JPEG."""
    rng = np.random.default_rng(3)
    cut = jpeg_bytes(photo(rng, 640, 480))[:20000]
    gray = jpeg_bytes(photo(rng, 300, 200).convert("L"))
    png = io.BytesIO()
    photo(rng, 200, 260).save(png, format="PNG")
    items = [photos[0], cut, photos[5], b"\xff\xd8 no image", ("png", png.getvalue()), photos[6], gray,
             photos[1], b"no image at all", photos[7], photos[2], photos[3]]
    folder = tmp_path_factory.mktemp("mixed_shards")
    with wds.TarWriter(str(folder / "m-000000.tar")) as sink:
        for n, item in enumerate(items):
            ext, data = item if isinstance(item, tuple) else ("jpg", item)
            sink.write({"__key__": f"{n:06d}", ext: data, "txt": str(n)})
    return str(folder / "m-000000.tar")


JITTER = {"color_jitter_prob": 0.8, "color_jitter": (0.4, 0.4, 0.4, 0.1), "gray_scale_prob": 0.3}


@pytest.mark.parametrize("workers,aug", [(0, None), (1, None), (0, JITTER), (1, JITTER)])
def test_two_passes_give_the_batches_states_and_counts_of_one_sample_at_a_time(mixed_shards, monkeypatch, workers, aug):
    """A fast worker draws the crops of a batch's samples first, then decodes and resamples them
    (`_Decoder`): the same batches, worker states and bad-sample counts as one sample at a time,
    with samples failing in either pass; with colour jitter and grayscale after the crop (they
    draw from Python's and torch's RNGs) too, from the states each sample's draw left."""
    events = []
    draw, render = FastCompose.draw, FastCompose.render
    monkeypatch.setattr(FastCompose, "draw", lambda self, image: events.append("draw") or draw(self, image))
    monkeypatch.setattr(FastCompose, "render", lambda self, image, crop: events.append("render") or render(self, image, crop))

    def loader_of(transform=None, **kwargs):
        transform = transform or open_clip.image_transform(48, is_train=True, aug_cfg=aug)
        cfg = DataConfig(train=mixed_shards, train_num_samples=12, workers=workers, shuffle_buffer=4, resampled=False)
        return build_train_loader(cfg, transform=transform, tokenizer=id_tokenizer, local_batch_size=3, seed=1,
                                  rank=0, world_size=1, **kwargs)

    def run(one_at_a_time: bool, batches: int = 5):
        loader = loader_of()
        assert loader._spec.transform.draws_after_crop == (aug is not None)
        if one_at_a_time:  # as a transform whose steps also seed numpy (timm's) is taken
            loader._spec.transform.draws_after_crop = loader._spec.transform.seeds_numpy = True
        events.clear()
        got = list(islice(loader, batches))
        return got, loader.state_dict(), loader.bad_counts(), list(events)

    two, two_state, two_bad, two_events = run(False)
    one, one_state, one_bad, one_events = run(True)
    for (a, ta), (b, tb) in zip(two, one, strict=True):
        assert torch.equal(ta, tb) and torch.equal(a, b)
    assert [len(texts) for _, texts in two] == [3] * 5  # each batch ends at its third usable sample
    assert two_state == one_state and two_bad == one_bad
    assert two_bad["corrupt_image"] >= 3  # a pass and a half over 12 samples, 3 of them unusable
    if workers == 0:  # the calls are seen in this process: a batch's draws before its renders
        assert one_events == ["draw", "render"] * (len(one_events) // 2)
        assert "draw, draw, draw, render, render, render" in ", ".join(two_events)
    if aug is not None:  # the jitter changed the images: the RNG states it drew from mattered
        plain = list(islice(loader_of(open_clip.image_transform(48, is_train=True)), 5))
        assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(two, plain, strict=True))
        if workers == 0:  # timm's transforms seed numpy before the crop: one sample at a time
            events.clear()
            timm_like = Compose([SeedNumpyFromTorch(), *open_clip.image_transform(48, is_train=True, aug_cfg=aug).transforms])
            next(iter(loader_of(timm_like)))
            assert events and events == ["draw", "render"] * (len(events) // 2)
    # Resuming from a state written by the two passes continues as one at a time would.
    first, state, _, _ = run(False, batches=2)
    resumed = loader_of(state=state)
    for (a, ta), (b, tb) in zip(islice(resumed, 3), one[2:], strict=True):
        assert torch.equal(ta, tb) and torch.equal(a, b)
