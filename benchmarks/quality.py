"""Quality at equal budget: clip_train's and open_clip's trainers on the demo's handwritten digits,
then the same zero-shot evaluation of both results.

Both trainers get the demo recipe (configs/demo.yaml): the demo ViT (configs/models/demo-vit.json),
the same shards, steps, global batch, process count, AdamW (lr, betas, eps, weight decay), warmup +
cosine schedule, fp32 on the CPU (bf16 autocast on CUDA), and seed; clip_train runs without
gradient caching (with it the gradients are the same, see tests/test_grad_cache.py). open_clip runs
with `--local-loss --gather-with-grad`, the same exact loss. What still differs is each trainer's
own behaviour: data shuffling, initialisation order, and weight decay groups (open_clip decays
the embeddings, clip_train does not).

Each result is then evaluated by the same command, `clip-train eval --checkpoint FILE` on the held-out
digits: clip_train's exported `open_clip_model.pt`, and open_clip's `checkpoints/epoch_1.pt`
converted to a plain state dict (optimizer state and DDP `module.` prefixes removed). Zero-shot
top-1 uses the prompts of `templates.txt`; retrieval is image<->caption recall@1.

    python benchmarks/quality.py --quick   # 20 steps: plumbing only, accuracy near chance
    python benchmarks/quality.py           # the demo recipe: 200 steps, global batch 128, 2 processes
    python benchmarks/quality.py --seeds 0,1,2   # several seeds: the spread between seeds is large
    python benchmarks/quality.py --seeds 3 --append   # one more seed, added to the last results
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
    "zeroshot/top5": "zero-shot top-5",
    "retrieval/image_to_text_R@1": "image→text R@1",
    "retrieval/text_to_image_R@1": "text→image R@1",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    return parser.parse_args(argv)


def evaluate(
    model: str, data: dict[str, str], weights: Path, output: Path, cuda: bool
) -> dict[str, float]:
    """`clip-train eval` of a plain open_clip state-dict file, in a fresh single process."""
    cmd = [
        sys.executable,
        "-m",
        "clip_train",
        "eval",
        f"model.name={model}",
        f"eval.zeroshot={data['val']}",
        f"eval.classnames={data['classnames']}",
        f"eval.templates={data['templates']}",
        f"eval.retrieval={data['val']}",
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
    info = h.machine_info()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = h.make_digits_shards(Path(tmp) / "digits")
        for i, seed in enumerate(seeds):
            for trainer in h.TRAINERS if i % 2 == 0 else h.TRAINERS[::-1]:
                spec = h.RunSpec(
                    trainer=trainer,
                    model=args.model,
                    train_data=data["train"],
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
            body.append(
                [
                    f"**{trainer} mean**",
                    f"{len(mine)} seeds",
                    *[f"{sum(r[k] for r in mine) / len(mine):.3f}" for k in METRICS],
                    "",
                ]
            )
    table = h.markdown_table(
        ["trainer", "seed", *METRICS.values(), "train wall s"], body, "lrrrrrr"
    )
    return "\n".join(
        [
            f"**Quality at equal budget** ({h.describe_machine(info)}; {elapsed:.0f} s)",
            "",
            f"{setting}; evaluated by the same `clip-train eval` on {rows[0]['num_eval']:.0f} held-out digits "
            "(10 classes: chance is 0.10 top-1).",
            "",
            table,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
