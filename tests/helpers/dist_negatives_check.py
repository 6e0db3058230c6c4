"""Launched with 2 CPU processes by tests/test_negatives.py; one launch checks:
- loss: each rank's loss on its half of a batch, with the same queued keys everywhere, for the
  queue alone, debiased, hardness-weighted and both, plain and tiled: the mean over ranks equals
  the float64 single-process reference on the whole batch, and the gradients summed over ranks
  (what DDP's average of per-rank losses / world gives) equal the reference's;
- training: a few DDP steps of the toy model with the gradient cache in the trainer's order
  (loss with the queue, optimizer step, EMA update, batch keys from the EMA encoder in chunks,
  enqueue of the all-gathered global batch), with a momentum encoder and with a plain queue:
  queue (keys, pointer, fill) and EMA weights bit-identical on both ranks, and equal to a
  single-process run on the whole batch.
Prints one JSON line `RESULT {...}` on rank 0; exits non-zero on failure."""

import contextlib
import copy
import json
import math
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object
from negatives_reference import debiased_hard_loss, queue_infonce
from toy import ToyClip, toy_batch

from clip_train.grad_cache import train_step
from clip_train.loss import contrastive_loss
from clip_train.model import DualEncoder
from clip_train.negatives import KeyQueue, MomentumEncoder

GLOBAL_B, D, K = 8, 8, 12  # K is not a multiple of the global batch: the ring wraps mid-batch
OBJECTIVES = {"queue": (0.0, 0.0), "debias": (0.1, 0.0), "hard": (0.0, 0.5), "both": (0.1, 1.0)}


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_losses(world, rank):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(GLOBAL_B, D, generator=g, dtype=torch.float64)
    txt = 0.4 * img + torch.randn(GLOBAL_B, D, generator=g, dtype=torch.float64)
    q_img, q_txt = torch.randn(5, D, generator=g, dtype=torch.float64), torch.randn(5, D, generator=g, dtype=torch.float64)
    scale = torch.tensor(math.log(14.0), dtype=torch.float64)
    local = GLOBAL_B // world
    mine = slice(rank * local, (rank + 1) * local)
    results = {}
    for name, (tau_plus, beta) in OBJECTIVES.items():
        ref_leaves = [t.clone().requires_grad_() for t in (img, txt, scale)]
        if name == "queue":
            want = queue_infonce(*ref_leaves, q_img, q_txt)
        else:
            want = debiased_hard_loss(*ref_leaves, q_img, q_txt, tau_plus, beta)[0]
        want_grads = torch.autograd.grad(want, ref_leaves)
        for impl in ("plain", "tiled"):
            leaves = [img[mine].float().requires_grad_(), txt[mine].float().requires_grad_(),
                      scale.float().requires_grad_()]
            loss = contrastive_loss(*leaves, impl=impl, tile_size=3, queue_img_KD=q_img.float(),
                                    queue_txt_KD=q_txt.float(), debias_tau_plus=tau_plus, hardness_beta=beta)
            # Each rank back-propagates its loss / world; the gather's backward sums the other
            # rank's terms into our rows; the scale's gradient is summed by hand (DDP's job).
            grads = torch.autograd.grad(loss / world, leaves)
            scale_grad = grads[2].clone()
            dist.all_reduce(scale_grad)
            losses = gather_object([float(loss.detach())])
            rows = gather_object([(grads[0], grads[1])])
            got_img = torch.cat([r[0] for r in rows])
            got_txt = torch.cat([r[1] for r in rows])
            errs = [rel_err(got_img, want_grads[0]), rel_err(got_txt, want_grads[1]),
                    rel_err(scale_grad, want_grads[2])]
            results[f"{name}-{impl}"] = {
                "rank_losses": losses,
                "loss_rel_err": abs(sum(losses) / world - float(want)) / abs(float(want)),
                "grad_rel_err": max(errs)}
    return results


def train(model, opt, batches, rows, chunk, momentum, acc=None):
    """The trainer's order of operations; `rows` selects this process's part of each batch."""
    queue = KeyQueue(K, D)
    encoder = MomentumEncoder(unwrap(model).clip, momentum) if momentum else None
    for images, texts in batches:
        q_img, q_txt = queue.keys()
        loss_fn = lambda i, t, s, b, q_img=q_img, q_txt=q_txt: contrastive_loss(  # noqa: E731
            i, t, s, b, impl="tiled", tile_size=3, queue_img_KD=q_img, queue_txt_KD=q_txt,
            debias_tau_plus=0.1, hardness_beta=0.5)
        out = train_step(model, images[rows], texts[rows], loss_fn=loss_fn, chunk_size=chunk,
                         accelerator=acc or PlainAccelerator())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if encoder is not None:
            encoder.update(unwrap(model).clip)
            keys = encoder.encode(images[rows], texts[rows], chunk_size=chunk)
        else:
            keys = (out.img_emb_BD, out.txt_emb_BD)
        queue.enqueue(*keys)
    return queue, encoder


def unwrap(model):
    return getattr(model, "module", model)


class PlainAccelerator:
    """What train_step needs of an Accelerator, for the single-process reference."""
    scaler = None

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()


class SingleProcessGroup:
    """Runs the reference with torch.distributed looking uninitialised (world size 1)."""

    def __enter__(self):
        # Both modules that ask: the loss (contrastive_loss) and the gather (the queue's enqueue).
        from clip_train.loss import contrastive, gather

        self.saved = [(module, module._world_size, module._rank) for module in (contrastive, gather)]
        for module, _, _ in self.saved:
            module._world_size, module._rank = (lambda: 1), (lambda: 0)

    def __exit__(self, *exc):
        for module, world_size, rank in self.saved:
            module._world_size, module._rank = world_size, rank


def state_tensors(model, queue, encoder):
    out = {f"model.{n.removeprefix('module.')}": p.detach().clone() for n, p in model.named_parameters()}
    out["queue.img"], out["queue.txt"] = queue.img_KD.clone(), queue.txt_KD.clone()
    if encoder is not None:
        out.update({f"ema.{n}": p.clone() for n, p in encoder.model.named_parameters()})
    return out


def check_training(acc, world, rank):
    batches = [toy_batch(GLOBAL_B, seed=10 + s) for s in range(4)]
    local = GLOBAL_B // world
    mine = slice(rank * local, (rank + 1) * local)
    results = {}
    for mode, momentum in (("momentum", 0.9), ("plain_queue", 0.0)):
        torch.manual_seed(0)
        reference = DualEncoder(ToyClip(p=0.0))
        model = copy.deepcopy(reference)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        queue, encoder = train(model, opt, batches, mine, chunk=3, momentum=momentum, acc=acc)
        mine_state = state_tensors(model, queue, encoder)
        everyone = gather_object([(mine_state, queue.ptr, queue.filled)])
        identical = all(ptr == queue.ptr and filled == queue.filled
                        and all(torch.equal(state[n], t) for n, t in mine_state.items())
                        for state, ptr, filled in everyone)
        # The same steps in one process on the whole batch, unchunked.
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        with SingleProcessGroup():
            ref_queue, ref_encoder = train(reference, ref_opt, batches, slice(None), chunk=None,
                                           momentum=momentum)
        ref_state = state_tensors(reference, ref_queue, ref_encoder)
        errs = {n: rel_err(mine_state[n], ref_state[n]) for n in ref_state}
        worst = max(errs, key=errs.get)
        results[mode] = {"identical_on_ranks": identical, "queue_filled": queue.filled,
                         "queue_ptr": queue.ptr, "max_rel_err_vs_single_process": errs[worst],
                         "worst": worst}
    return results


def main() -> None:
    acc = Accelerator(cpu=True)
    world, rank = acc.num_processes, acc.process_index
    assert world == 2, f"expected 2 processes, got {world} ({acc.distributed_type})"
    results = {"world_size": world, "loss": check_losses(world, rank),
               "train": check_training(acc, world, rank)}
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    acc.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(f"FAIL: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
