"""Pictures of a run: the curves a user looks at first, drawn from `metrics.jsonl` into one PNG,
and a small self-contained HTML page (the PNG embedded, the final numbers, the resolved config).

`clip-train report RUN_DIR` writes `RUN_DIR/report.png` and `RUN_DIR/report.html`; training
writes them at its end. Works while a run is still going (a partial last line is skipped) and on
resumed runs (a run resumed from a checkpoint older than its last logged step logs those steps
again: the last value logged for a step wins, as in TensorBoard and the W&B charts).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from clip_train.config import ClipTrainError

log = logging.getLogger("clip_train")

REPORT_PNG, REPORT_HTML = "report.png", "report.html"

# Training curves, in reading order: (panel title, metric keys drawn in it).
TRAIN_PANELS = (
    ("loss", ("loss",)),
    ("learning rate", ("lr",)),
    ("logit scale = 1 / temperature", ("logit_scale",)),
    ("gradient norm", ("grad_norm",)),
    ("throughput (samples/s, all processes)", ("samples_per_s",)),
    ("data-wait fraction", ("data_wait_fraction",)),
    ("peak memory per process (GiB)", ("peak_memory_gib", "peak_rss_gib")),
    ("batch alignment (lower: pairs closer)", ("health/alignment",)),
    ("batch uniformity (lower: more spread)", ("health/uniformity",)),
    ("InfoNCE MI lower bound (nats)", ("health/mi_lower_bound",)),
    ("bad samples (cumulative)", ("data/bad_samples",)),
)
# Logged but not drawn: redundant with a drawn curve, counters, or constants of the run.
NOT_DRAWN = {"temperature", "samples_per_s_per_process", "samples_seen", "skipped_steps", "health/candidates",
             "data/samples_read"}
NOT_DRAWN_PREFIXES = ("data/bad/",)
COUNT_SUFFIXES = ("num_samples", "num_images", "num_texts", "num_classes")
# Noisy per-step curves: above SMOOTH_ABOVE_POINTS points, drawn faint with a centred moving
# average on top (deterministic ones such as the learning rate are drawn as they are).
SMOOTHED = {"loss", "grad_norm", "samples_per_s", "data_wait_fraction", "health/alignment", "health/uniformity",
            "health/mi_lower_bound"}
SMOOTH_ABOVE_POINTS = 100


class ReportError(ClipTrainError):
    """No report can be drawn (no metrics file, or nothing logged yet)."""


@dataclass
class Panel:
    title: str
    keys: list[str]


def read_series(path: str | os.PathLike) -> tuple[dict[str, dict[int, float]], int]:
    """Every numeric metric of a metrics.jsonl as {key: {step: value}}, and the number of lines
    skipped because they do not parse (the partial last line of a running job, or the line a
    killed job left half-written, which the resumed job then appends to).

    The last value logged for a step wins: steps logged again after a resume replace the old ones.
    Non-finite values (written as strings "nan"/"inf") become NaN: a gap in the curve."""
    series: dict[str, dict[int, float]] = {}
    skipped = 0
    with open(path, errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                skipped += int(bool(line.strip()))
                continue
            for key, value in row.items():
                if key in ("step", "time"):
                    continue
                number = _number(value)
                if number is not None:
                    series.setdefault(key, {})[step] = number
    return {k: dict(sorted(v.items())) for k, v in series.items()}, skipped


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:  # a text value: nothing to draw
        return None
    return number if math.isfinite(number) else math.nan


def panels(series: dict[str, dict[int, float]]) -> list[Panel]:
    """The panels to draw for the metrics present: the training curves, then every other metric
    (evaluations: `zeroshot/...`, `retrieval/...`, `val/...`), grouped by name.

    An evaluation's scores in [0, 1] (accuracies, recalls) share one panel per prefix
    (`zeroshot/imagenet`); its other metrics get a panel per name stem (`retrieval/uniformity`
    with `retrieval/uniformity_image`), so that one scale fits each panel."""
    drawn = [p for p in (Panel(t, [k for k in keys if _has_values(series, k)]) for t, keys in TRAIN_PANELS) if p.keys]
    if "data/bad_samples" in series and not any(v for v in series["data/bad_samples"].values()):
        drawn = [p for p in drawn if p.keys != ["data/bad_samples"]]  # an all-zero line says nothing
    known = {k for _, keys in TRAIN_PANELS for k in keys} | NOT_DRAWN
    groups: dict[str, list[str]] = {}
    for key in series:
        if (key in known or key.startswith(NOT_DRAWN_PREFIXES) or key.endswith(COUNT_SUFFIXES)
                or not _has_values(series, key)):
            continue
        prefix, _, name = key.rpartition("/")
        values = [v for v in series[key].values() if math.isfinite(v)]
        if prefix and all(0.0 <= v <= 1.0 for v in values) and not name.startswith(("loss", "alignment", "uniformity")):
            group = prefix
        else:
            group = f"{prefix}/{name.split('_')[0]}" if prefix else name
        groups.setdefault(group, []).append(key)
    return drawn + [Panel(title, keys) for title, keys in groups.items()]


def _has_values(series: dict[str, dict[int, float]], key: str) -> bool:
    return any(math.isfinite(v) for v in series.get(key, {}).values())


def final_numbers(series: dict[str, dict[int, float]]) -> dict[str, tuple[int, float]]:
    """The last finite value of every metric and the step it was logged at: evaluations first,
    then the training metrics."""
    training = {k for _, keys in TRAIN_PANELS for k in keys} | NOT_DRAWN
    out = {}
    for key in sorted(series, key=lambda k: k in training or k.startswith(("health/", "data/"))):
        finite = [(s, v) for s, v in series[key].items() if math.isfinite(v)]
        if finite:
            out[key] = finite[-1]
    return out


def draw(series: dict[str, dict[int, float]], title: str, columns: int = 3):
    """One matplotlib Figure (Agg canvas, no pyplot: safe in a training process) with a panel per
    group of `panels(series)`, each curve against the optimizer step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = panels(series)
    if not layout:
        raise ReportError("no metric to draw yet")
    all_steps = [s for by_step in series.values() for s in by_step]
    first, last = min(all_steps), max(all_steps)
    pad = max(0.5, 0.02 * (last - first))  # one step axis for every panel, evaluations included
    columns = min(columns, len(layout))
    rows = math.ceil(len(layout) / columns)
    fig = Figure(figsize=(4.4 * columns, 2.9 * rows + 0.5), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    for i, panel in enumerate(layout):
        ax = fig.add_subplot(rows, columns, i + 1)
        for key in panel.keys:
            steps = list(series[key])
            values = [series[key][s] for s in steps]
            # Evaluations come every few hundred steps, sometimes only at the end: mark points.
            style = {"marker": "o", "markersize": 3} if len(steps) <= 40 else {}
            label = key.rsplit("/", 1)[-1] if len(panel.keys) > 1 else None
            if key in SMOOTHED and len(steps) > SMOOTH_ABOVE_POINTS:
                ax.plot(steps, values, linewidth=0.8, alpha=0.3, color="C0")
                ax.plot(steps, moving_average(values, max(5, len(values) // 30)), linewidth=1.4, color="C0")
            else:
                ax.plot(steps, values, linewidth=1.2, label=label, **style)
        finite = [v for k in panel.keys for v in series[k].values() if math.isfinite(v)]
        if panel.keys == ["grad_norm"] and finite and min(finite) > 0 and max(finite) / min(finite) > 50:
            ax.set_yscale("log")  # early spikes would flatten the rest of the curve
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # "1e-14+1e-2" helps nobody
        ax.set_xlim(first - pad, last + pad)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(panel.keys) > 1:
            ax.legend(fontsize=7, loc="best")
    return fig


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred mean over `window` points (fewer at the ends), NaN points left out."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, x, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    i = np.arange(len(x))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window // 2 + 1, len(x))
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return list(np.where(n > 0, (sums[hi] - sums[lo]) / n, np.nan))


def render_html(title: str, status: str, png: bytes, numbers: dict[str, tuple[int, float]],
                config_text: str | None) -> str:
    rows = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td><td>{s}</td></tr>"
                     for k, (s, v) in numbers.items())
    config = (f"<pre>{html.escape(config_text)}</pre>" if config_text is not None
              else "<p>config.yaml not found in the run directory.</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1400px}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
td:nth-child(2),td:nth-child(3){{text-align:right;font-family:monospace}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{html.escape(status)}</p>
<img alt="training curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Final numbers</h2>
<table><tr><th>metric</th><th>last value</th><th>at step</th></tr>
{rows}
</table>
<h2>Resolved config (config.yaml)</h2>
{config}
</body></html>
"""


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def write_report(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Draw `run_dir/metrics.jsonl` into `report.png` and `report.html` (in `output_dir`, default
    the run directory); returns their paths. Both files are replaced atomically, so a reader (or
    an upload) never sees half a file while a running job rewrites them."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run}: no metrics.jsonl (give a run's train.output_dir)")
    series, skipped = read_series(metrics)
    if not any(series.values()):
        raise ReportError(f"{metrics}: no metrics logged yet")
    if skipped:
        log.warning("report: skipped %d unreadable line(s) of %s (a partial last line while the "
                    "run is writing, or one left by a killed job)", skipped, metrics)
    config_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else None
    last_step = max((max(v) for v in series.values() if v), default=0)
    planned = _planned_steps(config_text)
    status = f"step {last_step}" + (f" of {planned}" if planned else "")
    status += f"; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {metrics}"
    title = f"clip-train report: {run.resolve().name}"
    fig = draw(series, f"{run.resolve().name} — step {last_step}" + (f" of {planned}" if planned else ""))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = compact_png(buf.getvalue())
    out = Path(output_dir) if output_dir is not None else run
    out.mkdir(parents=True, exist_ok=True)
    page = render_html(title, status, png, final_numbers(series), config_text)
    return _replace(out / REPORT_PNG, png), _replace(out / REPORT_HTML, page.encode())


def compact_png(png: bytes) -> bytes:
    """The same picture with a 256-colour palette: line plots lose nothing visible and the file
    (and the HTML page that embeds it) shrinks ~3x."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(png) else png


def _planned_steps(config_text: str | None) -> int | None:
    if config_text is None:
        return None
    import yaml

    try:
        return int(yaml.safe_load(config_text)["train"]["steps"])
    except Exception:  # an older or hand-edited config: the status line just omits it
        return None


def _replace(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_report_safely(run_dir: str | os.PathLike) -> Path | None:
    """The end-of-training report: a failure is a warning, never the end of a finished run."""
    try:
        png, _ = write_report(run_dir)
    except Exception as err:  # the report is a convenience: the run's results are already written
        log.warning("could not write the report of %s: %s: %s (retry with `clip-train report %s`)",
                    run_dir, type(err).__name__, err, run_dir)
        return None
    log.info("report: %s (and %s)", png, png.with_name(REPORT_HTML))
    return png
