"""Per-process memory of a training step, DDP vs FSDP2 (launch/accelerate/fsdp2.yaml), at 2 (and 4)
processes, on a model whose weights, gradients and AdamW state dominate (default: open_clip's
ViT-B-16, 150 M parameters, at 64 px images and a small batch).

Each configuration is one `accelerate launch` of this file (CPU processes with gloo unless GPUs are
present); every process runs the trainer's own step (clip_train.grad_cache.train_step with the
gradient cache, replicated-temperature reduction, gradient clipping, AdamW) and reports:
- params/grads/optim MiB: bytes this process holds of parameters, gradients and AdamW state
  (local shards under FSDP2), counted from the tensors after a step's backward;
- step peak MiB: the process's peak memory during one step: on CPU the resident set size sampled
  every 2 ms (/proc/self/statm; with glibc's MALLOC_MMAP_THRESHOLD_=64 KiB and malloc_trim, so
  that it follows live memory; it includes the Python/torch baseline of a few hundred MiB, the
  same in both modes), on CUDA
  torch.cuda.max_memory_allocated; growth MiB: the same peak minus the memory just before the
  step (activations, gradients, all-gathered units, DDP's buckets);
- step s: median wall time of the measured steps.

    python benchmarks/fsdp_memory.py                      # 2 processes, DDP and FSDP2
    python benchmarks/fsdp_memory.py --nproc 2 4          # also 4 processes
    python benchmarks/fsdp_memory.py --modes fsdp2 --grad-reduce last_chunk
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

REPO = h.REPO


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def child(args: argparse.Namespace) -> None:
    import open_clip
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from clip_train import sharding
    from clip_train.config import OptimConfig
    from clip_train.grad_cache import train_step
    from clip_train.loss import contrastive_loss
    from clip_train.model import DualEncoder, resolve_model_name
    from clip_train.optim import build_optimizer

    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "") != "true"
    acc = Accelerator(cpu=not cuda)
    sharded = sharding.enable_fsdp2(acc)
    set_seed(0)
    clip = open_clip.create_model(resolve_model_name(args.model), force_image_size=args.image_size)
    n_params = sum(p.numel() for p in clip.parameters())
    model = DualEncoder(clip)
    if sharded:
        sharding.prepare_model(acc, model)
    opt = build_optimizer(clip, OptimConfig(lr=1e-4))
    model, opt = acc.prepare(model, opt)
    ctx = clip.context_length
    gen = torch.Generator().manual_seed(acc.process_index)
    images = torch.randn(args.local_batch, 3, args.image_size, args.image_size, generator=gen).to(acc.device)
    texts = torch.randint(1, 49000, (args.local_batch, ctx), generator=gen).to(acc.device)

    times, peaks, growths, held = [], [], [], {}
    for step in range(args.steps + 1):  # step 0 allocates AdamW state: not measured
        acc.wait_for_everyone()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with h.RssPeak() as rss:
            train_step(model, images, texts, loss_fn=contrastive_loss, chunk_size=args.chunk_size,
                       accelerator=acc, grad_reduce=args.grad_reduce)
            sharding.reduce_replicated_grads(model)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            held = {"params": local_bytes(model.parameters()), "grads": local_bytes(grads)}
            del grads
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step > 0:
            times.append(dt)
            peaks.append(torch.cuda.max_memory_allocated() if cuda else rss.peak)
            growths.append(torch.cuda.max_memory_allocated() - before if cuda else rss.peak - rss.before)
    held["optim"] = local_bytes(t for s in opt.state.values() for t in s.values()
                                if torch.is_tensor(t) and t.dim() > 0)
    mine = {"rank": acc.process_index, **{f"{k}_mib": mib(v) for k, v in held.items()},
            "held_mib": mib(sum(held.values())), "step_peak_mib": mib(max(peaks)),
            "step_growth_mib": mib(max(growths)),
            "step_s": statistics.median(times)}
    everyone = gather_object([mine])
    if acc.is_main_process:
        worst = max(everyone, key=lambda r: r["held_mib"])
        print("RESULT " + json.dumps({"mode": "fsdp2" if sharded else "ddp", "nproc": acc.num_processes,
                                      "params": n_params, **worst,
                                      "step_peak_mib": max(r["step_peak_mib"] for r in everyone),
                                      "step_growth_mib": max(r["step_growth_mib"] for r in everyone),
                                      "step_s": max(r["step_s"] for r in everyone)}), flush=True)
    acc.wait_for_everyone()
    del model, opt
    acc.end_training()


def run(mode: str, nproc: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if h.cuda_device_count() < nproc:
        env["ACCELERATE_USE_CPU"] = "true"
        # glibc: tensors >= 64 KiB get their own mmap, returned to the OS when freed, so that the
        # sampled RSS follows live memory instead of heap pages kept after earlier allocations.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    launch = (["--config_file", str(REPO / "launch/accelerate/fsdp2.yaml")] if mode == "fsdp2"
              else ["--multi_gpu"])
    cmd = [*h.launcher(nproc, tuple(launch), always=True), __file__, "--child",
           "--model", args.model, "--image-size", str(args.image_size), "--local-batch", str(args.local_batch),
           "--chunk-size", str(args.chunk_size), "--steps", str(args.steps), "--grad-reduce", args.grad_reduce]
    proc, result = h.run_child(cmd, env=env, prefix="RESULT ")
    if result is None:
        raise SystemExit(f"{mode} x{nproc} failed:\n{proc.stderr[-3000:]}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name or model-config JSON")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--local-batch", type=int, default=8, help="samples per process")
    p.add_argument("--chunk-size", type=int, default=4, help="gradient-cache chunk")
    p.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    p.add_argument("--grad-reduce", default="every_chunk", choices=("every_chunk", "last_chunk"))
    p.add_argument("--nproc", type=int, nargs="+", default=[2])
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp2"], choices=("ddp", "fsdp2"))
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows = [run(mode, n, args) for n in args.nproc for mode in args.modes]
    print(f"{args.model} at {args.image_size}px, {args.local_batch} samples/process, chunk {args.chunk_size}, "
          f"FSDP2 grad reduce {args.grad_reduce}; per process (max over processes):\n")
    print("| mode | processes | params MiB | grads MiB | AdamW MiB | held MiB | x DDP | step peak MiB | x DDP "
          "| growth MiB | step s | x DDP |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ddp = next((d for d in rows if d["mode"] == "ddp" and d["nproc"] == r["nproc"]), None)
        ratio = f"{r['held_mib'] / ddp['held_mib']:.2f}" if ddp else "-"
        time_ratio = f"{r['step_s'] / ddp['step_s']:.2f}" if ddp else "-"
        peak_ratio = f"{r['step_peak_mib'] / ddp['step_peak_mib']:.2f}" if ddp else "-"
        print(f"| {r['mode']} | {r['nproc']} | {r['params_mib']:.0f} | {r['grads_mib']:.0f} | {r['optim_mib']:.0f} "
              f"| {r['held_mib']:.0f} | {ratio} | {r['step_peak_mib']:.0f} | {peak_ratio} | {r['step_growth_mib']:.0f} "
              f"| {r['step_s']:.2f} | {time_ratio} |")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
