"""Quality at equal budget: clip_train's and open_clip's trainers on the demo's handwritten digits,
then the same zero-shot evaluation of both results, paired by seed.

Both trainers get the demo recipe (configs/demo.yaml): the demo ViT (configs/models/demo-vit.json),
the same shards, steps, global batch, process count, AdamW (lr, betas, eps, weight decay), warmup +
cosine schedule, fp32 on the CPU (bf16 autocast on CUDA), and seed (so the same initial weights);
clip_train runs without gradient caching (with it the gradients are the same, see
tests/test_grad_cache.py). open_clip runs with `--local-loss --gather-with-grad`, the same exact
loss. What still differs is each trainer's own behaviour: data order and shuffle buffer (ours 1,000
raw samples per worker, open_clip's 5,000), augmentation draws, and weight-decay groups (open_clip
decays the token and positional embeddings; clip_train does not unless optim.no_decay=open_clip).

Each result is evaluated by the same command, `clip-train eval --checkpoint FILE` on the 359
held-out digits: clip_train's exported `open_clip_model.pt`, and open_clip's `checkpoints/epoch_1.pt`
converted to a plain state dict. Two tasks:
- zero-shot top-1 with the demo's prompts (`templates.txt`, close to the training captions);
- the harder held-out task: zero-shot top-1 with NOVEL_TEMPLATES, prompts whose wording appears in
  no training caption (checked at start), so the text tower must generalise beyond its captions.
Retrieval R@1 is printed too, but the digits' captions repeat (~100 distinct), so it is near chance.

With several seeds, each seed trains both trainers (the order alternates), and the summary gives
per-seed numbers, the paired difference clip_train - open_clip per seed, its mean, standard
deviation and 95% t-interval, and how many seeds clip_train matched or beat open_clip.

    python benchmarks/quality.py --quick                # 20 steps: plumbing only, near chance
    python benchmarks/quality.py --seeds 0,1,2,3,4      # the 5-seed paired comparison (~30 CPU-min)
    python benchmarks/quality.py --seeds 5 --append     # one more seed, added to the last results
    python benchmarks/quality.py --seeds 0,1 --override optim.no_decay=open_clip
                                                        # clip_train with open_clip's weight decay
    python benchmarks/quality.py --seeds 0,1,2,3,4 --trainers clip_train --override data.decode=exact
                                                        # clip_train alone, another option: pair
                                                        # its rows with a default run's by seed
    python benchmarks/quality.py --seeds 0,1,2,3,4 --trainers clip_train --train-jpeg 300
                                                        # training digits as 300-px JPEGs: the
                                                        # fast path's 1/8 DCT decode (pair with
                                                        # the same plus data.decode=exact)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

METRICS = {
    "zeroshot/top1": "zero-shot top-1",
    "hard/zeroshot/top1": "harder task top-1",
    "zeroshot/top5": "zero-shot top-5",
    "retrieval/image_to_text_R@1": "image→text R@1",
    "retrieval/text_to_image_R@1": "text→image R@1",
}


# The harder held-out task: zero-shot prompts worded unlike every training caption
# (clip_train.demo.CAPTION_TEMPLATES) and unlike the demo's evaluation prompts.
NOVEL_TEMPLATES = [
    "someone wrote {} with a pen.",
    "a blurry black and white picture of {}.",
    "the symbol {} drawn on paper.",
    "{} in pencil.",
    "a child's drawing of {}.",
]
# A paired difference's 95% two-sided t critical value by degrees of freedom (seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
PAIRED = {"zeroshot/top1": "zero-shot top-1", "hard/zeroshot/top1": "harder task top-1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="20 steps: a smoke test of the plumbing"
    )
    parser.add_argument("--model", default="configs/models/demo-vit.json")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 200, quick 20)"
    )
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument(
        "--procs", type=int, default=None, help="processes (default 2 on the CPU, all GPUs)"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="lr warmup (default 30, quick 3)"
    )
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds; each trains both trainers"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these seeds' rows to the last results of the same setting",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="stay on the CPU even if CUDA is available"
    )
    parser.add_argument(
        "--trainers",
        default=",".join(h.TRAINERS),
        help="which trainers run (default both); e.g. clip_train alone to compare its options by seed",
    )
    parser.add_argument(
        "--train-jpeg", type=int, default=None, metavar="PX",
        help="train on the digits re-encoded as PX-pixel JPEGs (quality 90; evaluation unchanged)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra clip_train config override (repeatable), e.g. optim.no_decay=open_clip",
    )
    return parser.parse_args(argv)


def jpeg_train_shards(data: dict[str, str], size: int) -> str:
    """The training shards again beside them, each digit upscaled (bicubic) to `size` px and saved
    as a JPEG (quality 90, `.jpg` for `.png`), the rest as it is: large enough that the fast
    decode path reduces it (1/8 at 300 px for the 32-px demo model). Returns their pattern."""
    import io
    import tarfile

    from PIL import Image

    source = Path(data["train"]).parent
    target = source.with_name(f"train-jpeg-{size}")
    target.mkdir(exist_ok=True)
    (target / "sizes.json").write_bytes((source / "sizes.json").read_bytes())
    for path in sorted(source.glob("train-*.tar")):
        with tarfile.open(path) as shard_in, tarfile.open(target / path.name, "w") as shard_out:
            for member in shard_in.getmembers():
                payload, name = shard_in.extractfile(member).read(), member.name
                if name.endswith(".png"):
                    image = Image.open(io.BytesIO(payload)).convert("RGB")
                    buffer = io.BytesIO()
                    image.resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
                    payload, name = buffer.getvalue(), name[:-4] + ".jpg"
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), member.mtime
                shard_out.addfile(info, io.BytesIO(payload))
    return data["train"].replace(str(source), str(target))


def write_novel_templates(data: dict[str, str]) -> str:
    """NOVEL_TEMPLATES as a file next to the shards, after checking that no filled-in prompt is a
    training caption or contains one of the training templates' wordings."""
    from clip_train.demo import CAPTION_TEMPLATES, CLASSNAMES

    training = {
        t.format(name=n, num=i).lower() for t in CAPTION_TEMPLATES for i, n in enumerate(CLASSNAMES)
    }
    for template in NOVEL_TEMPLATES:
        for name in CLASSNAMES:
            prompt = template.format(name).lower().rstrip(".")
            assert prompt not in training, prompt
            assert not any(c in prompt for c in training if len(c.split()) > 2), prompt
    path = Path(data["templates"]).with_name("templates_novel.txt")
    path.write_text("\n".join(NOVEL_TEMPLATES) + "\n")
    return str(path)


def paired_summary(rows: list[dict], metric: str) -> dict:
    """clip_train - open_clip per seed (seeds where both ran), mean, sd, 95% t-interval, wins."""
    by = {(r["trainer"], r["seed"]): r[metric] for r in rows if r.get(metric) is not None}
    seeds = sorted(s for t, s in by if t == "clip_train" and ("open_clip", s) in by)
    diffs = [by[("clip_train", s)] - by[("open_clip", s)] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    t = T95[max(k for k in T95 if k <= n - 1)] if n > 1 else float("nan")
    half = t * sd / n**0.5 if n > 1 else float("nan")
    return {
        "seeds": seeds,
        "diffs": diffs,
        "mean": mean,
        "sd": sd,
        "ci95": (mean - half, mean + half),
        "clip_train_mean": sum(by[("clip_train", s)] for s in seeds) / n if n else float("nan"),
        "open_clip_mean": sum(by[("open_clip", s)] for s in seeds) / n if n else float("nan"),
        "wins_or_ties": sum(d >= 0 for d in diffs),
    }


def evaluate(
    model: str,
    data: dict[str, str],
    weights: Path,
    output: Path,
    cuda: bool,
    templates: str | None = None,
) -> dict[str, float]:
    """`clip-train eval` of a plain open_clip state-dict file, in a fresh single process; with
    `templates`, zero-shot only, with those prompts."""
    cmd = [
        sys.executable,
        "-m",
        "clip_train",
        "eval",
        f"model.name={model}",
        f"eval.zeroshot={data['val']}",
        f"eval.classnames={data['classnames']}",
        f"eval.templates={templates or data['templates']}",
        *([] if templates else [f"eval.retrieval={data['val']}"]),
        "eval.batch_size=256",
        "--checkpoint",
        str(weights),
        "--output",
        str(output),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, cwd=h.REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"eval of {weights} failed:\n{proc.stderr[-2000:]}")
    return json.loads(output.read_text())["results"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpus = 0 if args.cpu else h.cuda_device_count()
    cuda = gpus > 0
    nproc = args.procs or (gpus if cuda else 2)
    steps = args.steps or (20 if args.quick else 200)
    warmup = args.warmup_steps if args.warmup_steps is not None else (3 if args.quick else 30)
    seeds = [int(s) for s in args.seeds.split(",")]
    trainers = tuple(t for t in h.TRAINERS if t in args.trainers.split(","))
    info = h.machine_info()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = h.make_digits_shards(Path(tmp) / "digits")
        novel = write_novel_templates(data)
        train = data["train"] if args.train_jpeg is None else jpeg_train_shards(data, args.train_jpeg)
        for i, seed in enumerate(seeds):
            for trainer in trainers if i % 2 == 0 else trainers[::-1]:
                spec = h.RunSpec(
                    trainer=trainer,
                    model=args.model,
                    train_data=train,
                    nproc=nproc,
                    global_batch=args.global_batch,
                    steps=steps,
                    lr=args.lr,
                    weight_decay=args.weight_decay,
                    warmup_steps=warmup,
                    workers=4 if cuda else 1,
                    precision="bf16" if cuda else "fp32",
                    seed=seed,
                    cuda=cuda,
                    overrides=tuple(args.override) if trainer == "clip_train" else (),
                )
                run = h.run_trainer(
                    spec, Path(tmp) / "runs", warmup_steps=max(0, min(5, steps - 3))
                )
                out = Path(run.output_dir)
                weights = (
                    out / "open_clip_model.pt"
                    if trainer == "clip_train"
                    else h.plain_state_dict(h.open_clip_checkpoint(run), out / "open_clip_plain.pt")
                )
                results = evaluate(args.model, data, weights, out / "eval_common.json", cuda)
                hard = evaluate(args.model, data, weights, out / "eval_hard.json", cuda, novel)
                results["hard/zeroshot/top1"] = hard["zeroshot/top1"]
                rows.append(
                    {
                        "trainer": trainer,
                        "seed": seed,
                        **{k: results.get(k) for k in METRICS},
                        "num_eval": results.get("zeroshot/num_samples"),
                        "train_wall_s": run.wall_s,
                        "samples_per_s": run.samples_per_s,
                        "run": asdict(run),
                    }
                )
                print(
                    f"seed {seed} {trainer:10s}: "
                    + ", ".join(f"{METRICS[k]} {rows[-1][k]:.3f}" for k in METRICS)
                    + f" (trained in {run.wall_s:.0f} s)",
                    flush=True,
                )

    setting = (
        f"Digits demo shards, model {args.model}, {steps} steps, global batch {args.global_batch} on "
        f"{nproc} process(es), lr {args.lr} (warmup {warmup}, cosine), weight decay {args.weight_decay}, "
        f"{'bf16 autocast' if cuda else 'fp32'}"
        + (f"; trained on the digits as {args.train_jpeg}-px JPEGs" if args.train_jpeg else "")
        + (f"; clip_train overrides: {' '.join(args.override)}" if args.override else "")
    )
    elapsed = time.perf_counter() - started
    commands = [
        " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    ]
    previous = h.RESULTS_DIR / f"quality{'_quick' if args.quick else ''}.json"
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("setting") != setting:
            raise SystemExit(
                f"--append: {previous} was measured with another setting:\n{old.get('setting')}"
            )
        rows = old["rows"] + rows
        commands = old.get("commands", []) + commands
        elapsed += old.get("seconds", 0.0)
    markdown = render(rows, setting, info, elapsed)
    print()
    print(markdown)
    path = h.write_json(
        "quality",
        {
            "machine": info,
            "quick": args.quick,
            "setting": setting,
            "rows": rows,
            "seconds": elapsed,
            "markdown": markdown,
            "commands": commands,
            "command": " && ".join(commands),
        },
        args.quick,
    )
    print(f"\nwrote {path}")
    return 0


def render(rows: list[dict], setting: str, info: dict, elapsed: float) -> str:
    body = [
        [r["trainer"], r["seed"], *[f"{r[k]:.3f}" for k in METRICS], r["train_wall_s"]]
        for r in rows
    ]
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) > 1:
        for trainer in h.TRAINERS:
            mine = [r for r in rows if r["trainer"] == trainer]
            if not mine:
                continue
            body.append(
                [
                    f"**{trainer} mean**",
                    f"{len(mine)} seeds",
                    *[f"{sum(r[k] for r in mine) / len(mine):.3f}" for k in METRICS],
                    "",
                ]
            )
    table = h.markdown_table(
        ["trainer", "seed", *METRICS.values(), "train wall s"], body, "l" + "r" * (len(METRICS) + 2)
    )
    lines = [
        f"**Quality at equal budget** ({h.describe_machine(info)}; {elapsed:.0f} s)",
        "",
        f"{setting}; evaluated by the same `clip-train eval` on {rows[0]['num_eval']:.0f} held-out digits "
        "(10 classes: chance is 0.10 top-1); harder task: zero-shot with prompts worded unlike every "
        "training caption (NOVEL_TEMPLATES in benchmarks/quality.py).",
        "",
        table,
    ]
    paired = []
    for metric, label in PAIRED.items():
        p = paired_summary(rows, metric)
        if len(p["seeds"]) < 2:
            continue
        per_seed = ", ".join(f"{s}: {d:+.3f}" for s, d in zip(p["seeds"], p["diffs"], strict=True))
        paired.append(
            [
                label,
                len(p["seeds"]),
                f"{p['clip_train_mean']:.3f}",
                f"{p['open_clip_mean']:.3f}",
                f"{p['mean']:+.4f}",
                f"{p['sd']:.4f}",
                f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]",
                f"{p['wins_or_ties']}/{len(p['seeds'])}",
                per_seed,
            ]
        )
    if paired:
        lines += [
            "",
            "Paired by seed (difference = clip_train - open_clip):",
            "",
            h.markdown_table(
                ["task", "seeds", "clip_train mean", "open_clip mean", "mean diff", "sd of diff",
                 "95% t-interval", "clip_train >= open_clip", "per seed"],
                paired,
                "lrrrrrrrl",
            ),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
