"""`clip-train train` runs instrumented to show that a step which does not log never waits on the
host, for test_runtime.py (1 process under python, or 2 under accelerate launch).

    python hot_loop_check.py OUT_DIR [--nan-step N] [--fused] -- <train overrides>...

Counts, per step, the Python-level host syncs (Tensor.item/tolist/__bool__/__float__/__int__/
cpu/numpy) and collectives (torch.distributed calls, DDP's buffer broadcast) made by the trainer
between the start of one step's forward and the next one's, leaving out the data loader's
`next()` and the loss's own all-gather of the global batch (and its backward). The loss of step
`--nan-step` is NaN on rank 0 only. At every checkpoint the processes compare their parameters and optimizer
step counts; rank 0 prints that and the counts as one `RESULT {json}` line.
`--fused` trains with a fused AdamW (the optimizer that skips a step on the device).
"""

import argparse
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from accelerate.utils import gather_object

import clip_train.train as trainer
from clip_train.__main__ import main

parser = argparse.ArgumentParser()
parser.add_argument("--nan-step", type=int, default=0)
parser.add_argument("--fused", action="store_true")
args, rest = parser.parse_known_args()
rank = int(os.environ.get("RANK", "0"))

state = {"step": 0, "in_data": False, "syncs": {}, "collectives": {}, "saved": {}}


def inside_loss() -> bool:
    package = os.sep + os.path.join("clip_train", "loss") + os.sep
    return any(package in frame.filename for frame in traceback.extract_stack(limit=40))


def counting(kind: str, fn):
    def wrapper(*a, **k):
        if state["step"] > 0 and not state["in_data"] and not (kind == "collectives" and inside_loss()):
            per_step = state[kind].setdefault(state["step"], {})
            per_step[fn.__name__] = per_step.get(fn.__name__, 0) + 1
        return fn(*a, **k)

    wrapper.__name__ = fn.__name__
    return wrapper


for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
    setattr(torch.Tensor, name, counting("syncs", getattr(torch.Tensor, name)))
for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
             "broadcast_object_list", "reduce_scatter_tensor", "barrier", "gather_object", "_broadcast_coalesced"):
    if hasattr(dist, name):
        setattr(dist, name, counting("collectives", getattr(dist, name)))

real_step, real_loss, real_loader = trainer.train_step, trainer.contrastive_loss, trainer.build_train_loader
real_save = trainer.save_checkpoint


def step(*a, **k):
    state["step"] += 1
    return real_step(*a, **k)


def loss(*a, **k):
    out = real_loss(*a, **k)
    return out * float("nan") if state["step"] == args.nan_step and rank == 0 else out


class TimedLoader:
    """The loader with its `next()` left out of the counts (the data path is not the step's)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            state["in_data"] = True
            try:
                batch = next(batches)
            finally:
                state["in_data"] = False
            yield batch


def save(accelerator, output_dir, step_no, keep, **kwargs):
    """Compare every process's parameters and optimizer step counts (while the group is up)."""
    model, optimizer = accelerator._models[0], accelerator._optimizers[0].optimizer
    params = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}
    mine = {"params": params, "steps": sorted({float(s["step"]) for s in optimizer.state.values()})}
    everyone = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    state["saved"][step_no] = {
        "steps": [o["steps"] for o in everyone],
        "ranks_identical": all(torch.equal(o["params"][n], p) for o in everyone for n, p in params.items()),
        "frozen": sorted(n.removeprefix("module.") for n, p in model.named_parameters() if not p.requires_grad),
        "params": {n: p.flatten()[:64].tolist() for n, p in params.items()},
    }
    return real_save(accelerator, output_dir, step_no, keep, **kwargs)


trainer.train_step, trainer.contrastive_loss, trainer.save_checkpoint = step, loss, save
trainer.build_train_loader = lambda *a, **k: TimedLoader(real_loader(*a, **k))
# A fused AdamW through the config (the default only on CUDA): torch's CPU kernel exists too.
code = main(["train", *rest, *(["optim.kwargs={fused: true}"] if args.fused else [])])
state["step"] = 0  # stop counting
if rank == 0:
    print("RESULT " + json.dumps({"syncs": state["syncs"], "collectives": state["collectives"], "exit": code,
                                  "saved": state["saved"]}), flush=True)
sys.exit(code)
