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
# Peak extra memory of the plain losses in float32 B x B matrices (measured on CPU at B=16384:
# ~4.1 for both); used only to skip runs that would not fit.
PLAIN_BLOCKS = {"open_clip": 4.5, "plain": 4.5}


def child(args: argparse.Namespace) -> dict:
    """One measurement; runs in its own process and prints a JSON line."""
    import psutil
    import torch
    import torch.nn.functional as F

    from clip_train.loss import _clip_tiled, _siglip_tiled, contrastive_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    d = EMBED_DIM

    def make_step(impl: str, b: int, g: int):
        img = torch.randn(b, d, device=device, requires_grad=True)
        txt = torch.randn(b, d, device=device, requires_grad=True)
        scale = torch.tensor(2.659, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        # A per-rank row (b < g): the other ranks' gathered columns, as plain tensors.
        extra = None if b == g else [torch.randn(g - b, d, device=device) for _ in range(2)]
        leaves = (img, txt, scale, bias)
        if impl == "open_clip":
            from open_clip.loss import ClipLoss, SigLipLoss

            oc_loss = ClipLoss() if args.kind == "clip" else SigLipLoss()

        def step() -> None:
            if impl == "open_clip":
                i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
                s = scale.exp().clamp(max=100)
                loss = oc_loss(i, t, s) if args.kind == "clip" else oc_loss(i, t, s, bias)
            elif extra is None:
                loss = contrastive_loss(
                    img, txt, scale, bias, kind=args.kind, impl=impl, tile_size=args.tile_size
                )
            else:
                # The maths contrastive_loss runs on rank 0 after the all-gather.
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

    def timed(step) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    impls = args.impl.split(",")
    for impl in impls:  # warm-up: lazy inits, thread pools
        make_step(impl, min(256, args.local_batch), min(256, args.batch))()

    if len(impls) == 2:
        # A/B: alternate the two in one process so that load from other processes on a shared
        # machine hits both alike; report the median of per-pair ratios.
        steps = [make_step(impl, args.local_batch, args.batch) for impl in impls]
        pairs = [[timed(step) for step in steps] for _ in range(args.repeats)]
        return {
            "impls": impls,
            "wall_ratio": statistics.median(p[1][0] / p[0][0] for p in pairs),
            "cpu_ratio": statistics.median(p[1][1] / p[0][1] for p in pairs),
            "wall_s": [statistics.median(p[k][0] for p in pairs) for k in (0, 1)],
            "cpu_s": [statistics.median(p[k][1] for p in pairs) for k in (0, 1)],
            "repeats": len(pairs),
        }

    step = make_step(impls[0], args.local_batch, args.batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    times, cpu_times = [], []
    budget_start = time.perf_counter()
    for _ in range(args.repeats):
        wall, cpu = timed(step)
        times.append(wall)
        cpu_times.append(cpu)
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


def run_child(args: argparse.Namespace, impl: str, b: int, b_local: int, repeats: int):
    """(result dict, None) or (None, why it failed)."""
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--batch", str(b),
           "--local-batch", str(b_local), "--kind", args.kind, "--device", args.device,
           "--tile-size", str(args.tile_size), "--repeats", str(repeats),
           "--max-seconds", str(args.max_seconds)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout {args.timeout} s"
    if proc.returncode != 0:
        # Killed for memory (-9) or an error: the row says so instead of aborting the table.
        return None, f"failed (rc {proc.returncode}): {proc.stderr.strip()[-200:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def measure(args: argparse.Namespace, impl: str, b: int, b_local: int) -> dict:
    row = {"impl": impl, "kind": args.kind, "global_batch": b, "local_batch": b_local}
    if impl in PLAIN_BLOCKS:
        predicted = PLAIN_BLOCKS[impl] * b_local * b * 4
        if predicted > args.max_plain_gib * 2**30:
            row["skipped"] = f"predicted {predicted / 2**30:.0f} GiB > budget"
            return row
    result, failure = run_child(args, impl, b, b_local, args.repeats)
    if failure:
        row["skipped"] = failure
    else:
        row.update(result)
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
    parser.add_argument("--impls", default="open_clip,plain,tiled")
    parser.add_argument("--batches", type=str, default=None,
                        help="comma-separated global batches (default: 1024..32768)")  # fmt: skip
    parser.add_argument("--per-rank", type=str, default=None,
                        help="comma-separated LOCAL:GLOBAL tiled per-rank rows "
                             "(default: 1024:262144 in full mode)")  # fmt: skip
    parser.add_argument("--ab", type=str, default=None,
                        help="comma-separated batches for an interleaved open_clip vs tiled "
                             "timing (default: 8192 in full mode)")  # fmt: skip
    parser.add_argument("--ab-repeats", type=int, default=5)
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

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    if args.quick:
        batches, per_rank, ab, args.repeats = [1024], [(256, 2048)], [], 2
    else:
        batches, per_rank, ab = [1024 * 2**i for i in range(6)], [(1024, 262144)], [8192]
    if args.batches is not None:
        batches = ints(args.batches)
    if args.per_rank is not None:
        per_rank = [tuple(ints(x.replace(":", ","))) for x in args.per_rank.split(",") if x]
    if args.ab is not None:
        ab = ints(args.ab)
    impls = args.impls.split(",")

    rows, ab_rows = [], []
    started = time.perf_counter()
    for b in batches:
        for impl in impls:
            if impl == "tiled" and b > args.max_tiled_batch:
                continue
            rows.append(measure(args, impl, b, b))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if "tiled" in impls:
        for b_local, b in per_rank:
            rows.append(measure(args, "tiled", b, b_local))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    for b in ab:
        result, failure = run_child(args, "open_clip,tiled", b, b, args.ab_repeats)
        ab_rows.append({"global_batch": b, **(result or {"skipped": failure})})
        print(ab_rows[-1], flush=True)

    print()
    print(f"{args.kind} loss, D={EMBED_DIM}, tile {args.tile_size}, device {args.device}, "
          f"{os.cpu_count()} CPUs; {time.perf_counter() - started:.0f} s")  # fmt: skip
    print()
    print(table(rows))
    for r in ab_rows:
        if "skipped" in r:
            print(f"\nA/B at B={r['global_batch']}: {r['skipped']}")
        else:
            print(f"\nA/B at B={r['global_batch']}, tiled / open_clip over {r['repeats']} "
                  f"interleaved pairs (median): wall {r['wall_ratio']:.2f}x, "
                  f"CPU {r['cpu_ratio']:.2f}x (open_clip {r['wall_s'][0]:.2f} s, "
                  f"tiled {r['wall_s'][1]:.2f} s wall)")  # fmt: skip
    out = args.out or RESULTS_DIR / f"loss_memory_{args.kind}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"embed_dim": EMBED_DIM, "tile_size": args.tile_size, "device": args.device,
            "cpus": os.cpu_count(), "platform": platform.platform(), "quick": args.quick}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows, "ab": ab_rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
