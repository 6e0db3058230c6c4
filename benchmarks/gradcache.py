"""Gradient cache (`train.chunk_size`): its time cost, its memory, and open_clip's `--accum-freq`.

Three measurements on a small ViT / text-transformer (configs/models/demo-vit.json by default):

1. Step time vs chunk size at a fixed batch, in this process: `clip_train.grad_cache.train_step`
   (forward + backward of one optimizer step, Accelerator single process, fp32 on the CPU, bf16 on
   CUDA), every chunk size timed in each round (rotating order), median over rounds; ratio to the
   unchunked step per round, then the median. Theory: chunking adds one forward without graphs to
   forward + backward (~3 forwards), so about 4/3 = 1.33x.
2. Peak memory as the batch grows at a fixed chunk size: a fresh process per configuration builds
   the model and the batch, then runs two steps; peak extra memory = peak RSS during the steps
   (VmHWM, reset just before them through /proc/self/clear_refs) minus the RSS before them. Gradients
   are freed between steps (set_to_none, as the trainer does), so they count in every step's peak.
   On CUDA: max_memory_allocated minus the allocation before the steps.
3. Against open_clip's trainer with `--accum-freq` (micro-batch = our chunk, accum-freq x
   micro-batch = our per-process batch): real runs of both trainers, same data, batch, steps and
   process count (benchmarks/harness.py): time per sample and peak memory per process.

    python benchmarks/gradcache.py --quick   # batch 32, chunks 16/8; 16 -> 64 memory; 1 trainer round
    python benchmarks/gradcache.py           # batch 128, chunks 64..8; 64 -> 256 memory; 2 rounds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

DEFAULT_MODEL = "configs/models/demo-vit.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, 1 round: a smoke test")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model-config JSON")
    parser.add_argument(
        "--batch", type=int, default=None, help="fixed batch of part 1 (default 128, quick 32)"
    )
    parser.add_argument(
        "--chunks",
        default=None,
        help="comma-separated chunk sizes of part 1 (default batch/2 .. 8)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds of part 1 (default 5, quick 2)"
    )
    parser.add_argument(
        "--memory-batch",
        type=int,
        default=None,
        help="smallest batch of part 2, grown 4x (default 64, quick 16)",
    )
    parser.add_argument(
        "--memory-chunk", type=int, default=None, help="chunk of part 2 (default 16, quick 8)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in parts 1-2 (default 1: stable ratios on a shared machine)",
    )
    parser.add_argument(
        "--trainer-repeats", type=int, default=None, help="rounds of part 3 (default 2, quick 1)"
    )
    parser.add_argument(
        "--trainer-steps",
        type=int,
        default=None,
        help="steps per run of part 3 (default 14, quick 8)",
    )
    parser.add_argument(
        "--skip-trainers", action="store_true", help="skip part 3 (the open_clip runs)"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="stay on the CPU even if CUDA is available"
    )
    # Child mode (part 2): one configuration in a fresh process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-chunk", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# In-process pieces (parts 1 and 2)


class Bench:
    """The model, loss and a random batch, ready for `train_step`."""

    def __init__(self, model_name: str, batch: int, cuda: bool, threads: int):
        import torch
        from accelerate import Accelerator

        from clip_train.config import ModelConfig
        from clip_train.loss import contrastive_loss
        from clip_train.model import DualEncoder, build_model

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
        bundle = build_model(ModelConfig(name=model_name))
        self.model = self.accelerator.prepare(DualEncoder(bundle.model))
        self.model.train()
        clip = self.accelerator.unwrap_model(self.model).clip
        size = clip.visual.image_size
        size = size if isinstance(size, int) else size[0]
        device = self.accelerator.device
        self.images = torch.randn(batch, 3, size, size, device=device)
        self.texts = torch.randint(1, clip.vocab_size, (batch, clip.context_length), device=device)
        self.loss_fn = functools.partial(contrastive_loss, kind="clip", impl="auto")

    def step(self, chunk: int | None, batch: int | None = None) -> None:
        from clip_train.grad_cache import train_step

        n = batch or self.images.shape[0]
        train_step(
            self.model,
            self.images[:n],
            self.texts[:n],
            loss_fn=self.loss_fn,
            chunk_size=chunk,
            accelerator=self.accelerator,
        )
        self.model.zero_grad(set_to_none=True)

    def sync(self) -> None:
        import torch

        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()


def step_times(
    args: argparse.Namespace, cuda: bool, batch: int, chunks: list[int | None], rounds: int
) -> list[dict]:
    """Part 1: median wall/CPU seconds per step for each chunk size, alternating every round."""
    bench = Bench(args.model, batch, cuda, args.threads)
    for chunk in chunks:  # warm-up: allocator, oneDNN kernels, autograd threads
        bench.step(chunk)
    walls: dict = {c: [] for c in chunks}
    cpus: dict = {c: [] for c in chunks}
    for r in range(rounds):
        order = chunks[r % len(chunks) :] + chunks[: r % len(chunks)]
        for chunk in order:
            bench.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            bench.step(chunk)
            bench.sync()
            walls[chunk].append(time.perf_counter() - t0)
            cpus[chunk].append(time.process_time() - c0)
        print(
            f"round {r + 1}: "
            + ", ".join(f"chunk {c or batch}: {walls[c][-1]:.3f} s" for c in chunks),
            flush=True,
        )
    rows = []
    for chunk in chunks:
        rows.append(
            {
                "batch": batch,
                "chunk": chunk,
                "wall_s": h.median(walls[chunk]),
                "cpu_s": h.median(cpus[chunk]),
                "ratio": h.median(a / b for a, b in zip(walls[chunk], walls[None], strict=True)),
                "cpu_ratio": h.median(a / b for a, b in zip(cpus[chunk], cpus[None], strict=True)),
                "walls": walls[chunk],
                "rounds": rounds,
            }
        )
    return rows


def child(args: argparse.Namespace) -> dict:
    """Part 2, in a fresh process: peak extra memory of two steps at one (batch, chunk)."""
    import gc

    import torch

    cuda = not args.cpu and torch.cuda.is_available()
    bench = Bench(args.model, args.child_batch, cuda, args.threads)
    chunk = args.child_chunk or None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = h.reset_peak_rss()  # model building must not hide the step
    for _ in range(2):
        bench.step(chunk)
    bench.sync()
    peak = torch.cuda.max_memory_allocated() if cuda else h.proc_status_kib("VmHWM") * 1024
    return {
        "batch": args.child_batch,
        "chunk": chunk,
        "peak_extra_gib": (peak - base) / 2**30,
        "base_gib": base / 2**30,
        "device": "cuda" if cuda else "cpu",
    }


def memory_row(args: argparse.Namespace, batch: int, chunk: int | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--child-batch",
        str(batch),
        "--child-chunk",
        str(chunk or 0),
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        *(["--cpu"] if args.cpu else []),
    ]
    proc, result = h.run_child(cmd, timeout=900)
    if result is None:
        return {"batch": batch, "chunk": chunk, "failed": proc.stderr.strip()[-300:]}
    return result


def memory_growth(args: argparse.Namespace, b0: int, chunk: int) -> list[dict]:
    """Part 2: unchunked at b0 and 4*b0, chunked at b0, 2*b0, 4*b0; growth relative to b0."""
    configs = [(b0, None), (4 * b0, None), (b0, chunk), (2 * b0, chunk), (4 * b0, chunk)]
    rows = []
    for batch, c in configs:
        rows.append(memory_row(args, batch, c))
        r = rows[-1]
        print(
            f"memory batch {batch} chunk {c or batch}: "
            + (f"{r['peak_extra_gib']:.3f} GiB extra" if "failed" not in r else r["failed"]),
            flush=True,
        )
    for r in rows:
        first = next(
            (
                x
                for x in rows
                if x["batch"] == b0 and x["chunk"] == r["chunk"] and "failed" not in x
            ),
            None,
        )
        if first is not None and "failed" not in r:
            r["growth"] = r["peak_extra_gib"] / first["peak_extra_gib"]
    return rows


# ------------------------------------------------------------------------------------------------
# Part 3: real runs against open_clip --accum-freq


def versus_open_clip(
    args: argparse.Namespace,
    cuda: bool,
    gpus: int,
    micro: int,
    local: int,
    repeats: int,
    steps: int,
    warmup: int,
) -> list[dict]:
    nproc = gpus if cuda else 2
    with tempfile.TemporaryDirectory() as tmp:
        data = h.make_digits_shards(Path(tmp) / "digits")
        specs = [
            h.RunSpec(
                trainer=t,
                model=args.model,
                train_data=data["train"],
                nproc=nproc,
                global_batch=local * nproc,
                steps=steps,
                chunk=micro,
                lr=1e-3,
                weight_decay=0.1,
                warmup_steps=2,
                workers=4 if cuda else 1,
                precision="bf16" if cuda else "fp32",
                cuda=cuda,
            )
            for t in h.TRAINERS
        ]
        results: dict[str, list[h.RunResult]] = {s.trainer: [] for s in specs}
        for r in range(repeats):
            for spec in specs if r % 2 == 0 else specs[::-1]:
                res = h.run_trainer(spec, Path(tmp) / "runs", warmup)
                results[spec.trainer].append(res)
                print(
                    f"{spec.label()} round {r + 1}: {1e3 / res.samples_per_s:.2f} ms/sample, "
                    f"peak RSS {max(res.peak_rss_gib):.2f} GiB, load {res.load_before:.1f}",
                    flush=True,
                )
    rows = []
    for spec in specs:
        rs, ref = results[spec.trainer], results["open_clip"]
        rows.append(
            {
                "trainer": spec.label(),
                "processes": nproc,
                "batch_per_process": local,
                "micro_batch": micro,
                "ms_per_sample": h.median(1e3 / r.samples_per_s for r in rs),
                "ratio_vs_open_clip": h.median(
                    a.samples_per_s / b.samples_per_s for a, b in zip(rs, ref, strict=True)
                ),
                "cpu_ms_per_sample": h.median(1e3 / r.samples_per_cpu_s for r in rs),
                "peak_rss_gib": h.median(max(r.peak_rss_gib) for r in rs),
                "peak_cuda_gib": h.median(max(r.peak_cuda_gib) for r in rs if r.peak_cuda_gib),
                "data_wait": h.median(r.data_wait_fraction for r in rs),
                "load": h.median(r.load_before for r in rs),
                "runs": [asdict(r) for r in rs],
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------


def tables(
    time_rows: list[dict], memory_rows: list[dict], trainer_rows: list[dict], cuda: bool
) -> str:
    batch = time_rows[0]["batch"]
    t1 = h.markdown_table(
        ["chunk", "chunks / step", "step s (median)", "÷ unchunked", "CPU s", "÷ unchunked (CPU)"],
        [
            [
                r["chunk"] or f"{batch} (off)",
                -(-batch // (r["chunk"] or batch)),
                r["wall_s"],
                f"{r['ratio']:.2f}x",
                r["cpu_s"],
                f"{r['cpu_ratio']:.2f}x",
            ]
            for r in time_rows
        ],
    )
    unit = "GiB (CUDA allocated)" if cuda else "GiB (RSS)"
    t2 = h.markdown_table(
        ["batch", "chunk", f"peak extra {unit}", "growth vs smallest batch"],
        [
            [
                r["batch"],
                r["chunk"] or "off",
                r.get("peak_extra_gib", float("nan")),
                f"{r['growth']:.2f}x" if "growth" in r else r.get("failed", ""),
            ]
            for r in memory_rows
        ],
    )
    parts = [
        f"Step time vs chunk size at batch {batch} (target: ≤ 1.4x, theory ≈ 1.33x):",
        "",
        t1,
        "",
        "Peak memory of a training step as the batch grows at a fixed chunk (target: chunked < 1.3x "
        "for 4x the batch):",
        "",
        t2,
    ]
    if trainer_rows:
        mem = "peak CUDA GiB / process" if cuda else "peak RSS GiB / process"
        t3 = h.markdown_table(
            [
                "trainer",
                "processes",
                "batch / process",
                "micro-batch",
                "ms / sample (median)",
                "speed vs open_clip",
                "CPU ms / sample / process",
                mem,
                "load avg",
            ],
            [
                [
                    r["trainer"],
                    r["processes"],
                    r["batch_per_process"],
                    r["micro_batch"],
                    r["ms_per_sample"],
                    f"{r['ratio_vs_open_clip']:.2f}x",
                    r["cpu_ms_per_sample"],
                    r["peak_cuda_gib"] if cuda else r["peak_rss_gib"],
                    r["load"],
                ]
                for r in trainer_rows
            ],
            "lrrrrrrrr",
        )
        parts += [
            "",
            "Real training runs, gradient cache vs open_clip's --accum-freq at the same "
            "effective batch and micro-batch (speed > 1: faster than open_clip):",
            "",
            t3,
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    gpus = 0 if args.cpu else h.cuda_device_count()
    cuda = gpus > 0
    batch = args.batch or (32 if args.quick else 128)
    chunks: list[int | None] = (
        [int(c) for c in args.chunks.split(",")]
        if args.chunks
        else [c for c in (batch // 2, batch // 4, batch // 8, batch // 16) if c >= 8]
    )
    chunks = [None] + [c for c in chunks if c < batch]
    rounds = args.rounds or (2 if args.quick else 5)
    b0 = args.memory_batch or (16 if args.quick else 64)
    mem_chunk = args.memory_chunk or (8 if args.quick else 16)
    info = h.machine_info()
    started = time.perf_counter()

    time_rows = step_times(args, cuda, batch, chunks, rounds)
    memory_rows = memory_growth(args, b0, mem_chunk)
    trainer_rows = (
        []
        if args.skip_trainers
        else versus_open_clip(
            args,
            cuda,
            gpus,
            micro=mem_chunk,
            local=b0,
            repeats=args.trainer_repeats or (1 if args.quick else 2),
            steps=args.trainer_steps or (8 if args.quick else 14),
            warmup=3,
        )
    )

    elapsed = time.perf_counter() - started
    markdown = "\n".join(
        [
            f"**Gradient cache** ({h.describe_machine(info)}; load average at the end {os.getloadavg()[0]:.1f}; "
            f"{elapsed:.0f} s)",
            "",
            f"Model {args.model}, {'bf16 autocast on CUDA' if cuda else f'fp32 on the CPU, {args.threads} thread(s)'} "
            "in the step-time and memory parts.",
            "",
            tables(time_rows, memory_rows, trainer_rows, cuda),
        ]
    )
    print()
    print(markdown)
    out = h.write_json(
        "gradcache",
        {
            "machine": info,
            "quick": args.quick,
            "model": args.model,
            "step_time": time_rows,
            "memory": memory_rows,
            "versus_open_clip": trainer_rows,
            "markdown": markdown,
            "command": h.command_line("gradcache.py", argv or None),
        },
        args.quick,
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
