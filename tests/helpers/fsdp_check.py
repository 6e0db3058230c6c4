"""Launched with 2 CPU processes and launch/accelerate/fsdp2.yaml by test_sharding.py. In one launch,
under Accelerate's FSDP2 path (clip_train.sharding.enable_fsdp2) with a tiny open_clip model:
- one gradient-cache step, unchunked and chunked (both gradient-reduction modes; chunked with the
  ring loss, loss.impl=ring, too), gives the float64 single-process full-batch gradient of
  open_clip's ClipLoss (whole model, temperature);
- 5 chunked AdamW steps give the parameters of 5 steps of torch DDP on the same process group;
- the exported state dict loads into open_clip with strict=True and equals the trained weights;
- accelerate save_state / load_state (sharded, torch.distributed.checkpoint) restores exactly.
Prints one JSON line of measured errors; exits non-zero on failure."""

import copy
import functools
import json
import math
import os
import sys

import open_clip
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.distributed.tensor import DTensor

from clip_train import sharding
from clip_train.config import OptimConfig
from clip_train.grad_cache import train_step
from clip_train.loss import contrastive_loss
from clip_train.model import DualEncoder, resolve_model_name
from clip_train.optim import build_optimizer

GLOBAL_B = 8
MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models", "tiny-vit.json")


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GLOBAL_B, 3, 32, 32, generator=g), torch.randint(1, 400, (GLOBAL_B, 32), generator=g)


def reference_loss(out):
    img, txt = F.normalize(out["image"], dim=-1), F.normalize(out["text"], dim=-1)
    return open_clip.ClipLoss()(img, txt, out["logit_scale"].exp())


def main() -> None:
    acc = Accelerator(cpu=True)
    assert sharding.enable_fsdp2(acc), "the FSDP2 launch was not recognised"
    world, rank = acc.num_processes, acc.process_index
    assert world == 2 and acc.is_fsdp2, f"expected 2 FSDP2 processes, got {world} ({acc.distributed_type})"
    name = resolve_model_name(MODEL)
    set_seed(0)
    clip = open_clip.create_model(name)
    initial = copy.deepcopy(clip)
    eval_copy = sharding.EvalCopy(clip)  # before sharding, as train.py makes it
    model = DualEncoder(clip)
    sharding.prepare_model(acc, model)
    opt = build_optimizer(clip, OptimConfig(lr=1e-3))
    model, opt = acc.prepare(model, opt)
    assert sharding.is_sharded(model), "accelerate did not shard the model"
    blocks = [m for m in model.modules() if isinstance(m, open_clip.transformer.ResidualAttentionBlock)]
    assert blocks and all(sharding.is_sharded(b) for b in blocks), "a transformer block is not an FSDP unit"
    assert not isinstance(clip.logit_scale, DTensor), "logit_scale was sharded"

    local = GLOBAL_B // world
    mine = slice(rank * local, (rank + 1) * local)
    images, texts = batch(1)
    ref64 = DualEncoder(copy.deepcopy(initial)).double()
    reference_loss(ref64(images.double(), texts)).backward()
    want = {n: p.grad for n, p in ref64.named_parameters()}

    results = {}
    ring_loss = functools.partial(contrastive_loss, impl="ring", tile_size=3)  # chunks of 3 + 1
    for label, chunk, reduce, loss_fn in [("nochunk", None, "every_chunk", contrastive_loss),
                                          ("chunk1_every", 1, "every_chunk", contrastive_loss),
                                          ("chunk3_last", 3, "last_chunk", contrastive_loss),
                                          ("chunk3_last_ring", 3, "last_chunk", ring_loss)]:
        opt.zero_grad(set_to_none=True)
        train_step(model, images[mine], texts[mine], loss_fn=loss_fn, chunk_size=chunk,
                   accelerator=acc, grad_reduce=reduce)
        sharding.reduce_replicated_grads(model)
        got = {n: full(p.grad) for n, p in model.named_parameters()}
        errs = {n: rel_err(got[n], want[n]) for n in want}
        worst = max(errs, key=errs.get)
        results[label] = {"max_rel_err": errs[worst], "worst": worst, "logit_scale_rel_err": errs["clip.logit_scale"]}
        assert errs[worst] < 1e-5, f"{label}: {worst} relative error {errs[worst]:.2e}"
    opt.zero_grad(set_to_none=True)

    # 5 AdamW steps under FSDP2 against torch DDP on the same process group: unchunked (the same
    # arithmetic: bit-exact expected), then 5 more with the gradient cache (chunk 2: summation
    # order differs; AdamW amplifies rounding on the attention key bias, whose true gradient is 0).
    ddp_clip = copy.deepcopy(initial)
    ddp = torch.nn.parallel.DistributedDataParallel(DualEncoder(ddp_clip))
    ddp_opt = build_optimizer(ddp_clip, OptimConfig(lr=1e-3))
    for step in range(10):
        chunk = None if step < 5 else 2
        images, texts = batch(10 + step)
        for group, dgroup in zip(opt.param_groups, ddp_opt.param_groups, strict=True):
            group["lr"] = dgroup["lr"] = 1e-3
        train_step(model, images[mine], texts[mine], loss_fn=contrastive_loss, chunk_size=chunk, accelerator=acc)
        sharding.reduce_replicated_grads(model)
        acc.clip_grad_norm_(model.parameters(), math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = ddp(images[mine], texts[mine])
        contrastive_loss(out["image"], out["text"], out["logit_scale"]).backward()
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)
        if step in (4, 9):
            ddp_params = {f"clip.{n}": p.detach().clone() for n, p in ddp_clip.named_parameters()}
            trained = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
            errs = {n: rel_err(trained[n], ddp_params[n]) for n in ddp_params}
            worst = max(errs, key=errs.get)
            whole = rel_err(torch.cat([trained[n].flatten() for n in ddp_params]),
                            torch.cat([ddp_params[n].flatten() for n in ddp_params]))
            label = "fsdp_vs_ddp_5_steps" if step == 4 else "fsdp_chunked_vs_ddp_5_more_steps"
            results[label] = {"whole_model_rel_err": whole, "max_rel_err": errs[worst], "worst": worst,
                              "logit_scale_rel_err": errs["clip.logit_scale"]}
            assert whole < 1e-5 and errs["clip.logit_scale"] < 1e-5, f"{label}: {results[label]}"
            if step == 4:
                assert errs[worst] < 1e-5, f"{label}: {worst} {errs[worst]:.2e}"

    # Export: a full plain open_clip state dict (main process), strict load, equal weights.
    state = sharding.open_clip_state_dict(model)
    if acc.is_main_process:
        fresh = open_clip.create_model(name)
        fresh.load_state_dict(state, strict=True)
        for n, p in fresh.named_parameters():
            assert torch.equal(p.detach(), trained[f"clip.{n}"]), f"export differs at {n}"
    else:
        assert state == {}, "the full state dict should reach the main process only"
    # Evaluation copy: every process gets the same plain model.
    plain = eval_copy.load(model, acc.device)
    assert all(torch.equal(p.detach(), trained[f"clip.{n}"]) for n, p in plain.named_parameters())
    eval_copy.release()

    # Sharded checkpoint round trip through accelerate (torch.distributed.checkpoint).
    # The test's own tmp_path (argv[1]): a directory of ours would outlive every run (40 MB each).
    ckpt = [sys.argv[1]]
    acc.save_state(ckpt[0])
    saved_opt = copy.deepcopy(opt.state_dict())
    train_step(model, images[mine], texts[mine], loss_fn=contrastive_loss, chunk_size=2, accelerator=acc)
    sharding.reduce_replicated_grads(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    acc.load_state(ckpt[0])
    for n, p in model.named_parameters():
        assert torch.equal(full(p.detach()), trained[n]), f"load_state did not restore {n}"
    restored = opt.state_dict()
    for k, v in saved_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(full(restored["state"][k][key]), full(v[key])), f"optimizer state {k}.{key}"
    results["checkpoint_files"] = sorted(os.listdir(ckpt[0]))
    if acc.is_main_process:
        merged = sharding.sharded_checkpoint_state(ckpt[0])
        merged = {k.removeprefix("clip."): v for k, v in merged.items()}
        fresh = open_clip.create_model(name)
        fresh.load_state_dict(merged, strict=True)
        assert all(torch.equal(p.detach(), trained[f"clip.{n}"]) for n, p in fresh.named_parameters())
        print("RESULT " + json.dumps(results), flush=True)
    acc.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(f"FAIL: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
