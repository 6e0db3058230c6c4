"""Launched with 2 CPU processes by test_distributed.py. Checks, in one launch, that a step with
the gradient cache under DDP gives the single-process full-batch gradients (float64 reference),
with one gradient all-reduce per step whatever the chunk count, and that a few AdamW steps leave
every parameter (logit scale included) identical on all ranks and equal to 1-process training.
Prints one JSON line of measured errors; exits non-zero on failure."""

import copy
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from toy import ToyClip, clip_loss, toy_batch

from clip_train.grad_cache import train_step
from clip_train.loss import contrastive_loss
from clip_train.model import DualEncoder

GLOBAL_B = 8


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main() -> None:
    acc = Accelerator(cpu=True)
    world, rank = acc.num_processes, acc.process_index
    assert world == 2, f"expected 2 processes, got {world} ({acc.distributed_type})"
    local = GLOBAL_B // world
    images, texts = toy_batch(GLOBAL_B, seed=1)
    mine = slice(rank * local, (rank + 1) * local)

    torch.manual_seed(0)
    reference = DualEncoder(ToyClip(p=0.0))
    model = copy.deepcopy(reference)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)

    allreduces = []

    def counting_hook(state, bucket):
        allreduces.append(1)
        fut = torch.distributed.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting_hook)

    # float64 single-process reference gradients on the whole global batch
    ref64 = copy.deepcopy(reference).double()
    out = ref64(images.double(), texts)
    clip_loss(out["image"], out["text"], out["logit_scale"]).backward()
    want = {n: p.grad for n, p in ref64.named_parameters()}

    results = {}
    for name, chunk, impl in [("nochunk", None, "plain"), ("chunk3", 3, "plain"),
                              ("chunk1", 1, "plain"), ("chunk2_tiled", 2, "tiled")]:
        opt.zero_grad(set_to_none=True)
        before = len(allreduces)
        loss_fn = lambda i, t, s, b, impl=impl: contrastive_loss(i, t, s, b, impl=impl, tile_size=3)  # noqa: E731
        train_step(model, images[mine], texts[mine], loss_fn=loss_fn, chunk_size=chunk, accelerator=acc)
        got = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
        errs = {n: rel_err(got[n], want[n]) for n in want}
        worst = max(errs, key=errs.get)
        results[name] = {"max_rel_err": errs[worst], "worst": worst,
                         "logit_scale_rel_err": errs["clip.logit_scale"],
                         "allreduce_calls": len(allreduces) - before}
        assert errs[worst] < 1e-5, f"{name}: {worst} relative error {errs[worst]:.2e}"
    calls = {r["allreduce_calls"] for r in results.values()}
    assert len(calls) == 1 and calls.pop() > 0, f"all-reduce calls differ with chunking: {results}"

    # A few steps: identical on every rank, and equal to single-process full-batch training.
    opt.zero_grad(set_to_none=True)
    ref_model = copy.deepcopy(reference)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for _ in range(3):
        train_step(model, images[mine], texts[mine], loss_fn=contrastive_loss, chunk_size=3, accelerator=acc)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = ref_model(images, texts)
        clip_loss(out["image"], out["text"], out["logit_scale"]).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    params = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}
    everyone = gather_object([params])
    for n, p in params.items():
        assert all(torch.equal(other[n], p) for other in everyone), f"{n} differs across ranks"
    ref_params = dict(ref_model.named_parameters())
    train_err = max(rel_err(params[n], ref_params[n].detach()) for n in params)
    results["train_3_steps_max_rel_err"] = train_err
    results["logit_scale_after"] = float(params["clip.logit_scale"])
    results["logit_scale_ref"] = float(ref_params["clip.logit_scale"].detach())
    assert train_err < 1e-5, f"training diverges from single-process: {train_err:.2e}"
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    acc.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(f"FAIL: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
