"""Run every benchmark and write one report: `benchmarks/results/<date>-<host>.md` with all tables, and
PNG plots next to it (peak memory vs global batch for the losses; step time vs chunk size).

Benchmarks, each a separate process (in this order, so that the heavy trainer runs come last):
loss_memory.py, data_throughput.py, gradcache.py, train_throughput.py, quality.py. A benchmark that
fails is reported as failed (with its last output lines) and the others still run.

    python benchmarks/run_all.py --quick         # every benchmark's --quick mode (~10 min on 2 busy cores)
    python benchmarks/run_all.py                 # full modes (much longer: see each script)
    python benchmarks/run_all.py --only gradcache,train_throughput
    python benchmarks/run_all.py --only negatives --quick   # optional benchmarks run only when named
    python benchmarks/run_all.py --replot        # rebuild the report from the latest JSON results, no runs

Quick mode writes `<date>-<host>-quick.md`, so it never overwrites a full report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

BENCHMARKS = ("loss_memory", "data_throughput", "gradcache", "train_throughput", "quality")
# Run only when named with --only (long, and not part of issue 9's set).
OPTIONAL = ("negatives",)
# Ours write a "markdown" field in their JSON; the others' tables are taken from their stdout.
OWN = ("gradcache", "train_throughput", "quality")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark in --quick mode")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS + OPTIONAL)}"
    )
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="no runs: rebuild the report and plots from the JSON files in results/",
    )
    return parser.parse_args(argv)


def command(name: str, quick: bool) -> list[str]:
    return [sys.executable, str(h.BENCH_DIR / f"{name}.py"), *(["--quick"] if quick else [])]


def run_benchmark(name: str, quick: bool, timeout: float) -> dict:
    started = time.perf_counter()
    print(f"== {name} {'(quick)' if quick else ''}", flush=True)
    try:
        proc = subprocess.run(
            command(name, quick), cwd=h.REPO, capture_output=True, text=True, timeout=timeout
        )
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        code, stdout, stderr = (
            -1,
            _text(err.stdout),
            _text(err.stderr) + f"\ntimed out after {timeout:.0f} s",
        )
    elapsed = time.perf_counter() - started
    print(f"   {'ok' if code == 0 else f'FAILED ({code})'} in {elapsed:.0f} s", flush=True)
    return {
        "name": name,
        "returncode": code,
        "seconds": elapsed,
        "stdout": stdout,
        "stderr": stderr,
        "command": "python "
        + " ".join(
            str(Path(c).relative_to(h.REPO)) if c.startswith(str(h.REPO)) else c
            for c in command(name, quick)[1:]
        ),
    }


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def summary_from_stdout(stdout: str) -> str:
    """A script's closing summary: what it prints after its first blank line, minus 'wrote' lines."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if not line.strip()), -1) + 1
    kept = [line for line in lines[start:] if not line.startswith("wrote ")]
    return "\n".join(kept).strip()


def own_result(name: str, quick: bool) -> dict | None:
    path = h.RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def latest_json(prefix: str, since: float) -> Path | None:
    """The newest results/<prefix>*.json written at or after `since` (a Unix time)."""
    found = [p for p in h.RESULTS_DIR.glob(f"{prefix}*.json") if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ------------------------------------------------------------------------------------------------
# Plots


def _plain_ticks(ax, values: list[int]) -> None:
    """Tick marks at the measured x values, written as plain integers (not 2^k)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())


def plot_loss_memory(path: Path, output: Path) -> str | None:
    """Peak extra memory vs global batch, one line per loss implementation (single-process rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(path.read_text()).get("rows", [])
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if "peak_extra_bytes" in r and r.get("local_batch", r.get("global_batch")) == r.get(
            "global_batch"
        ):
            series.setdefault(r["impl"], []).append(
                (r["global_batch"], r["peak_extra_bytes"] / 2**30)
            )
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_ticks(ax, sorted({p[0] for points in series.values() for p in points}))
    ax.set_xlabel("global batch")
    ax.set_ylabel("peak extra memory of loss fwd+bwd (GiB)")
    ax.set_title("Contrastive loss memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output.name


def plot_step_time(result: dict, output: Path) -> str | None:
    """Step time (and its ratio to the unchunked step) vs chunk size, from gradcache.py's part 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("step_time", [])
    if not rows:
        return None
    batch = rows[0]["batch"]
    points = sorted(((r["chunk"] or batch), r["wall_s"], r["ratio"]) for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="step time")
    ax.set_xscale("log", base=2)
    _plain_ticks(ax, [p[0] for p in points])
    ax.set_xlabel(f"chunk size (batch {batch}; {batch} = no chunking)")
    ax.set_ylabel("forward + backward per step (s)")
    unchunked = next(p[1] for p in points if p[0] == batch)
    ax.axhline(unchunked * 4 / 3, color="gray", linestyle="--", label="unchunked x 4/3 (theory)")
    ax.axhline(unchunked * 1.4, color="red", linestyle=":", label="unchunked x 1.4 (target)")
    ax.set_ylim(bottom=0)
    ax.set_title("Gradient cache: step time vs chunk size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output.name


# ------------------------------------------------------------------------------------------------


def build_report(
    runs: list[dict], quick: bool, since: float, stem: str, replot: bool = False
) -> str:
    info = h.machine_info()
    machine = h.describe_machine(info)
    if replot:  # the load now says nothing about the stored runs; each section gives its own
        machine = machine.split("; load average")[0]
    how = (
        "Assembled by `python benchmarks/run_all.py --replot"
        + (" --quick" if quick else "")
        + "` from the "
        "stored results in benchmarks/results/; each section names the command that produced it."
        if replot
        else "Reproduce: `python benchmarks/run_all.py" + (" --quick" if quick else "") + "` "
        "(each section names its own script)."
    )
    parts = [
        f"# Benchmarks {datetime.date.today().isoformat()} on {info['host']}{' (quick mode)' if quick else ''}",
        "",
        f"Machine: {machine}; {info['platform']}, Python {info['python']}, "
        f"accelerate {info.get('accelerate', '?')}, webdataset {info.get('webdataset', '?')}.",
        "",
        how,
        "",
    ]
    plots = []
    loss_json = latest_json("loss_memory", since)
    if loss_json is not None:
        name = plot_loss_memory(loss_json, h.RESULTS_DIR / f"{stem}-loss-memory.png")
        if name:
            plots.append(("Peak memory vs global batch, contrastive losses", name))
    grad = own_result("gradcache", quick)
    if grad is not None:
        name = plot_step_time(grad, h.RESULTS_DIR / f"{stem}-step-time-vs-chunk.png")
        if name:
            plots.append(("Step time vs chunk size", name))

    for run in runs:
        result = own_result(run["name"], quick) if run["name"] in OWN else None
        took = f" ({run['seconds']:.0f} s)" if run["seconds"] else ""
        # A replotted report names the command(s) that produced the stored results.
        shown = (
            result["command"]
            if result and not run["seconds"] and result.get("command")
            else run["command"]
        )
        parts += [f"## {run['name']}", "", f"`{shown}`{took}", ""]
        if run["returncode"] != 0:
            tail = "\n".join((run["stdout"] + "\n" + run["stderr"]).strip().splitlines()[-15:])
            parts += [
                f"**Failed** (exit {run['returncode']}); last lines:",
                "",
                "```",
                tail,
                "```",
                "",
            ]
            continue
        parts += [result["markdown"] if result else summary_from_stdout(run["stdout"]), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{title}]({name})\n" for title, name in plots]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [
        n
        for n in (args.only.split(",") if args.only else BENCHMARKS)
        if n not in args.skip.split(",")
    ]
    unknown = [n for n in names if n not in BENCHMARKS + OPTIONAL]
    if unknown:
        raise SystemExit(
            f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS + OPTIONAL)}"
        )
    since = time.time()
    h.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if args.replot:
        since = 0.0
        runs = [
            {
                "name": n,
                "returncode": 0,
                "seconds": 0.0,
                "stdout": "",
                "command": " ".join(
                    ["python", f"benchmarks/{n}.py", *(["--quick"] if args.quick else [])]
                ),
            }
            for n in names
            if n in OWN
        ]
    else:
        runs = [run_benchmark(name, args.quick, args.timeout) for name in names]
    stem = f"{datetime.date.today().isoformat()}-{socket.gethostname()}{'-quick' if args.quick else ''}"
    report = build_report(runs, args.quick, since, stem, replot=args.replot)
    path = h.RESULTS_DIR / f"{stem}.md"
    path.write_text(report + "\n")
    print(report)
    print(f"\nwrote {path}")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
