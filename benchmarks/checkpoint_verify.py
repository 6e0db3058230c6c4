"""What checkpoint verification costs next to the save and the resume it protects.

Writes real accelerate checkpoints with clip_train.checkpoint.save_checkpoint (one process, CPU):
the demo model (configs/demo.yaml's model with its AdamW state) and a plain stack of linear
layers sized to ~1 GB with its AdamW state. For each it times, in one run, side by side:
  save_state     accelerator.save_state alone
  manifest       checksumming every file for the manifest (the extra cost of a save)
  load_state cold   accelerator.load_state with the files evicted from the page cache first
                    (posix_fadvise DONTNEED on our files only): a resume without verification
  verify cold       verify_checkpoint, evicted likewise, as after a restart on a new node, in a
                    fresh process (train.py verifies before it builds the model)
  verify cold + load  the resume with verification: verify, then load_state (now from the cache)
  verify warm       verify_checkpoint with the files cached (as right after a download)
  sizes only        what every process but one per disk checks
  CPU s             CPU seconds (all threads) of the cold verify and of the cold load_state
and the throughput of the checksums the standard library offers on the same files (crc32, adler32,
sha256, blake2b), which is why the manifest uses CRC32.

    python benchmarks/checkpoint_verify.py             # demo + 1 GB
    python benchmarks/checkpoint_verify.py --gb 0.2    # a smaller big one
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table  # noqa: E402

from clip_train.checkpoint import build_manifest, save_checkpoint, verify_checkpoint  # noqa: E402


def evict(directory: Path) -> None:
    """Drop our files' pages from the page cache (not the machine's whole cache)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads): on a shared, busy machine the
    CPU time is the steadier of the two."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def demo_model() -> nn.Module:
    import open_clip

    from clip_train.model import DualEncoder

    open_clip.add_model_config("configs/models/demo-vit.json")
    return DualEncoder(open_clip.create_model("demo-vit"))


def big_model(gb: float) -> nn.Module:
    """Linear layers whose weights plus AdamW's two moments take ~`gb` GB (3 float32 copies)."""
    width = 2048
    layers = max(1, round(gb * 1e9 / (3 * 4 * width * width)))
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def checkpoint_of(model: nn.Module, folder: Path) -> tuple[Accelerator, Path, float]:
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    for p in model.parameters():  # one step, so that AdamW holds its moments
        p.grad = torch.zeros_like(p)
    optimizer.step()
    save_s = timed(lambda: accelerator.save_state(str(folder / "plain")))
    path = save_checkpoint(accelerator, str(folder), step=1, keep=2, run_id="bench")
    return accelerator, path, save_s


def checksum_rates(directory: Path) -> dict[str, float]:
    """GB/s of each checksum over the checkpoint's files (warm cache, one thread)."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    rates = {}
    for name in ("crc32", "adler32", "sha256", "blake2b"):
        def run(name=name):
            buf = bytearray(1 << 20)  # the chunk clip_train.checkpoint reads
            view = memoryview(buf)
            for p in files:
                with open(p, "rb", buffering=0) as f:
                    if name in ("crc32", "adler32"):
                        value = 0 if name == "crc32" else 1
                        while n := f.readinto(buf):
                            value = getattr(zlib, name)(view[:n], value)
                    else:
                        h = hashlib.new(name)
                        while n := f.readinto(buf):
                            h.update(view[:n])
        run()  # warm
        rates[name] = total / 1e9 / timed(run)
    return rates


def verify_elsewhere(path: Path) -> dict[str, float]:
    """Verify in a fresh process, as train.py does before it builds the model: here, PyTorch's
    worker threads, still spinning after the load, would take the CPU from the checksums."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--verify-only", str(path)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _verify_only(path: Path) -> None:
    import json

    cold_s, cold_cpu = timed_cpu(lambda: verify_checkpoint(path))
    warm_s = timed(lambda: verify_checkpoint(path))
    sizes_s = timed(lambda: verify_checkpoint(path, checksums=False))
    print(json.dumps({"cold_s": cold_s, "cold_cpu": cold_cpu, "warm_s": warm_s, "sizes_s": sizes_s}))


def measure(label: str, model: nn.Module, folder: Path, repeats: int) -> tuple[list, list]:
    """One checkpoint's row of each table: medians over `repeats` alternating trials (a shared,
    busy machine moves single timings by 2x)."""
    accelerator, path, save_s = checkpoint_of(model, folder)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    manifest_s = statistics.median(timed(lambda: build_manifest(path, 1, "bench")) for _ in range(repeats))
    trials = []
    for _ in range(repeats):
        evict(path)
        load_s, load_cpu = timed_cpu(lambda: accelerator.load_state(str(path)))
        evict(path)
        verified = verify_elsewhere(path)  # cold, then warm
        then_load_s = timed(lambda: accelerator.load_state(str(path)))  # the resume after verifying
        trials.append({"load_s": load_s, "load_cpu": load_cpu, "resume_s": verified["cold_s"] + then_load_s,
                       **verified})
    m = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
    row = [label, f"{size / 1e6:.1f}", f"{save_s:.3f}", f"{manifest_s:.3f}", f"{m['load_s']:.3f}",
           f"{m['cold_s']:.3f}", f"{m['warm_s']:.3f}", f"{m['sizes_s'] * 1e3:.2f} ms", f"{m['resume_s']:.3f}",
           f"{m['resume_s'] / m['load_s']:.2f}", f"{m['cold_cpu']:.2f} / {m['load_cpu']:.2f}"]
    rates = checksum_rates(path)
    rate_row = [label, *(f"{rates[k]:.2f}" for k in ("crc32", "adler32", "sha256", "blake2b")),
                f"{rates['crc32'] / rates['sha256']:.2f}", f"{rates['crc32'] / rates['blake2b']:.2f}"]
    return row, rate_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the big checkpoint")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3, help="trials per timing (medians are shown)")
    parser.add_argument("--verify-only", default=None, help=argparse.SUPPRESS)  # verify_elsewhere's process
    args = parser.parse_args()
    if args.verify_only:
        return _verify_only(Path(args.verify_only))
    rows, rate_rows = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for label, make in (("demo", demo_model), (f"linear {args.gb:g} GB", lambda: big_model(args.gb))):
            row, rate_row = measure(label, make(), Path(tmp) / label.replace(" ", "_"), args.repeats)
            rows.append(row)
            rate_rows.append(rate_row)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"seconds unless stated, medians of {args.repeats} trials\n")
    print(markdown_table(["checkpoint", "MB", "save_state", "manifest (CRC32)", "load_state cold", "verify cold",
                          "verify warm", "sizes only", "verify cold + load", "(verify + load) / load",
                          "CPU s: verify / load"], rows))
    print("\nchecksum throughput on the same files, GB/s (warm cache, one thread):\n")
    print(markdown_table(["checkpoint", "crc32", "adler32", "sha256", "blake2b", "crc32/sha256", "crc32/blake2b"],
                         rate_rows))


if __name__ == "__main__":
    main()
