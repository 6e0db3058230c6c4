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

Ring rows (`loss.impl=ring`, no gather):
- simulated: one rank of a ring of W = global / local processes whose other members are simulated
  (every chunk it receives is made locally; it computes every tile its rank would), so its peak
  memory is one rank's at any global batch, communication aside. A straight line fitted to the
  rows at W = 2 (peak vs local batch) extrapolates to local batches too slow to run here;
- real: N gloo processes (`accelerate launch`, 1 thread each), ring and tiled, the peak of the
  largest rank; and an A/B timing, ring vs tiled alternated step by step in one launch.

    python benchmarks/loss_memory.py            # full: B = 1024 ... 32768 (+ per-rank, ring rows)
    python benchmarks/loss_memory.py --quick    # seconds: small batches, a smoke test
    python benchmarks/loss_memory.py --impls ring   # the ring rows only
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

    from clip_train.loss import contrastive_loss
    from clip_train.loss.contrastive import _clip_ring, _clip_tiled, _siglip_ring, _siglip_tiled

    torch.manual_seed(0)
    device = torch.device(args.device)
    d = EMBED_DIM
    if args.real:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # env:// set by the launcher

    class SimulatedRing:
        """Rank 0 of a ring of `world` processes, the others simulated: what it receives is made
        here (random unit rows, or random gradients), what it sends goes nowhere."""

        def __init__(self, world: int):
            self.rank, self.world = 0, world

        def shift(self, send, recv, tag):
            for t in recv:
                t.normal_().div_(t.norm(dim=1, keepdim=True))
            return []

    def make_step(impl: str, b: int, g: int):
        img = torch.randn(b, d, device=device, requires_grad=True)
        txt = torch.randn(b, d, device=device, requires_grad=True)
        scale = torch.tensor(2.659, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        # A per-rank row (b < g): the other ranks' gathered columns, as plain tensors (not for
        # the ring, and not in a real process group, where contrastive_loss gathers them).
        per_rank = b != g and impl != "ring" and not args.real
        extra = [torch.randn(g - b, d, device=device) for _ in range(2)] if per_rank else None
        leaves = (img, txt, scale, bias)
        if impl == "open_clip":
            from open_clip.loss import ClipLoss, SigLipLoss

            oc_loss = ClipLoss() if args.kind == "clip" else SigLipLoss()

        def step() -> None:
            if impl == "ring" and not args.real:
                # What contrastive_loss runs on each rank (the kernels normalise).
                s = scale.exp().clamp(max=100)
                ring = SimulatedRing(g // b)
                if args.kind == "clip":
                    loss = _clip_ring(img, txt, s, args.tile_size, ring)
                else:
                    loss = _siglip_ring(img, txt, s, bias, args.tile_size, ring)
            elif impl == "open_clip":
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
        if args.real:
            dist.barrier()  # every rank starts together: the slowest sets the step time
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    impls = args.impl.split(",")
    for impl in impls:  # warm-up: lazy inits, thread pools
        world = args.batch // args.local_batch
        warm = min(256, args.local_batch)
        # The simulated ring warms up with one peer: a warm-up as long as the run is no warm-up.
        make_step(impl, warm, warm * min(world, 2) if impl == "ring" else min(256, args.batch))()

    if len(impls) == 2:
        # A/B: alternate the two in one process so that load from other processes on a shared
        # machine hits both alike; report the median of per-pair ratios.
        steps = [make_step(impl, args.local_batch, args.batch) for impl in impls]
        pairs = [[timed(step) for step in steps] for _ in range(args.repeats)]
        if args.real and dist.get_rank() != 0:
            return None
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
        reset_rss_peak()
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
        # The kernel's RSS counters are per-CPU approximations (off by up to a few hundred KiB),
        # so a step that allocates nothing new can read slightly below its base: that is 0.
        peak = max(0, rss_peak_bytes() - base)
    result = {
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "repeats": len(times),
        "peak_extra_bytes": peak,
    }
    if args.real:
        # The largest rank's peak; the times of rank 0 (every step is collective).
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
        result.update(peak_extra_bytes=max(peaks), peak_extra_bytes_per_rank=peaks)
        if dist.get_rank() != 0:
            return None
    return result


def ab_line(r: dict, what: str, names: tuple[str, str], per: str = "") -> str:
    """An A/B row in one line: why it was skipped, or the median ratios of its interleaved pairs
    (names: the reference, then the one measured against it)."""
    if "skipped" in r:
        return f"{what}: {r['skipped']}"
    return (f"{what}, {names[1]} / {names[0]} over {r['repeats']} interleaved pairs (median): wall "
            f"{r['wall_ratio']:.2f}x, CPU {r['cpu_ratio']:.2f}x ({names[0]} {r['wall_s'][0]:.2f} s, "
            f"{names[1]} {r['wall_s'][1]:.2f} s wall{per})")


def reset_rss_peak() -> None:
    """Start the process's RSS high-water mark afresh (Linux >= 4.0), so that the peak is the
    measured steps' own and not the warm-up's or the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the lifetime peak (ru_maxrss) stands in


def rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_child(args: argparse.Namespace, impl: str, b: int, b_local: int, repeats: int,
              processes: int = 0):  # fmt: skip
    """(result dict, None) or (None, why it failed). processes > 0: that many real processes."""
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--batch", str(b),
           "--local-batch", str(b_local), "--kind", args.kind, "--device", args.device,
           "--tile-size", str(args.tile_size), "--repeats", str(repeats),
           "--max-seconds", str(args.max_seconds)]  # fmt: skip
    env = None
    if processes:
        # N gloo processes on the CPU, one thread each (the machine's cores are shared).
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", "0"]  # fmt: skip
        cmd = [*launch, *cmd[1:], "--real"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timeout {args.timeout} s"
    if proc.returncode != 0:
        # Killed for memory (-9) or an error: the row says so instead of aborting the table.
        return None, f"failed (rc {proc.returncode}): {proc.stderr.strip()[-200:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def measure(args: argparse.Namespace, impl: str, b: int, b_local: int, processes: int = 0) -> dict:
    row = {"impl": impl, "kind": args.kind, "global_batch": b, "local_batch": b_local}
    if impl == "ring" or processes:
        row["processes"] = processes or f"{b // b_local} (simulated)"
    if impl in PLAIN_BLOCKS:
        predicted = PLAIN_BLOCKS[impl] * b_local * b * 4
        if predicted > args.max_plain_gib * 2**30:
            row["skipped"] = f"predicted {predicted / 2**30:.0f} GiB > budget"
            return row
    result, failure = run_child(args, impl, b, b_local, args.repeats, processes)
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


def ring_table(rows: list[dict]) -> str:
    lines = [
        "| impl | processes | global B | local B | fwd+bwd wall s (median, n) | CPU s "
        "| peak extra GiB (largest rank) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "time_s" not in r:
            cells = [r["skipped"], "", ""]
        else:
            cells = [f"{r['time_s']:.3f} ({r['repeats']})", f"{r['cpu_s']:.2f}",
                     f"{r['peak_extra_bytes'] / 2**30:.3f}"]  # fmt: skip
        lines.append(f"| {r['impl']} | {r['processes']} | {r['global_batch']} | {r['local_batch']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def fit_ring_memory(rows: list[dict], tile_size: int) -> dict | None:
    """Least-squares line peak = a * local_batch + c through the simulated ring rows at 2 ranks
    (the peak does not depend on the number of ranks: the 1024-local rows show it) with a local
    batch of at least one tile (below, the chunks and tiles shrink with it), evaluated at local
    131072, a 1048576 batch over 8 ranks. None with fewer than 2 such rows."""
    points = [(r["local_batch"], r["peak_extra_bytes"]) for r in rows
              if r["impl"] == "ring" and r.get("processes") == "2 (simulated)"
              and r["local_batch"] >= tile_size and "peak_extra_bytes" in r]  # fmt: skip
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    constant = mean_y - slope * mean_x
    return {"rows": len(points), "bytes_per_row": slope, "constant_bytes": constant,
            "predicted_131072_bytes": slope * 131072 + constant}  # fmt: skip


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
    parser.add_argument("--ring-sim", type=str, default=None,
                        help="comma-separated LOCAL:GLOBAL ring rows, other ranks simulated "
                             "(default in full mode: 1024 local to 1048576 global, and the "
                             "fit rows 2048..16384 at 2 ranks)")  # fmt: skip
    parser.add_argument("--ring-real", type=str, default=None,
                        help="comma-separated PROCESSES:LOCAL rows, ring and tiled, real gloo "
                             "processes (default in full mode: 2:1024,4:1024,2:4096,4:4096)")  # fmt: skip
    parser.add_argument("--ring-ab", type=str, default=None,
                        help="comma-separated PROCESSES:LOCAL interleaved tiled vs ring "
                             "timings, real processes (default in full mode: 2:4096)")  # fmt: skip
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
    parser.add_argument("--real", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child(args)
        if result is not None:  # one line per measurement, from rank 0 of a real launch
            print(json.dumps(result), flush=True)
        return

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    def pairs(text: str) -> list[tuple[int, int]]:
        return [tuple(ints(x.replace(":", ","))) for x in text.split(",") if x]

    if args.quick:
        batches, per_rank, ab, args.repeats = [1024], [(256, 2048)], [], 2
        ring_sim, ring_real, ring_ab = [(64, 64), (64, 512), (128, 256)], [(2, 64)], [(2, 64)]
    else:
        batches, per_rank, ab = [1024 * 2**i for i in range(6)], [(1024, 262144)], [8192]
        ring_sim = [(1024, 1024), (1024, 262144), (1024, 1048576)] + [
            (b, 2 * b) for b in (2048, 4096, 8192, 16384)
        ]
        ring_real, ring_ab = [(2, 1024), (4, 1024), (2, 4096), (4, 4096)], [(2, 4096)]
    if args.batches is not None:
        batches = ints(args.batches)
    if args.per_rank is not None:
        per_rank = pairs(args.per_rank)
    if args.ab is not None:
        ab = ints(args.ab)
    ring_sim = ring_sim if args.ring_sim is None else pairs(args.ring_sim)
    ring_real = ring_real if args.ring_real is None else pairs(args.ring_real)
    ring_ab = ring_ab if args.ring_ab is None else pairs(args.ring_ab)
    impls = args.impls.split(",")
    if "ring" not in impls:
        ring_sim, ring_real, ring_ab = [], [], []
    if not {"open_clip", "tiled"} <= set(impls):
        ab = []
    impls = [impl for impl in impls if impl != "ring"]

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
    ring_rows, ring_ab_rows = [], []
    for b_local, b in ring_sim:
        ring_rows.append(measure(args, "ring", b, b_local))
        print(ring_table(ring_rows[-1:]).splitlines()[-1], flush=True)
    for processes, b_local in ring_real:
        for impl in ("ring", "tiled"):
            ring_rows.append(measure(args, impl, processes * b_local, b_local, processes))
            print(ring_table(ring_rows[-1:]).splitlines()[-1], flush=True)
    for processes, b_local in ring_ab:
        b = processes * b_local
        result, failure = run_child(args, "tiled,ring", b, b_local, args.ab_repeats, processes)
        ring_ab_rows.append({"processes": processes, "global_batch": b, "local_batch": b_local,
                             **(result or {"skipped": failure})})  # fmt: skip
        print(ring_ab_rows[-1], flush=True)
    fit = fit_ring_memory(ring_rows, args.tile_size)

    print()
    print(f"{args.kind} loss, D={EMBED_DIM}, tile {args.tile_size}, device {args.device}, "
          f"{os.cpu_count()} CPUs; {time.perf_counter() - started:.0f} s")  # fmt: skip
    print()
    print(table(rows))
    for r in ab_rows:
        print("\n" + ab_line(r, f"A/B at B={r['global_batch']}", ("open_clip", "tiled")))
    if ring_rows:
        print()
        print(ring_table(ring_rows))
    for r in ring_ab_rows:
        where = f"ring A/B, {r['processes']} processes"
        if "skipped" not in r:
            where += f" x {r['local_batch']} (global {r['global_batch']})"
        print("\n" + ab_line(r, where, ("tiled", "ring"), " per step"))
    if fit:
        print(f"\nring memory model (fitted to {fit['rows']} simulated rows at 2 ranks): peak = "
              f"{fit['bytes_per_row'] / 2**20:.3f} MiB x local batch + {fit['constant_bytes'] / 2**30:.3f} GiB; "
              f"local 131072 (a 1048576 batch over 8 ranks): {fit['predicted_131072_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    out = args.out or RESULTS_DIR / f"loss_memory_{args.kind}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"embed_dim": EMBED_DIM, "tile_size": args.tile_size, "device": args.device,
            "cpus": os.cpu_count(), "platform": platform.platform(), "quick": args.quick,
            # glibc's dynamic mmap threshold keeps freed blocks in the heap, so RSS can exceed the
            # live tensors; a fixed threshold (MALLOC_MMAP_THRESHOLD_) returns them at once.
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows, "ab": ab_rows, "ring_rows": ring_rows,
                               "ring_ab": ring_ab_rows, "ring_fit": fit}, indent=1))  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
