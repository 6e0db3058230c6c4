"""Forward+backward time and peak extra memory of the contrastive loss: open_clip's own loss vs
clip_train's plain and tiled implementations, embedding dim 512, growing global batch.

Every measurement runs in a fresh child process so that peaks do not mix:
- CPU: peak extra memory = the child's peak RSS (kernel high-water mark, ru_maxrss) minus its RSS
  just before the loss, with the raw embeddings already allocated (their gradients count as extra);
- CUDA (`--device cuda`): torch.cuda.max_memory_allocated minus the allocation before the loss.
Time is the median over repeats of one forward+backward (after a small warm-up call).

Besides single-process rows it measures "per-rank" rows: one process's share of a larger global
batch (its B_local rows against all G gathered columns), which is the block a process of a
multi-GPU job computes; the gathered columns are built locally, no process group is involved.

Plain/open_clip rows are skipped when their predicted peak would not fit the memory budget.

    python benchmarks/loss_memory.py            # full: B = 1024 ... 32768 (+ per-rank rows)
    python benchmarks/loss_memory.py --quick    # seconds: small batches, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
EMBED_DIM = 512
# Peak of the plain losses in float32 B x B matrices, measured here (open_clip: ~6, ours: ~4);
# used only to skip runs that would not fit.
PLAIN_BLOCKS = {"open_clip": 7.0, "plain": 5.0}


def child(args: argparse.Namespace) -> dict:
    """One measurement; runs in its own process and prints a JSON line."""
    import psutil
    import torch
    import torch.nn.functional as F

    from clip_train.loss import _clip_tiled, _siglip_tiled, contrastive_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    b_local, b_global, d = args.local_batch, args.batch, EMBED_DIM

    if args.impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        oc_loss = ClipLoss() if args.kind == "clip" else SigLipLoss()

    def run(b: int, g: int) -> tuple:
        img = torch.randn(b, d, device=device, requires_grad=True)
        txt = torch.randn(b, d, device=device, requires_grad=True)
        scale = torch.tensor(2.659, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        if b == g:
            extra = None
        else:
            # A per-rank row: the gathered columns of the other ranks, as plain tensors.
            extra = (torch.randn(g - b, d, device=device), torch.randn(g - b, d, device=device))
        leaves = (img, txt, scale, bias)

        def step() -> None:
            if args.impl == "open_clip":
                i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
                if args.kind == "clip":
                    loss = oc_loss(i, t, scale.exp().clamp(max=100))
                else:
                    loss = oc_loss(i, t, scale.exp().clamp(max=100), bias)
            elif extra is None:
                loss = contrastive_loss(
                    img, txt, scale, bias, kind=args.kind, impl=args.impl, tile_size=args.tile_size
                )
            else:
                # The same maths contrastive_loss runs after the all-gather, on rank 0.
                s = scale.exp().clamp(max=100)
                i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
                ig = torch.cat([i, F.normalize(extra[0], dim=-1)])
                tg = torch.cat([t, F.normalize(extra[1], dim=-1)])
                if args.kind == "clip":
                    loss = _clip_tiled(i, t, ig, tg, s, args.tile_size)
                else:
                    loss = _siglip_tiled(i, t, s, bias, tg, args.tile_size)
            loss.backward()
            for leaf in leaves:
                leaf.grad = None

        return step

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(min(256, b_local), min(256, b_global))()  # warm-up: lazy inits, thread pools
    step = run(b_local, b_global)
    sync()
    proc = psutil.Process()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc.memory_info().rss
    times, cpu_times = [], []
    budget_start = time.perf_counter()
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if time.perf_counter() - budget_start > args.max_seconds:
            break
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "repeats": len(times),
        "peak_extra_bytes": peak,
    }


def measure(args: argparse.Namespace, impl: str, b: int, b_local: int) -> dict:
    row = {"impl": impl, "kind": args.kind, "global_batch": b, "local_batch": b_local}
    if impl in PLAIN_BLOCKS:
        predicted = PLAIN_BLOCKS[impl] * b_local * b * 4
        if predicted > args.max_plain_gib * 2**30:
            row["skipped"] = f"predicted {predicted / 2**30:.0f} GiB > budget"
            return row
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--batch", str(b),
           "--local-batch", str(b_local), "--kind", args.kind, "--device", args.device,
           "--tile-size", str(args.tile_size), "--repeats", str(args.repeats),
           "--max-seconds", str(args.max_seconds)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        row["skipped"] = f"timeout {args.timeout} s"
        return row
    if proc.returncode != 0:
        # Killed for memory (-9) or an error: the row says so instead of aborting the table.
        row["skipped"] = f"failed (rc {proc.returncode}): {proc.stderr.strip()[-200:]}"
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| impl | global B | local B | fwd+bwd wall s (median, n) | CPU s | peak extra GiB "
        "| wall / CPU vs open_clip |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {r["global_batch"]: r for r in rows if r["impl"] == "open_clip" and "time_s" in r}
    for r in rows:
        if "time_s" not in r:
            cells = [r["skipped"], "", "", ""]
        else:
            ref = (
                reference.get(r["global_batch"]) if r["local_batch"] == r["global_batch"] else None
            )
            ratio = (
                f"{r['time_s'] / ref['time_s']:.2f}x / {r['cpu_s'] / ref['cpu_s']:.2f}x"
                if ref
                else ""
            )
            cells = [f"{r['time_s']:.3f} ({r['repeats']})", f"{r['cpu_s']:.2f}",
                     f"{r['peak_extra_bytes'] / 2**30:.3f}", ratio]  # fmt: skip
        lines.append(f"| {r['impl']} | {r['global_batch']} | {r['local_batch']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, seconds")
    parser.add_argument("--kind", default="clip", choices=("clip", "siglip"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile-size", type=int, default=4096)
    parser.add_argument("--batches", type=str, default=None,
                        help="comma-separated global batches (default: 1024..32768)")  # fmt: skip
    parser.add_argument("--per-rank", type=str, default=None,
                        help="comma-separated LOCAL:GLOBAL tiled per-rank rows "
                             "(default: 4096:262144 in full mode)")  # fmt: skip
    parser.add_argument("--max-tiled-batch", type=int, default=32768)
    parser.add_argument("--max-plain-gib", type=float, default=12.0,
                        help="skip plain/open_clip runs predicted to need more")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="stop repeating once a measurement has taken this long")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    # Child mode (internal).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="tiled", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--local-batch", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args)))
        return

    if args.quick:
        batches, per_rank, args.repeats = [1024], [(256, 2048)], 2
    else:
        batches = [1024 * 2**i for i in range(6)]
        per_rank = [(4096, 262144)]
    if args.batches:
        batches = [int(x) for x in args.batches.split(",")]
    if args.per_rank is not None:
        per_rank = [tuple(int(v) for v in x.split(":")) for x in args.per_rank.split(",") if x]

    rows = []
    started = time.perf_counter()
    for b in batches:
        for impl in ("open_clip", "plain", "tiled"):
            if impl == "tiled" and b > args.max_tiled_batch:
                continue
            rows.append(measure(args, impl, b, b))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    for b_local, b in per_rank:
        rows.append(measure(args, "tiled", b, b_local))
        print(table(rows[-1:]).splitlines()[-1], flush=True)

    print()
    print(f"{args.kind} loss, D={EMBED_DIM}, tile {args.tile_size}, device {args.device}, "
          f"{os.cpu_count()} CPUs, torch threads default; {time.perf_counter() - started:.0f} s")  # fmt: skip
    print()
    print(table(rows))
    out = args.out or RESULTS_DIR / f"loss_memory_{args.kind}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"embed_dim": EMBED_DIM, "tile_size": args.tile_size, "device": args.device,
            "cpus": os.cpu_count(), "platform": platform.platform(), "quick": args.quick}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
