"""Training throughput and peak memory: clip_train's trainer vs open_clip's (`open_clip_train.main`).

Both trainers train the same model config on the same webdataset shards (the demo's handwritten
digits, real 32 px scans, written to a temp folder), with the same global batch, steps, precision
(fp32 on the CPU, bf16 autocast on CUDA), optimizer (AdamW, lr, betas, eps, weight decay, warmup +
cosine), data-loader workers, threads per process (1 on the CPU by default) and process count
(1 and 2 on the CPU, every GPU on CUDA), under the same launcher (plain python for 1 process,
`accelerate launch` for N). clip_train runs
with gradient caching off and on (`train.chunk_size` = half the per-process batch).
open_clip runs with `--local-loss --gather-with-grad` on several processes: the same exact loss as
ours.

What is measured (see trainer_entry.py): per optimizer step, rank 0's wall time from the start of
one step to the start of the next (both loops' schedule call, right after the batch arrives; the
first `--warmup-steps` steps are excluded); samples/s = global batch / median step time. Both
trainers log every 10 steps (ours' default). Samples per CPU-second = per-process batch / rank 0's CPU seconds per
step (trainer process + its data workers): less sensitive to other jobs on a shared machine than the
wall clock. Peak memory per process: peak RSS (`ru_maxrss` of each training process, data workers
excluded); on CUDA `torch.cuda.max_memory_allocated`. Runs alternate between the trainers
(`--repeats` rounds, the order reversed every round); the table gives medians over rounds and the
median of the per-round ratios.

open_clip_train 3.3.0 is patched inside the benchmark's own processes only (trainer_entry.py): its
tar reader drops webdataset 1.0.2's end-of-shard marker (KeyError 'fname', open_clip #935), and DDP
gets no `device_ids` for CPU modules.

    python benchmarks/train_throughput.py --quick   # 2 processes, 1 round, 12 steps: a smoke test
    python benchmarks/train_throughput.py           # 1 and 2 processes, 3 rounds, 30 steps

`--photos` trains at 224 px on photo-like JPEG shards instead (DataComp-like: longest side 512,
quality 90, benchmarks/photos.py; captions of 5-15 words) with a tiny ViT at 224 px
(configs/models/tiny-vit-224.json: 2 layers, width 64, patch 32), so that the step is cheap and
decoding and augmenting the images, the data path of `data.decode=fast`, set the pace:

    python benchmarks/train_throughput.py --photos
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

VARIANTS = ("clip_train", "clip_train+gc", "open_clip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 processes (CPU), 1 round, 12 steps")
    parser.add_argument(
        "--procs",
        default=None,
        help="comma-separated process counts (default: 1,2 on the CPU, all GPUs on CUDA)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="rounds of A/B runs (default 3, quick 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 30, quick 12)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed first steps (default 5, quick 3)"
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="samples per step over all processes (default 64 on the CPU, 512 per GPU)",
    )
    parser.add_argument("--model", default=None,
                        help="model-config JSON (default configs/models/tiny-vit.json; with --photos tiny-vit-224.json)")
    parser.add_argument("--photos", action="store_true",
                        help="photo-like 224-px training (DataComp-like JPEG shards) instead of the 32-px digits")
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="gradient-cache chunk of the clip_train+gc rows (default: half the per-process batch)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="data workers per process (default 1; 4 on CUDA)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP threads per process (default 1 on the CPU, cpus/processes on CUDA)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="stay on the CPU even if CUDA is available"
    )
    parser.add_argument(
        "--workdir", default=None, help="keep runs here (default: a temp folder, deleted)"
    )
    return parser.parse_args(argv)


def summarize(runs: dict[tuple[int, str], list[h.RunResult]]) -> list[dict]:
    """One row per (processes, variant): medians over rounds, ratios against open_clip per round."""
    rows = []
    for (nproc, variant), results in runs.items():
        reference = runs.get((nproc, "open_clip"), [])
        pairs = list(zip(results, reference, strict=False))
        rows.append(
            {
                "processes": nproc,
                "variant": variant,
                "global_batch": results[0].spec["global_batch"],
                "chunk": results[0].spec["chunk"],
                "samples_per_s": h.median(r.samples_per_s for r in results),
                "ratio_vs_open_clip": h.median(a.samples_per_s / b.samples_per_s for a, b in pairs),
                "samples_per_cpu_s": h.median(r.samples_per_cpu_s for r in results),
                "cpu_ratio_vs_open_clip": h.median(
                    a.samples_per_cpu_s / b.samples_per_cpu_s for a, b in pairs
                ),
                "peak_rss_gib": h.median(max(r.peak_rss_gib) for r in results),
                "peak_cuda_gib": h.median(max(r.peak_cuda_gib) for r in results if r.peak_cuda_gib),
                "data_wait": h.median(r.data_wait_fraction for r in results),
                "load": h.median(r.load_before for r in results),
                "rounds": len(results),
            }
        )
    return rows


def table(rows: list[dict], cuda: bool) -> str:
    memory = "peak CUDA GiB / process" if cuda else "peak RSS GiB / process"
    header = [
        "processes",
        "trainer",
        "global batch",
        "samples/s (median)",
        "vs open_clip",
        "samples / CPU-s / process",
        "vs open_clip (CPU)",
        memory,
        "data wait",
        "load avg",
    ]
    body = []
    for r in rows:
        name = r["variant"] if r["chunk"] is None else f"{r['variant']} (chunk {r['chunk']})"
        body.append(
            [
                r["processes"],
                name,
                r["global_batch"],
                r["samples_per_s"],
                f"{r['ratio_vs_open_clip']:.2f}x",
                r["samples_per_cpu_s"],
                f"{r['cpu_ratio_vs_open_clip']:.2f}x",
                r["peak_cuda_gib"] if cuda else r["peak_rss_gib"],
                f"{r['data_wait']:.0%}" if r["data_wait"] == r["data_wait"] else "–",
                r["load"],
            ]
        )
    return h.markdown_table(header, body, "rlrrrrrrrr")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = args.model or ("configs/models/tiny-vit-224.json" if args.photos else "configs/models/tiny-vit.json")
    gpus = 0 if args.cpu else h.cuda_device_count()
    cuda = gpus > 0
    procs = (
        [int(p) for p in args.procs.split(",")]
        if args.procs
        else [gpus]
        if cuda
        else [2]
        if args.quick
        else [1, 2]
    )
    repeats = args.repeats or (1 if args.quick else 3)
    # One thread per process on the CPU: on a machine shared with other jobs a second OpenMP thread
    # makes step times bimodal (a step waits whenever another job holds the other core).
    threads = args.threads or (None if cuda else 1)
    steps = args.steps or (12 if args.quick else 30)
    warmup = args.warmup_steps if args.warmup_steps is not None else (3 if args.quick else 5)
    workers = args.workers or (4 if cuda else 1)
    info = h.machine_info()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        if args.photos:
            from data_throughput import family_images, write_shards  # this script's folder

            n = max(2048, steps * (args.global_batch or 64) * 2)
            data = {"train": write_shards(workdir / "photos", family_images("datacomp-512", 48), n)}
        else:
            data = h.make_digits_shards(workdir / "digits")
        runs: dict[tuple[int, str], list[h.RunResult]] = {}
        for nproc in procs:
            global_batch = args.global_batch or (512 * nproc if cuda else 64)
            local = global_batch // nproc
            chunk = args.chunk or max(1, local // 2)
            specs = {
                variant: h.RunSpec(
                    trainer="open_clip" if variant == "open_clip" else "clip_train",
                    model=args.model,
                    train_data=data["train"],
                    nproc=nproc,
                    global_batch=global_batch,
                    steps=steps,
                    chunk=chunk if variant == "clip_train+gc" else None,
                    lr=1e-3,
                    weight_decay=0.1,
                    warmup_steps=2,
                    workers=workers,
                    precision="bf16" if cuda else "fp32",
                    cuda=cuda,
                    threads=threads,
                )
                for variant in VARIANTS
            }
            for round_ in range(repeats):
                # Alternate the order so that a slow stretch of a shared machine hits every variant.
                for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                    result = h.run_trainer(specs[variant], workdir / "runs", warmup)
                    runs.setdefault((nproc, variant), []).append(result)
                    print(
                        f"{nproc} proc, {variant:14s} round {round_ + 1}: {result.samples_per_s:8.1f} samples/s, "
                        f"{result.samples_per_cpu_s:7.1f} per CPU-s, peak RSS "
                        f"{max(result.peak_rss_gib):.2f} GiB, load {result.load_before:.1f}",
                        flush=True,
                    )
        rows = summarize(runs)

    elapsed = time.perf_counter() - started
    setting = (
        f"{'DataComp-like photo shards (longest side 512), ' if args.photos else 'digit shards (32 px), '}"
        f"model {args.model}, {steps} steps ({warmup} untimed), {'bf16 autocast, CUDA' if cuda else 'fp32, CPU'}, "
        f"{workers} data worker(s) and {threads or 'cpus/processes'} OMP thread(s) per process, AdamW, "
        f"{repeats} alternating round(s); clip_train+gc: gradient caching with the chunk shown"
    )
    markdown = "\n".join(
        [
            f"**Training throughput, clip_train vs open_clip_train** ({h.describe_machine(info)}; "
            f"load average at the end {os.getloadavg()[0]:.1f}; {elapsed:.0f} s)",
            "",
            setting + ".",
            "",
            table(rows, cuda),
            "",
            "Ratios are medians of per-round ratios. Data wait: share of the step spent waiting for the "
            "next batch, as each trainer reports it. open_clip_train is patched in the benchmark "
            "processes only: webdataset 1.0.2 end-of-shard marker (open_clip #935) and DDP `device_ids` "
            "on the CPU.",
        ]
    )
    print()
    print(markdown)
    out = h.write_json(
        "train_throughput",
        {
            "machine": info,
            "quick": args.quick,
            "setting": setting,
            "rows": rows,
            "markdown": markdown,
            "runs": {f"{n}-{v}": [asdict(r) for r in rs] for (n, v), rs in runs.items()},
            "command": " ".join(
                ["python", "benchmarks/train_throughput.py", *(argv or sys.argv[1:])]
            ),
        },
        args.quick,
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
