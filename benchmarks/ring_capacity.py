"""The largest global batch per GPU memory, ring vs tiled loss: COMPUTED from a memory model,
not measured on a GPU. Prints the markdown table of docs/performance.md.

Per process, at local batch B over N processes (global G = N * B), embedding dim D:
- ring loss: a * B * D / 512 + c, the line benchmarks/loss_memory.py fits to its simulated ring
  rows (D = 512, tile 4096; the B x D part scales with D);
- tiled loss: 16 * D bytes per GLOBAL row + 0.2 GiB (its per-rank rows: 2.2 GiB at 262,144,
  8.2 GiB at 1,048,576, local 1,024, D = 512), i.e. the gathered embeddings and gradients;
- the gradient cache's per-sample storage: the embeddings (float32, 2 * D * 4 bytes, plus the
  bf16 chunks they are concatenated from, 2 * D * 2) and, with --images, the local batch's
  images as train.py holds them on the device (float32 after normalisation, 3 x 224 x 224)
  and the tokens (77 int64);
- the model: 16 bytes per parameter (float32 weights, gradients, AdamW's two moments), divided
  by N under FSDP2 (--fsdp), plus --activations-gib for one chunk's activations and the
  allocator's slack (an assumption: it depends on the chunk size).

    python benchmarks/ring_capacity.py                 # the measured fit
    python benchmarks/ring_capacity.py --fit benchmarks/results/loss_memory_clip.json   # a new one
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 2**30
MODELS = {"ViT-B/32": (512, 151.28e6), "ViT-L/14": (768, 427.62e6)}  # embed dim, parameters
IMAGE_BYTES = 3 * 224 * 224 * 4
TOKEN_BYTES = 77 * 8
TILED_CONSTANT = 0.2 * GIB
# The ring line of benchmarks/results/2026-12-06-vm-ring-loss.md (5 rows, local 4,096-16,384,
# D = 512, tile 4,096, fixed mmap threshold); results/*.json are not committed.
MEASURED_FIT = {"bytes_per_row": 10424.672413793105, "constant_bytes": 200179111.72413796}


def per_sample_bytes(d: int, images: bool) -> float:
    return 2 * d * 4 + 2 * d * 2 + (IMAGE_BYTES + TOKEN_BYTES if images else 0)


def largest_local(free: float, row_bytes: float, constant: float) -> int:
    return max(0, int((free - constant) // row_bytes))


def table(fit: dict, gpus: list[float], processes: list[int], images: bool, fsdp: bool,
          activations_gib: float) -> str:  # fmt: skip
    a, c = fit["bytes_per_row"], fit["constant_bytes"]
    lines = [
        "| model | GPU GiB | processes | tiled: largest global batch | ring: largest global batch | ring / tiled |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (d, params) in MODELS.items():
        for gpu in gpus:
            for n in processes:
                model = 16 * params / (n if fsdp else 1)
                free = gpu * GIB - model - activations_gib * GIB
                sample = per_sample_bytes(d, images)
                tiled = n * largest_local(free, sample + 16 * d * n, TILED_CONSTANT)
                ring = n * largest_local(free, sample + a * d / 512, c)
                ratio = f"{ring / tiled:.1f}x" if tiled else "-"
                lines.append(f"| {name} | {gpu:g} | {n} | {tiled:,} | {ring:,} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=Path, default=None,
                        help="a loss_memory.py JSON holding ring_fit (default: the fit of "
                             "benchmarks/results/2026-12-06-vm-ring-loss.md)")  # fmt: skip
    parser.add_argument("--gpus", default="40,80,141", help="GPU memory sizes, GiB")
    parser.add_argument("--processes", default="8,64")
    parser.add_argument("--activations-gib", type=float, default=8.0)
    parser.add_argument("--fsdp", action="store_true", help="model state sharded over processes")
    args = parser.parse_args()
    fit = json.loads(args.fit.read_text())["ring_fit"] if args.fit else MEASURED_FIT
    gpus = [float(x) for x in args.gpus.split(",")]
    processes = [int(x) for x in args.processes.split(",")]
    print(f"ring model: {fit['bytes_per_row']:.0f} bytes x local batch x D/512 + "
          f"{fit['constant_bytes'] / GIB:.3f} GiB; model state {'/ N (FSDP2)' if args.fsdp else 'per process (DDP)'}, "
          f"{args.activations_gib:g} GiB for a chunk's activations\n")  # fmt: skip
    for images in (False, True):
        print("Loss and embeddings only (images elsewhere)" if not images else
              "With the gradient cache's local batch of float32 224 px images on the device")  # fmt: skip
        print()
        print(table(fit, gpus, processes, images, args.fsdp, args.activations_gib))
        print()


if __name__ == "__main__":
    main()
