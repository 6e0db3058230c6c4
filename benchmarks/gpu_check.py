"""One-shot GPU check: correctness under bf16/fp16 on the device, then speed, then open_clip's trainer.

    python benchmarks/gpu_check.py               # one GPU, ViT-B-32 at 224 px, bf16 (budget < 8 min)
    python benchmarks/gpu_check.py --cpu-smoke   # the same code on the CPU: tiny model, seconds

Prints one table and writes JSON (`benchmarks/results/gpu_check.json`, `--output`). A check that
fails (an exception, out of memory) is reported as failed and the others still run.

(a) Correctness, on the device, with clip_train's own functions (`model.build_model`,
    `grad_cache.train_step`, `loss.contrastive_loss`) and a real `accelerate.Accelerator` per
    precision:
    - uint8 batches copied from pinned memory and normalised on the device (`batch_to_device`)
      against the float32 transform on the CPU (within 1e-6; expected identical), and, under
      `torch.cuda.set_sync_debug_mode("error")`, without a host sync;
    - one step's gradients, chunked (chunk = batch / 4) and unchunked, under fp32, bf16 and fp16,
      against the fp32 unchunked step of the same weights and batch (TF32 off for fp32):
      relative difference ||g - g_ref|| / ||g_ref|| over every parameter. fp32 chunked must be
      within 1e-5; under bf16/fp16 chunking must add no error of its own: the chunked step's
      difference at most 1.5x the unchunked step's (+1e-5). fp16 unscales through the real
      GradScaler (scale halved until the gradients are finite, as in training);
    - the tiled vs the plain CLIP loss on the device, random and well-aligned embeddings at logit
      scale 100, each against an independent float64 reference (loss and gradients, relative;
      tolerance 1e-4).
(b) Speed: bf16, one process, the whole optimizer step as `train.py` runs it (batch_to_device,
    train_step, clip_grad_norm_, AdamW step): synthetic uint8 images held in pinned memory with
    `train.chunk_size` = batch / 1, / 2, / 4, then real shards (tiny synthetic JPEGs written by
    `clip_train.data.make_shards`, the function behind `clip-train make-shards`) through
    `build_train_loader`. Samples/s, step time, peak memory (`torch.cuda.max_memory_allocated`)
    and model FLOPs utilisation: the FLOPs of one unchunked step (forward + backward), counted by
    `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention), over the step
    time and the GPU's dense bf16 peak from the table below by device name (`--peak-tflops` for
    others). The chunked step re-runs the forward; MFU counts model FLOPs only, so the extra
    forward shows as lower MFU.
(c) The same setting through both whole trainers on the same shards, launched and timed by the
    benchmark harness (`harness.run_trainer`: clip_train's `train` and `open_clip_train.main`,
    patched in the benchmark process only, see trainer_entry.py): samples/s and their ratio.

Not yet run on a GPU (none was available when this was written): every GPU figure in the README
is marked so until this script has run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. Matched in
# order against torch.cuda.get_device_name(): the first key contained in the name wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # GH200 too
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model on the CPU, few steps: checks the script itself in seconds")
    parser.add_argument("--model", default=None, help="default ViT-B-32 (tiny-vit.json with --cpu-smoke)")
    parser.add_argument("--batch", type=int, default=None,
                        help="local batch of the speed part (default 512; 8 with --cpu-smoke)")
    parser.add_argument("--check-batch", type=int, default=None,
                        help="batch of the gradient checks (default 128; 8 with --cpu-smoke)")
    parser.add_argument("--loss-batch", type=int, default=None,
                        help="rows of the loss check (default 8192; 64 with --cpu-smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per speed row (default 10)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="data workers (default min(8, cpus - 1))")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, when it is not in PEAK_BF16_TFLOPS")
    parser.add_argument("--skip-trainers", action="store_true", help="leave out part (c)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu_check[_cpu_smoke].json)")
    return parser.parse_args(argv)


class Setting:
    """Everything the parts share: device, model name, sizes."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.smoke = args.cpu_smoke
        if not self.smoke and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device; run with --cpu-smoke on a CPU-only machine")
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.device_name = "cpu" if self.smoke else torch.cuda.get_device_name(self.device)
        self.model = args.model or (str(h.REPO / "configs/models/tiny-vit.json") if self.smoke else "ViT-B-32")
        self.batch = args.batch or (8 if self.smoke else 512)
        self.check_batch = args.check_batch or (8 if self.smoke else 128)
        self.loss_batch = args.loss_batch or (64 if self.smoke else 8192)
        self.steps = args.steps or (2 if self.smoke else 10)
        self.warmup = args.warmup_steps if args.warmup_steps is not None else (1 if self.smoke else 3)
        self.workers = args.workers if args.workers is not None else (
            0 if self.smoke else max(1, min(8, (os.cpu_count() or 2) - 1)))
        self.peak = args.peak_tflops or (None if self.smoke else peak_tflops(self.device_name))
        # bf16 everywhere on the GPU; fp32 for the CPU smoke's speed part (bf16 on CPUs is slow).
        self.speed_precision = "no" if self.smoke else "bf16"


# ------------------------------------------------------------------------------------------------
# Shared pieces


def fresh_accelerator(precision: str, cpu: bool):
    """A new Accelerator with its own mixed precision. accelerate keeps one process-wide state;
    its own test-suite resets it the same way between configurations."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=precision)


def base_model(setting: Setting):
    import torch

    from clip_train.config import ModelConfig
    from clip_train.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(name=setting.model))


def synthetic_batch(clip, batch: int, seed: int = 0):
    """uint8 images and token ids, as the loader ships them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    texts = torch.randint(1, clip.vocab_size, (batch, clip.context_length), generator=g)
    return images, texts


def image_normalization(bundle):
    from clip_train.data import split_normalize

    return split_normalize(bundle.train_transform)[1]


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's, KiB


def run_check(results: list[dict], part: str, name: str, fn) -> dict:
    """Run one check; an exception is recorded as a failed row, the run goes on."""
    started = time.perf_counter()
    try:
        row = fn()
    except Exception as exn:  # noqa: BLE001 - any failure of one check is that check's result
        row = _failure(exn)
    row = {"part": part, "check": name, **row, "seconds": time.perf_counter() - started}
    results.append(row)
    print(f"[{part}] {name}: {row['status']} {row['value']}", flush=True)
    return row


def guarded(results: list[dict], part: str, name: str, fn, *args):
    """fn(*args), or None with a failed row when a whole section cannot run (e.g. out of memory
    building its model); the checks inside a section record their own failures."""
    try:
        return fn(*args)
    except Exception as exn:  # noqa: BLE001 - reported in the table, the next section still runs
        row = {"part": part, "check": name, **_failure(exn), "seconds": 0.0}
        results.append(row)
        print(f"[{part}] {name}: {row['status']} {row['value']}", flush=True)
        return None


def _failure(exn: BaseException) -> dict:
    return {"status": "FAILED", "value": f"{type(exn).__name__}: {str(exn)[:300]}",
            "traceback": traceback.format_exc()[-3000:]}


# ------------------------------------------------------------------------------------------------
# (a) correctness


def _flat_grads(model) -> torch.Tensor:
    import torch

    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                      for p in model.parameters() if p.requires_grad])


def step_gradients(setting: Setting, clip, images, texts, norm, precision: str, chunk: int | None):
    """Flat unscaled gradients of one train_step under `precision` ("no", "bf16", "fp16")."""
    import torch

    from clip_train.data import batch_to_device
    from clip_train.grad_cache import train_step
    from clip_train.loss import contrastive_loss
    from clip_train.model import DualEncoder

    accelerator = fresh_accelerator(precision, cpu=setting.device.type == "cpu")
    model = DualEncoder(copy.deepcopy(clip))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # registered for GradScaler.unscale_
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    images, texts = batch_to_device(images, texts, accelerator.device, norm)
    loss_fn = functools.partial(contrastive_loss, kind="clip", impl="plain")
    scaler = getattr(accelerator, "scaler", None)
    for _ in range(24):  # GradScaler's own search: halve the scale while gradients overflow
        optimizer.zero_grad(set_to_none=True)
        out = train_step(model, images, texts, loss_fn=loss_fn, chunk_size=chunk, accelerator=accelerator)
        accelerator.clip_grad_norm_(model.parameters(), math.inf)  # unscales under fp16
        grads = _flat_grads(model)
        if scaler is None or bool(torch.isfinite(grads).all()):
            break
        scaler.update()
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    return grads, float(out.loss), scale


def gradient_checks(setting: Setting, results: list[dict]) -> None:
    import torch

    bundle = base_model(setting)
    clip, norm = bundle.model, image_normalization(bundle)
    images, texts = synthetic_batch(clip, setting.check_batch)
    chunk = max(1, setting.check_batch // 4)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
    ref, ref_loss, _ = step_gradients(setting, clip, images, texts, norm, "no", None)

    def rel(g: torch.Tensor) -> float:
        return float((g - ref).norm() / ref.norm())

    for label, precision in (("fp32", "no"), ("bf16", "bf16"), ("fp16", "fp16")):
        def check(precision=precision) -> dict:
            full, full_loss, _ = step_gradients(setting, clip, images, texts, norm, precision, None)
            chunked, chunked_loss, scale = step_gradients(setting, clip, images, texts, norm, precision, chunk)
            e_full, e_chunk = rel(full), rel(chunked)
            bound = 1e-5 if precision == "no" else 1.5 * e_full + 1e-5
            ok = math.isfinite(e_chunk) and e_chunk <= bound
            return {
                "status": "ok" if ok else "FAILED",
                "value": f"rel. grad diff vs fp32 unchunked: chunk {chunk} {e_chunk:.2e}, unchunked {e_full:.2e}",
                "tolerance": f"chunked <= {bound:.2e}" + ("" if precision == "no" else " (1.5x unchunked + 1e-5)"),
                "rel_grad_diff_chunked": e_chunk, "rel_grad_diff_unchunked": e_full,
                "loss_chunked": chunked_loss, "loss_unchunked": full_loss, "loss_fp32": ref_loss,
                "grad_scale": scale, "batch": setting.check_batch, "chunk": chunk,
            }

        if precision == "fp16" and setting.device.type == "cpu":
            label += " (on the CPU accelerate runs fp32 without GradScaler)"
        run_check(results, "a", f"train_step {label}, chunked vs fp32 unchunked", check)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def uint8_input_check(setting: Setting, results: list[dict]) -> None:
    """uint8 batches normalised on the device vs the float32 transform on the CPU (the old path);
    on CUDA also: the pinned copy + normalisation runs without a host sync."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    from clip_train.data import batch_to_device, split_normalize

    def check() -> dict:
        bundle = base_model(setting)
        transform = bundle.train_transform
        uint8_transform, norm = split_normalize(transform)
        if norm is None:
            raise RuntimeError(f"the train transform of {setting.model} was not split: {transform}")
        rng = np.random.default_rng(2)
        floats, uint8s = [], []
        for i in range(8):
            image = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
            for out, fn in ((floats, transform), (uint8s, uint8_transform)):
                random.seed(i), torch.manual_seed(i)  # the loader seeds every sample this way
                out.append(fn(image))
        images = torch.stack(uint8s)
        if setting.device.type == "cuda":
            images = images.pin_memory()
        texts = torch.zeros(len(uint8s), 4, dtype=torch.long)
        moved, _ = batch_to_device(images, texts, setting.device, norm)  # caches the constants
        diff = float((moved.cpu() - torch.stack(floats)).abs().max())
        sync_free = "not checked (CPU)"
        if setting.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # raises on any host sync
            try:
                batch_to_device(images, texts, setting.device, norm)
                sync_free = "no host sync"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return {"status": "ok" if diff <= 1e-6 else "FAILED",
                "value": f"max abs diff {diff:.1e} ({images.dtype} batch, {sync_free})",
                "tolerance": "<= 1e-6 (expected 0: the same float32 operations)", "max_abs_diff": diff}

    run_check(results, "a", "uint8 batch normalised on the device vs float32 transform on the CPU", check)


def _reference_clip_loss(img_BD, txt_BD, scale):
    """Symmetric InfoNCE in float64, written out independently of clip_train.loss."""
    import torch
    import torch.nn.functional as F

    x, y = F.normalize(img_BD.double(), dim=-1), F.normalize(txt_BD.double(), dim=-1)
    logits = scale.double() * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def loss_checks(setting: Setting, results: list[dict]) -> None:
    import torch

    from clip_train.loss import contrastive_loss

    b, d, scale = setting.loss_batch, 512, 100.0
    tile = max(1, b // 4)  # four row tiles, so the tiled path really tiles
    g = torch.Generator(device="cpu").manual_seed(1)
    random_img = torch.randn(b, d, generator=g)
    random_txt = torch.randn(b, d, generator=g)
    # Well-aligned (late training): each positive logit ~3 above the log-sum-exp of the row's
    # negatives (random directions: logits ~ N(0, scale^2 / d)), so each row's loss is ~0.05.
    cosine = min(0.95, (math.log(b - 1) + scale**2 / (2 * d) + 3.0) / scale)
    aligned_txt = random_img + math.sqrt(1 / cosine**2 - 1) * torch.randn(b, d, generator=g)
    for label, (img, txt) in (("random", (random_img, random_txt)), ("well-aligned", (random_img, aligned_txt))):

        def check(img=img, txt=txt) -> dict:
            def run(fn):
                x = img.to(setting.device, copy=True).requires_grad_(True)
                y = txt.to(setting.device, copy=True).requires_grad_(True)
                s = torch.tensor(math.log(scale), device=setting.device, requires_grad=True)
                loss = fn(x, y, s)
                loss.backward()
                return loss.detach().double(), [t.grad.double() for t in (x, y, s)]

            ref_loss, ref_grads = run(lambda x, y, s: _reference_clip_loss(x, y, s.exp()))
            errors = {}
            for impl in ("plain", "tiled"):
                loss, grads = run(lambda x, y, s, impl=impl: contrastive_loss(x, y, s, impl=impl, tile_size=tile))
                errors[impl] = {
                    "loss": float((loss - ref_loss).abs() / ref_loss.abs()),
                    "grad": max(float((a - r).norm() / r.norm()) for a, r in zip(grads, ref_grads, strict=True)),
                }
            worst = max(max(e.values()) for e in errors.values())
            return {
                "status": "ok" if worst <= 1e-4 else "FAILED",
                "value": (f"rel. diff vs float64: tiled loss {errors['tiled']['loss']:.1e} grad "
                          f"{errors['tiled']['grad']:.1e}; plain loss {errors['plain']['loss']:.1e} "
                          f"grad {errors['plain']['grad']:.1e} (loss {float(ref_loss):.4g})"),
                "tolerance": "<= 1e-4 relative",
                "errors": errors, "reference_loss": float(ref_loss), "rows": b, "tile_size": tile,
            }

        run_check(results, "a", f"tiled vs plain CLIP loss, {label}, scale {scale:g}, B={b}", check)


# ------------------------------------------------------------------------------------------------
# (b) speed


class StepRunner:
    """The optimizer step as train.py runs it, for timing."""

    def __init__(self, setting: Setting):
        import torch

        from clip_train.config import OptimConfig
        from clip_train.loss import contrastive_loss
        from clip_train.model import DualEncoder
        from clip_train.optim import build_optimizer

        self.setting = setting
        self.accelerator = fresh_accelerator(setting.speed_precision, cpu=setting.device.type == "cpu")
        self.bundle = base_model(setting)
        self.norm = image_normalization(self.bundle)
        optimizer = build_optimizer(self.bundle.model, OptimConfig())
        self.model, self.optimizer = self.accelerator.prepare(DualEncoder(self.bundle.model), optimizer)
        self.model.train()
        self.loss_fn = functools.partial(contrastive_loss, kind="clip")
        images, texts = synthetic_batch(self.bundle.model, setting.batch)
        pin = setting.device.type == "cuda"
        self.images = images.pin_memory() if pin else images
        self.texts = texts.pin_memory() if pin else texts
        torch.manual_seed(0)

    def step(self, images, texts, chunk: int | None) -> None:
        from clip_train.data import batch_to_device
        from clip_train.grad_cache import train_step

        images, texts = batch_to_device(images, texts, self.accelerator.device, self.norm)
        train_step(self.model, images, texts, loss_fn=self.loss_fn, chunk_size=chunk,
                   accelerator=self.accelerator)
        self.accelerator.clip_grad_norm_(self.model.parameters(), math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def model_flops(self) -> float:
        """FLOPs of one unchunked forward + backward at this batch (FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        from clip_train.data import batch_to_device
        from clip_train.grad_cache import train_step

        images, texts = batch_to_device(self.images, self.texts, self.accelerator.device, self.norm)
        counter = FlopCounterMode(display=False)
        with counter:
            train_step(self.model, images, texts, loss_fn=self.loss_fn, chunk_size=None,
                       accelerator=self.accelerator)
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def _speed_row(setting: Setting, step_s: float, flops: float | None, peak: float, **extra) -> dict:
    samples = setting.batch / step_s
    mfu = flops / step_s / (setting.peak * 1e12) if flops and setting.peak else None
    memory = "peak CUDA" if setting.device.type == "cuda" else "peak RSS (process)"
    return {
        "status": "ok",
        "value": (f"{samples:,.0f} samples/s, {step_s * 1e3:.1f} ms/step, "
                  f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, {memory} {peak:.2f} GiB"),
        "samples_per_s": samples, "step_s": step_s, "mfu": mfu, "peak_gib": peak,
        "model_tflops_per_step": None if flops is None else flops / 1e12, **extra,
    }


def speed_synthetic(setting: Setting, runner: StepRunner, flops: float | None, results: list[dict]) -> None:
    b = setting.batch
    for divisor in (1, 2, 4):
        chunk = max(1, b // divisor)

        def check(chunk=chunk) -> dict:
            for _ in range(setting.warmup):
                runner.step(runner.images, runner.texts, chunk)
            sync(setting.device)
            reset_peak(setting.device)
            started = time.perf_counter()
            for _ in range(setting.steps):
                runner.step(runner.images, runner.texts, chunk)
            sync(setting.device)
            step_s = (time.perf_counter() - started) / setting.steps
            return _speed_row(setting, step_s, flops, peak_gib(setting.device), batch=b, chunk=chunk)

        name = f"synthetic uint8, batch {b}, chunk {chunk} (batch/{divisor})"
        run_check(results, "b", name, check)


def write_jpeg_shards(folder: Path, count: int, size: int) -> str:
    """`count` small JPEGs with captions, then make_shards (what `clip-train make-shards` runs)."""
    import numpy as np
    from PIL import Image

    from clip_train.data import make_shards

    source = folder / "images"
    source.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 256, 3)
        ramp = np.linspace(0, 60, size)[None, :, None]
        pixels = np.clip(base + ramp + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        (source / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (source / f"{i:06d}.txt").write_text(f"a photo of colour {base.tolist()} number {i}")
    per_shard = max(1, count // 8)
    return make_shards(str(source), str(folder / "shards"), samples_per_shard=per_shard,
                       progress=False)["pattern"]


def speed_shards(setting: Setting, runner: StepRunner, flops: float | None, pattern: str,
                 results: list[dict]) -> None:
    from clip_train.config import DataConfig
    from clip_train.data import build_train_loader

    def check() -> dict:
        cfg = DataConfig(train=pattern, workers=setting.workers, resampled=True,
                         shuffle_buffer=min(1000, 4 * setting.batch))
        loader = build_train_loader(cfg, transform=runner.bundle.train_transform,
                                    tokenizer=runner.bundle.tokenizer, local_batch_size=setting.batch,
                                    seed=0, rank=0, world_size=1, pin_memory=setting.device.type == "cuda")
        batches = iter(loader)
        for _ in range(setting.warmup):
            images, texts = next(batches)
            runner.step(images, texts, None)
        sync(setting.device)
        reset_peak(setting.device)
        waited, started = 0.0, time.perf_counter()
        for _ in range(setting.steps):
            t0 = time.perf_counter()
            images, texts = next(batches)
            waited += time.perf_counter() - t0
            runner.step(images, texts, None)
        sync(setting.device)
        elapsed = time.perf_counter() - started
        row = _speed_row(setting, elapsed / setting.steps, flops, peak_gib(setting.device),
                         batch=setting.batch, chunk=None, workers=setting.workers,
                         batch_dtype=str(images.dtype), data_wait_fraction=waited / elapsed)
        row["value"] += f", data wait {waited / elapsed:.0%}, {setting.workers} workers, {images.dtype}"
        return row

    run_check(results, "b", f"make-shards JPEG shards, batch {setting.batch}, unchunked", check)


# ------------------------------------------------------------------------------------------------
# (c) both trainers


def trainer_checks(setting: Setting, pattern: str, workdir: Path, results: list[dict]) -> None:
    steps, warmup = (5, 2) if setting.smoke else (25, 5)
    runs: dict[str, h.RunResult] = {}
    for trainer in ("clip_train", "open_clip"):

        def check(trainer=trainer) -> dict:
            spec = h.RunSpec(trainer=trainer, model=setting.model, train_data=pattern, nproc=1,
                             global_batch=setting.batch, steps=steps, warmup_steps=2,
                             workers=max(1, setting.workers), precision="fp32" if setting.smoke else "bf16",
                             cuda=not setting.smoke, threads=1 if setting.smoke else None)
            result = h.run_trainer(spec, workdir / "trainers", warmup, timeout_s=900)
            runs[trainer] = result
            peak = max(result.peak_cuda_gib or result.peak_rss_gib)
            ratio = ""
            if trainer == "open_clip" and "clip_train" in runs:
                ratio = f", clip_train / open_clip {runs['clip_train'].samples_per_s / result.samples_per_s:.2f}x"
            wait = result.data_wait_fraction
            return {"status": "ok",
                    "value": f"{result.samples_per_s:,.0f} samples/s, peak {peak:.2f} GiB, "
                             f"data wait {'–' if wait != wait else f'{wait:.0%}'}{ratio}",
                    "samples_per_s": result.samples_per_s, "peak_gib": peak, "steps": steps,
                    "untimed_steps": warmup, "data_wait_fraction": result.data_wait_fraction}

        run_check(results, "c", f"whole trainer: {trainer}, batch {setting.batch}, same shards", check)


# ------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    rows = [[r["part"], r["check"], r["value"], r.get("tolerance", ""), r["status"]] for r in results]
    return h.markdown_table(["part", "check", "result", "tolerance", "status"], rows, "lllll")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    if args.cpu_smoke:
        torch.set_num_threads(1)
    setting = Setting(args)
    started = time.perf_counter()
    results: list[dict] = []
    flops: float | None = None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        guarded(results, "a", "uint8 input check", uint8_input_check, setting, results)
        guarded(results, "a", "gradient checks", gradient_checks, setting, results)
        guarded(results, "a", "loss checks", loss_checks, setting, results)
        release_memory()
        runner = guarded(results, "b", "model and optimizer for the speed part", StepRunner, setting)
        if runner is not None:
            try:
                flops = runner.model_flops()
            except Exception as exn:  # noqa: BLE001 - MFU is then not reported
                print(f"FLOP count failed: {exn!r}", flush=True)
            speed_synthetic(setting, runner, flops, results)
        size = 40 if setting.smoke else 256
        count = 8 * setting.batch if setting.smoke else 4096
        pattern_row: dict = {}

        def shards() -> dict:
            pattern_row["pattern"] = write_jpeg_shards(workdir / "data", count, size)
            return {"status": "ok", "value": f"{count} JPEGs of {size} px in 8 shards"}

        run_check(results, "b", "make-shards from synthetic JPEGs", shards)
        if runner is not None and "pattern" in pattern_row:
            speed_shards(setting, runner, flops, pattern_row["pattern"], results)
        del runner
        release_memory()  # the trainers of part (c) run in other processes on the same GPU
        if "pattern" in pattern_row and not args.skip_trainers:
            trainer_checks(setting, pattern_row["pattern"], workdir, results)

    elapsed = time.perf_counter() - started
    info = h.machine_info()
    flop_note = ("not counted" if flops is None else
                 f"{flops / setting.batch / 1e9:.2f} GFLOP per sample per step "
                 "(torch.utils.flop_counter.FlopCounterMode, forward + backward, unchunked)")
    peak_note = (f"{setting.peak:g} TFLOP/s dense bf16 ({setting.device_name})" if setting.peak
                 else f"unknown for {setting.device_name} (pass --peak-tflops)")
    header = (f"**GPU check** ({'CPU SMOKE RUN: tiny model, not a GPU measurement; ' if setting.smoke else ''}"
              f"{h.describe_machine(info)}; model {Path(setting.model).name}; speed in "
              f"{'fp32' if setting.speed_precision == 'no' else 'bf16'}; {elapsed:.0f} s). "
              f"FLOPs: {flop_note}. Peak: {peak_note}.")
    markdown = header + "\n\n" + table(results)
    print()
    print(markdown)
    failed = [r["check"] for r in results if r["status"] != "ok"]
    payload = {"cpu_smoke": setting.smoke, "machine": info, "device": setting.device_name,
               "model": setting.model, "batch": setting.batch, "flops_per_step": flops,
               "peak_tflops": setting.peak, "seconds": elapsed, "results": results,
               "failed": failed, "markdown": markdown,
               "command": h.command_line("gpu_check.py", argv)}
    out = Path(args.output) if args.output else h.RESULTS_DIR / f"gpu_check{'_cpu_smoke' if setting.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {out}" + (f"; {len(failed)} check(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
