"""The training job: parse → accelerator → model/data/optimizer → one loop → close."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed

from clip_train.checkpoint import RunState, export_open_clip, save_checkpoint
from clip_train.config import ClipTrainError, Config
from clip_train.data import BAD_KINDS, build_train_loader
from clip_train.evaluate import evaluate
from clip_train.grad_cache import train_step
from clip_train.loss import contrastive_loss, infonce_mi_lower_bound, representation_health
from clip_train.metrics import MetricsLog, ProgressDisplay, Throughput, init_trackers
from clip_train.model import DualEncoder, build_model, tower_trainable
from clip_train.negatives import (
    STALE_KEYS_WARNING,
    build_negatives,
    check_resume_matches,
    refresh_after_step,
)
from clip_train.optim import build_optimizer, lr_at, set_lr
from clip_train.remote import RemoteSync

log = logging.getLogger("clip_train")


class LaunchError(ClipTrainError):
    """The processes were not started the way the trainer needs."""


class TrainingError(ClipTrainError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def resolve_precision(precision: str, cuda: bool) -> str:
    """Accelerate's mixed_precision value; fp32 on CPU unless bf16 is asked for explicitly."""
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if not cuda and precision == "fp16":
        log.warning("train.precision=fp16 needs CUDA; falling back to fp32 on the CPU")
        return "no"
    if not cuda and precision == "bf16":
        log.warning("train.precision=bf16 on the CPU runs much slower than fp32 (use train.precision=no)")
    return precision


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
    # Every parameter takes part in every step's last backward (the gradient cache feeds the
    # temperature through the forward), so DDP need not search for unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(mixed_precision=resolve_precision(cfg.train.precision, cuda),
                       cpu=not cuda, log_with="wandb" if cfg.wandb.enabled else None,
                       project_dir=cfg.train.output_dir, kwargs_handlers=[ddp])


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse to train when accelerate's process count differs from the launcher's WORLD_SIZE,
    or under a distributed mode the gradient cache does not support.

    accelerate >= 1.13 on a CPU-only machine silently runs each launched process alone unless told
    to use the CPU: N independent runs, no gradient sync, no error.
    """
    mode = str(getattr(accelerator, "distributed_type", ""))
    if "FSDP" in mode or "DEEPSPEED" in mode:
        # FSDP shards open_clip's scalar logit_scale badly and the unwrapped model no longer runs
        # outside FSDP's forward; DeepSpeed steps only inside accelerator.backward and ignores
        # no_sync. See README "Running on a cluster".
        raise LaunchError(f"distributed mode {mode} is not supported: launch with plain DDP "
                          "(launch/accelerate/single-node.yaml or multi-node.yaml)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={launched} processes but accelerate runs "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); on a machine without "
            "GPUs launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
            "(launch/local.sh does this)")


class StopRequest:
    """SIGTERM/SIGUSR1 (what SLURM sends before pre-emption) ask for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def train(cfg: Config) -> dict[str, float]:
    stop = StopRequest()  # first: a pre-emption signal during set-up must not kill the process
    accelerator = make_accelerator(cfg)
    check_world_size(accelerator)
    set_seed(cfg.train.seed)  # the same initial weights everywhere
    bundle = build_model(cfg.model)
    # Negatives beyond the batch (loss.queue_size, loss.momentum): the queue and the momentum copy
    # of the towers, made from the initial weights before torch.compile patches the model.
    queue, key_encoder = build_negatives(cfg.loss, bundle.model, bundle.name, accelerator.device)
    if cfg.model.torch_compile:
        bundle.model.encode_image = torch.compile(bundle.model.encode_image)
        bundle.model.encode_text = torch.compile(bundle.model.encode_text)
    optimizer = build_optimizer(bundle.model, cfg.optim)
    model, optimizer = accelerator.prepare(DualEncoder(bundle.model), optimizer)
    clip = accelerator.unwrap_model(model).clip
    train_image, train_text = tower_trainable(clip)

    progress = RunState()
    accelerator.register_for_checkpointing(progress)
    # After RunState, which stays custom_checkpoint_0: checkpoints without a queue still resume.
    # Accelerate saves them from the main process only; they are identical on every process.
    extra_states = [x for x in (queue, key_encoder) if x is not None]
    for state in extra_states:
        accelerator.register_for_checkpointing(state)
    syncer = RemoteSync(cfg.train, accelerator)  # train.remote_dir: a bucket mirrors output_dir
    resume_from = syncer.resolve_resume()  # downloads from the bucket when a disk lacks it
    if resume_from is not None:
        check_resume_matches(resume_from, registered=1 + len(extra_states))
        accelerator.load_state(str(resume_from))  # also restores every process's RNG states
        log.info("resumed from %s at step %d", resume_from, progress.step)
    else:
        set_seed(cfg.train.seed, device_specific=True)  # different dropout masks per process

    rank, world = accelerator.process_index, accelerator.num_processes
    loader = build_train_loader(
        cfg.data, transform=bundle.train_transform, tokenizer=bundle.tokenizer,
        local_batch_size=cfg.train.local_batch_size, seed=cfg.train.seed, rank=rank,
        world_size=world, state=progress.data_states[rank] if progress.data_states else None)
    loss_fn = functools.partial(contrastive_loss, kind=cfg.loss.kind, impl=cfg.loss.impl,
                                tile_size=cfg.loss.tile_size, max_logit_scale=cfg.loss.max_logit_scale,
                                debias_tau_plus=cfg.loss.debias_tau_plus, hardness_beta=cfg.loss.hardness_beta)
    # log(N) - loss bounds the mutual information only for the plain InfoNCE objective.
    infonce = cfg.loss.kind == "clip" and cfg.loss.debias_tau_plus == 0 and cfg.loss.hardness_beta == 0
    progress.wandb_run_id = init_trackers(accelerator, cfg, progress.wandb_run_id)
    metrics_log = MetricsLog(accelerator, cfg)
    display = ProgressDisplay(accelerator.is_main_process, cfg.train.steps, progress.step, cfg.train.log_every_steps)
    global_batch = cfg.train.local_batch_size * world
    if accelerator.is_main_process:
        log.info("training %s: %d processes x %d samples = global batch %d, chunk %s, %s, %d steps",
                 bundle.name, world, cfg.train.local_batch_size, global_batch, cfg.train.chunk_size,
                 accelerator.mixed_precision, cfg.train.steps)
        if queue is not None and key_encoder is None:
            log.warning(STALE_KEYS_WARNING)

    def checkpoint() -> None:
        progress.data_states = gather_object([loader.state_dict()])
        saved = save_checkpoint(accelerator, cfg.train.output_dir, progress.step, cfg.train.keep_checkpoints,
                                keep_also=syncer.unsynced_steps())
        syncer.checkpoint_saved(saved, progress.step)  # uploaded in the background

    batches = iter(loader)
    throughput = Throughput(global_batch, cfg.train.local_batch_size)
    results: dict[str, float] = {}
    while progress.step < cfg.train.steps:
        t0 = time.perf_counter()
        images, texts = next(batches)
        images, texts = images.to(accelerator.device), texts.to(accelerator.device)
        throughput.waited(time.perf_counter() - t0)

        set_lr(optimizer, lr_at(progress.step, cfg.optim, cfg.train.steps))
        # Each row is scored against the global batch and, with a queue, its keys from past steps.
        step_loss_fn, candidates = loss_fn, global_batch
        if queue is not None:
            queue_img_KD, queue_txt_KD = queue.keys()
            step_loss_fn = functools.partial(loss_fn, queue_img_KD=queue_img_KD, queue_txt_KD=queue_txt_KD)
            candidates += queue.filled
        out = train_step(model, images, texts, loss_fn=step_loss_fn, chunk_size=cfg.train.chunk_size,
                         accelerator=accelerator, train_image=train_image, train_text=train_text)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm or math.inf)
        # One small collective decides for every process: skip the step? stop for a signal? stop
        # because the bucket has had no safe copy for too long?
        flags = torch.tensor([float(not torch.isfinite(out.loss)), float(stop.requested), float(syncer.overdue())],
                             device=accelerator.device)
        flags = accelerator.reduce(flags, "max")
        if bool(flags[2]):
            raise syncer.overdue_error()
        nonfinite = bool(flags[0]) or (accelerator.mixed_precision != "fp16" and not torch.isfinite(grad_norm))
        if accelerator.mixed_precision == "fp16" or not nonfinite:
            optimizer.step()  # under fp16, GradScaler itself skips steps with inf/NaN gradients
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # Clamp the temperature in place, as CLIP does: beyond 100 training becomes unstable.
            clip.logit_scale.clamp_(0, math.log(cfg.loss.max_logit_scale))
        if queue is not None and not nonfinite:
            refresh_after_step(queue, key_encoder, clip, images, texts, out.img_emb_BD, out.txt_emb_BD,
                               chunk_size=cfg.train.chunk_size, autocast=accelerator.autocast)
        progress.step += 1
        progress.samples_seen += global_batch
        throughput.stepped()
        if nonfinite:
            count_nonfinite_step(progress, cfg, checkpoint)
        else:
            progress.nonfinite_in_a_row = 0

        last = progress.step == cfg.train.steps
        if progress.step % cfg.train.log_every_steps == 0 or last:
            loss = accelerator.reduce(out.loss.detach().float(), "mean").item()
            metrics = {
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "logit_scale": clip.logit_scale.exp().item(),
                "temperature": 1.0 / clip.logit_scale.exp().item(),
                "grad_norm": grad_norm.item(),
                **throughput.read(),
                "samples_seen": progress.samples_seen,
                "skipped_steps": progress.skipped_steps,
                **peak_memory(accelerator.device),
                **{f"health/{k}": v for k, v in representation_health(out.img_emb_BD, out.txt_emb_BD).items()},
                "health/candidates": candidates,
                **({"health/mi_lower_bound": infonce_mi_lower_bound(loss, candidates)} if infonce else {}),
                **bad_sample_metrics(accelerator, loader),
            }
            metrics_log.log(metrics, progress.step)
            display.update(progress.step, metrics)
        if cfg.eval.every_steps and progress.step % cfg.eval.every_steps == 0 and not last:
            metrics_log.log(run_evaluation(accelerator, clip, cfg, bundle), progress.step)
        if (cfg.train.checkpoint_every_steps and progress.step % cfg.train.checkpoint_every_steps == 0) or last:
            checkpoint()
        if bool(flags[1]) and not last:
            checkpoint()
            log.warning("stop signal received: checkpoint saved at step %d, exiting", progress.step)
            break

    display.close()
    if progress.step == cfg.train.steps:
        results = run_evaluation(accelerator, clip, cfg, bundle)
        metrics_log.log(results, progress.step)
        if accelerator.is_main_process:
            export_open_clip(clip, os.path.join(cfg.train.output_dir, "open_clip_model.pt"))
            with open(os.path.join(cfg.train.output_dir, "eval.json"), "w") as f:
                json.dump({"step": progress.step, **results}, f, indent=1)
    # Release the DDP wrapper before the process group goes: a reducer outliving its group can
    # abort the interpreter at exit ("terminate called without an active exception").
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()
    syncer.finish(stopped=progress.step < cfg.train.steps)  # no collectives: after end_training
    return results


def count_nonfinite_step(progress: RunState, cfg: Config, checkpoint) -> None:
    """A skipped step; too many in a row stop the run with a checkpoint of the last good state."""
    progress.skipped_steps += 1
    progress.nonfinite_in_a_row += 1
    log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                progress.step, progress.nonfinite_in_a_row)
    if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
        checkpoint()
        raise TrainingError(f"{progress.nonfinite_in_a_row} non-finite steps in a row "
                            f"(train.max_nonfinite_steps); last good state saved in "
                            f"{cfg.train.output_dir}/checkpoints")


def run_evaluation(accelerator: Accelerator, clip, cfg: Config, bundle) -> dict[str, float]:
    with accelerator.autocast():  # embeddings are cast to float32 before any evaluation maths
        results = evaluate(clip, cfg.eval, transform=bundle.eval_transform, tokenizer=bundle.tokenizer,
                           device=accelerator.device, rank=accelerator.process_index,
                           world_size=accelerator.num_processes,
                           show_progress=accelerator.is_main_process and sys.stderr.isatty())
    if results and accelerator.is_main_process:
        log.info("eval: %s", " ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bad_sample_metrics(accelerator: Accelerator, loader) -> dict[str, float]:
    """Bad-sample counts summed over processes (every process calls this at the same step).

    BAD_KINDS fixes the tensor's layout, so every process reduces the same shape."""
    counts = loader.bad_counts()
    values = torch.tensor([float(loader.samples_read())] + [float(counts[k]) for k in BAD_KINDS],
                          device=accelerator.device)
    totals = accelerator.reduce(values, "sum")
    out = {"data/samples_read": totals[0].item(), "data/bad_samples": totals[1:].sum().item()}
    out.update({f"data/bad/{k}": totals[i + 1].item() for i, k in enumerate(BAD_KINDS)})
    return out
