"""Launched by tests/test_evaluate.py under `accelerate launch` (2 CPU processes, gloo).

One launch covers every distributed assertion: `run_eval` from an exported weights file (zero-shot
on webdataset shards, retrieval on a single shard, so one rank reads nothing, and the validation
loss over batches that cross a shard boundary), `evaluate` on an
ImageFolder, and a bad class index that only one rank sees (both ranks must fail, not hang).
Each rank writes <out>/rank<r>.json; the test compares them with a one-process evaluation.

usage: eval_distributed.py SPEC.json OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from clip_train.config import Config, EvalConfig, ModelConfig, TrainConfig
from clip_train.evaluate import evaluate, run_eval
from clip_train.model import build_model


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    cfg = Config(
        model=ModelConfig(name=spec["model"]),
        eval=EvalConfig(**spec["eval"]),
        train=TrainConfig(output_dir=str(out / "run")),
    )
    # First, so that run_eval itself sets up the process group (from ACCELERATE_USE_CPU).
    results = run_eval(cfg, spec["weights"], str(out / "eval.json"))
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    report: dict = {
        "world_size": world,
        "backend": str(torch.distributed.get_backend()),
        "run_eval": results,
    }

    bundle = build_model(ModelConfig(name=spec["model"], pretrained=spec["weights"]))
    kw = dict(
        transform=bundle.eval_transform,
        tokenizer=bundle.tokenizer,
        device=state.device,
        rank=rank,
        world_size=world,
    )
    report["imagefolder"] = evaluate(bundle.model, EvalConfig(**spec["imagefolder_eval"]), **kw)

    try:
        evaluate(bundle.model, EvalConfig(**spec["bad_eval"]), **kw)
        report["bad"] = "no error"
    except Exception as err:  # noqa: BLE001 - the test checks which error each rank saw
        report["bad"] = f"{type(err).__name__}: {err}"

    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
