"""Negatives beyond the batch: zero-shot accuracy at equal steps with and without a MoCo-style
queue (and with the debiased objective), on the demo's handwritten digits at a small batch.

Every run is the demo recipe (configs/demo.yaml: the demo ViT, AdamW, warmup + cosine, fp32 on
the CPU) at a global batch of 32 (16 per process x 2 processes, no gradient caching) for the
same number of steps, then the same zero-shot and retrieval evaluation on the held-out digits.
Variants (`--variants`):
  baseline      in-batch negatives only (31 per row)
  queue         + K queued keys from a momentum encoder (loss.queue_size, loss.momentum)
  queue-debias  the same + the debiased objective with tau+ = 0.1 (10 balanced classes: a random
                negative shares the row's class with probability 0.1)
  plain-queue   K queued online embeddings, no momentum encoder (stale keys)
  debias        in-batch negatives, debiased objective

The digits have 10 classes and only ~100 distinct captions (10 phrasings x 10 names; 1,437
training digits): a queue of 1,024 keys (71% of the training set) holds ~100 keys of the row's
own class and ~10 copies of its own caption string, all as negatives. This is the false-negative
regime that debiasing targets, and a hard one for queues. A tiny CLIP on
1,437 training digits also has a large seed-to-seed spread (a run can stay collapsed at loss
log(32)): compare means over several seeds (`--seeds 0,1,2`).

    python benchmarks/negatives.py --quick          # 20 steps, K=128, 1 seed: plumbing only
    python benchmarks/negatives.py                  # 200 steps, K=1024, seeds 0,1
    python benchmarks/negatives.py --seeds 0,1,2 --variants baseline,queue,queue-debias,plain-queue
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

VARIANTS = ("baseline", "queue", "queue-debias", "plain-queue", "debias")
METRICS = {"zeroshot/top1": "zero-shot top-1", "zeroshot/top5": "top-5",
           "retrieval/image_to_text_R@1": "i→t R@1", "retrieval/text_to_image_R@1": "t→i R@1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 steps, K=128, one seed: a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200, quick 20)")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=None, help="K (default 1024, quick 128)")
    parser.add_argument("--momentum", type=float, default=0.99,
                        help="EMA momentum of the key encoders (0.99: a ~70-step half-life, for 200-step runs)")
    parser.add_argument("--tau-plus", type=float, default=0.1, help="class prior of the debiased variants")
    parser.add_argument("--variants", default="baseline,queue,queue-debias")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; quick 0)")
    parser.add_argument("--procs", type=int, default=None, help="processes (default 2 on the CPU, all GPUs)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: results/negatives.json, or negatives_quick.json)")
    return parser.parse_args(argv)


def variant_overrides(variant: str, args: argparse.Namespace, queue_size: int) -> list[str]:
    queue = [f"loss.queue_size={queue_size}"]
    momentum = [f"loss.momentum={args.momentum}"]
    debias = [f"loss.debias_tau_plus={args.tau_plus}"]
    return {"baseline": [], "queue": queue + momentum, "queue-debias": queue + momentum + debias,
            "plain-queue": queue, "debias": debias}[variant]


def train_and_evaluate(variant: str, seed: int, args: argparse.Namespace, data: dict[str, str], out: Path,
                       nproc: int, cuda: bool, steps: int, queue_size: int) -> dict:
    cmd = ["-m", "clip_train", "train", "--config", str(h.REPO / "configs/demo.yaml"),
           f"data.train={data['train']}", f"eval.zeroshot={data['val']}", f"eval.retrieval={data['val']}",
           f"eval.classnames={data['classnames']}", f"eval.templates={data['templates']}",
           f"train.steps={steps}", f"train.local_batch_size={args.global_batch // nproc}",
           "train.chunk_size=null", f"train.seed={seed}", f"train.output_dir={out}",
           f"train.log_every_steps={max(1, steps // 20)}", f"optim.warmup_steps={max(1, steps * 3 // 20)}",
           f"data.workers={4 if cuda else 1}", *variant_overrides(variant, args, queue_size)]
    env, launcher = h.process_env(nproc, cuda), h.launcher(nproc)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run([*launcher, *cmd], cwd=h.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join((out / "log.txt").read_text().splitlines()[-30:])
        raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}):\n{tail}")
    results = json.loads((out / "eval.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in logged if "loss" in m][-1]
    return {"variant": variant, "seed": seed, **{k: results.get(k) for k in METRICS},
            "num_eval": results.get("zeroshot/num_samples"), "final_loss": last["loss"],
            "candidates": last.get("health/candidates"), "mi_lower_bound": last.get("health/mi_lower_bound"),
            "logit_scale": last.get("logit_scale"), "samples_per_s": last.get("samples_per_s"),
            "wall_s": wall, "overrides": variant_overrides(variant, args, queue_size)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        variants = [v for v in variants if v in ("baseline", "queue")] or variants[:2]
    gpus = 0 if args.cpu else h.cuda_device_count()
    cuda = gpus > 0
    nproc = args.procs or (gpus if cuda else 2)
    if args.global_batch % nproc:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {nproc} processes")
    steps = args.steps or (20 if args.quick else 200)
    queue_size = args.queue_size or (128 if args.quick else 1024)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    info = h.machine_info()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = h.make_digits_shards(Path(tmp) / "digits")
        for seed in seeds:
            for variant in variants:
                row = train_and_evaluate(variant, seed, args, data, Path(tmp) / f"{variant}-{seed}", nproc,
                                         cuda, steps, queue_size)
                rows.append(row)
                print(f"seed {seed} {variant:12s}: " + ", ".join(f"{METRICS[k]} {row[k]:.3f}" for k in METRICS)
                      + f", loss {row['final_loss']:.3f} ({row['wall_s']:.0f} s)", flush=True)

    columns = [*METRICS, "final_loss", "mi_lower_bound", "wall_s"]
    body = [[r["variant"], r["seed"], r["candidates"], *[r[k] for k in columns]] for r in rows]
    if len(seeds) > 1:
        for variant in variants:
            mine = [r for r in rows if r["variant"] == variant]
            means = [sum(r[k] for r in mine) / len(mine) if all(r[k] is not None for r in mine) else None
                     for k in columns]
            body.append([f"**{variant} mean**", f"{len(mine)} seeds", mine[0]["candidates"],
                         *["–" if m is None else m for m in means]])
    body = [["–" if c is None else c for c in row] for row in body]
    header = ["variant", "seed", "candidates N", *METRICS.values(), "final loss", "log N − loss", "wall s"]
    table = h.markdown_table(header, body, "l" + "r" * (len(header) - 1))
    elapsed = time.perf_counter() - started
    markdown = "\n".join([
        f"**Negatives beyond the batch** ({h.describe_machine(info)}; {elapsed:.0f} s)", "",
        f"Digits demo shards, configs/demo.yaml's model and optimizer, {steps} steps at global batch "
        f"{args.global_batch} on {nproc} process(es); queue K = {queue_size}, momentum {args.momentum}, "
        f"tau+ = {args.tau_plus}. Zero-shot and retrieval on {rows[0]['num_eval']:.0f} held-out digits "
        "(10 classes: chance is 0.10 top-1). `candidates N` and `log N − loss` (the InfoNCE bound; "
        "not a bound for the debiased objective, hence –) are from the last logged step.", "", table])
    print()
    print(markdown)
    command = h.command_line("negatives.py", argv)
    payload = {"machine": info, "quick": args.quick, "rows": rows, "markdown": markdown, "command": command}
    if args.out is None:
        path = h.write_json("negatives", payload, args.quick)
    else:
        path = args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
