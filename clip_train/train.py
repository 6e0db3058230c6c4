"""The training job: parse → accelerator → model/data/optimizer → one loop → close."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from clip_train.checkpoint import (
    RunState,
    check_disks,
    check_resume_world_size,
    export_open_clip,
    probe_disks,
    save_checkpoint,
)
from clip_train.config import ClipTrainError, Config
from clip_train.data import (
    BadSampleCeiling,
    batch_to_device,
    build_train_loader,
    check_bad_samples,
    fresh_stream_seed,
)
from clip_train.evaluate import ClassifierCache, evaluate
from clip_train.grad_cache import train_step
from clip_train.hub import CONFIG_NAME, RUN_FOLDER, WEIGHTS_NAME, RunFacts, write_model_folder
from clip_train.loss import contrastive_loss, infonce_mi_lower_bound, representation_health
from clip_train.metrics import MetricsLog, ProgressDisplay, Throughput, init_trackers, trackers
from clip_train.model import DualEncoder, ModelBundle, build_model, tower_trainable
from clip_train.negatives import (
    STALE_KEYS_WARNING,
    build_negatives,
    check_resume_matches,
    refresh_after_step,
)
from clip_train.optim import build_optimizer, lr_at, set_lr
from clip_train.remote import RemoteSync
from clip_train.report import write_report_safely
from clip_train.runtime import (
    StepHealth,
    accelerator_kwargs,
    buffers_change_in_training,
    configure_matmul_precision,
    cpu_precision_note,
    cuda_bf16_native,
    describe_run,
    freeze_unused_logit_bias,
    optimizer_step,
    own_cuda_device,
    resolve_precision,
    rng_isolated,
    settle_before_forks,
    start_autograd_threads,
    sync_buffers_every_forward,
)
from clip_train.sharding import (
    EvalCopy,
    check_mirror_disk,
    check_supported,
    enable_fsdp2,
    open_clip_state_dict,
    prepare_model,
    reduce_replicated_grads,
)
from clip_train.watchdog import (
    Allowances,
    RestartGuard,
    Stragglers,
    Watchdog,
    attempt_rendezvous,
    nccl_dump_env,
)

log = logging.getLogger("clip_train")


class LaunchError(ClipTrainError):
    """The processes were not started the way the trainer needs."""


class TrainingError(ClipTrainError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
    precision = resolve_precision(cfg.train.precision, cuda, lambda: cuda_bf16_native(own_cuda_device()))
    configure_matmul_precision(cfg.train.tf32, cuda)
    if cuda:
        nccl_dump_env(cfg.train.output_dir)  # a timed-out collective dumps NCCL's flight recorder
    # Store keys scoped by the launcher's attempt: a restarted group must not read the dead one's.
    kwargs = accelerator_kwargs(cfg.train.process_group_timeout_s, init_method=attempt_rendezvous())
    accelerator = Accelerator(mixed_precision=precision, cpu=not cuda, log_with=trackers(cfg) or None,
                              project_dir=cfg.train.output_dir, kwargs_handlers=kwargs)
    note = cpu_precision_note(precision, cuda)
    if note and accelerator.is_main_process:
        log.warning(note)  # the run's first line
    return accelerator


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse to train when accelerate's process count differs from the launcher's WORLD_SIZE,
    or under a distributed mode the gradient cache does not support.

    accelerate >= 1.13 on a CPU-only machine silently runs each launched process alone unless told
    to use the CPU: N independent runs, no gradient sync, no error.
    """
    mode = str(getattr(accelerator, "distributed_type", ""))
    if "DEEPSPEED" in mode or ("FSDP" in mode and not getattr(accelerator, "is_fsdp2", False)):
        # DeepSpeed steps only inside accelerator.backward and ignores no_sync; FSDP1's
        # parameters outside its forward are views of a flat shard. FSDP2 is supported
        # (clip_train/sharding.py). See docs/clusters.md, "Accelerate configurations and the gradient cache".
        raise LaunchError(f"distributed mode {mode} is not supported: launch with DDP "
                          "(launch/accelerate/single-node.yaml or multi-node.yaml) or FSDP2 (fsdp2.yaml)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={launched} processes but accelerate runs "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); on a machine without "
            "GPUs launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
            "(launch/local.sh does this)")


class StopRequest:
    """SIGTERM/SIGUSR1 (what SLURM sends before pre-emption) ask for a checkpoint and a clean exit
    once `arm()`ed, where a checkpoint can be written: from the training loop on. Before that
    (rendezvous, process-group init, checkpoint load) they end the process at once, as by
    default: a process blocked in start-up must not outlive its launcher's stop or restart."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)

    def arm(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def train(cfg: Config) -> dict[str, float]:
    stop = StopRequest()  # a stop signal ends the set-up at once; the loop checkpoints first
    # From here on a process that makes no progress for its phase's allowance dumps its stacks
    # and exits, so that the launcher restarts the group (clip_train/watchdog.py).
    rank = int(os.environ.get("RANK", "0"))
    watchdog = Watchdog(Allowances.from_config(cfg.train), cfg.train.output_dir, rank)
    try:
        restarts = RestartGuard(cfg.train.output_dir, cfg.train.max_restarts_without_progress,
                                is_main=rank == 0, record_every=cfg.train.log_every_steps)
        restarts.start()  # too many restarts without a new step: one line, and the launcher stops
        return run_training(cfg, stop, watchdog, restarts)
    finally:
        watchdog.close()  # an error too: a caller that goes on must not be ended by the watchdog


def run_training(cfg: Config, stop: StopRequest, watchdog: Watchdog, restarts: RestartGuard) -> dict[str, float]:
    # Set-up: the launch, the disks and the one resume decision, before anything heavy.
    accelerator = make_accelerator(cfg)
    check_world_size(accelerator)
    sharded = enable_fsdp2(accelerator)  # an FSDP2 launch: Accelerate's FSDP2 path, on CPUs too
    if sharded:
        check_supported(cfg)
    # Python <= 3.11.7 can hang a forked loader worker (runtime.fork_can_hang): no thread may be
    # entering the interpreter as a loader forks.
    start_autograd_threads()
    settle_before_forks()
    # Does every process see one output_dir, and which checkpoint do they all resume from
    # (decided once, verified by every process, the same everywhere)?
    disks = probe_disks(accelerator, cfg.train.output_dir)
    check_disks(disks, cfg.train.output_dir, cfg.train.remote_dir, accelerator.num_processes)
    if sharded:
        check_mirror_disk(accelerator, cfg, disks.shared)  # a bucket mirror needs every shard on one disk
    syncer = RemoteSync(cfg.train, accelerator)  # train.remote_dir: a bucket mirrors output_dir
    decision = syncer.decide(disks)  # downloads from the bucket where a disk lacks it
    if decision.checkpoint is not None:
        check_resume_world_size(decision.checkpoint, accelerator.num_processes)
    t = build_trainee(cfg, accelerator, sharded)
    progress = restore(cfg, accelerator, t, decision)
    loader = open_train_data(cfg, accelerator, t.bundle, progress)
    model, optimizer, clip, bundle, queue = t.model, t.optimizer, t.clip, t.bundle, t.queue

    bad_ceiling = BadSampleCeiling(cfg.data.max_bad_fraction, cfg.data.bad_fraction_min_samples,
                                   cfg.data.bad_fraction_window_samples)
    data_metrics: dict[str, float] = {}
    loss_fn = functools.partial(contrastive_loss, kind=cfg.loss.kind, impl=cfg.loss.impl,
                                tile_size=cfg.loss.tile_size, max_logit_scale=cfg.loss.max_logit_scale,
                                debias_tau_plus=cfg.loss.debias_tau_plus, hardness_beta=cfg.loss.hardness_beta)
    isolated = functools.partial(rng_isolated, accelerator.device)  # not the training step's randomness
    with isolated():
        progress.wandb_run_id = init_trackers(accelerator, cfg, progress.wandb_run_id, progress.step)
    metrics_log = MetricsLog(accelerator, cfg, run_id=progress.run_id)
    display = ProgressDisplay(accelerator.is_main_process, cfg.train.steps, progress.step, cfg.train.log_every_steps)
    world = accelerator.num_processes
    global_batch = cfg.train.local_batch_size * world
    run_line = describe_run(cfg, model_name=bundle.name, processes=world, device_type=accelerator.device.type,
                            mixed_precision=str(accelerator.mixed_precision), sharded=sharded,
                            uint8_batches=loader.image_normalization is not None, start_step=progress.step)
    if accelerator.is_main_process:
        log.info(run_line)
        if queue is not None and t.key_encoder is None:
            log.warning(STALE_KEYS_WARNING)
        if cfg.loss.impl == "ring" and world == 1:
            log.info("loss.impl=ring with 1 process: nothing to pass around, the loss runs as tiled")

    def checkpoint() -> None:
        watchdog.phase(f"the checkpoint at step {progress.step}", cfg.train.hang_checkpoint_timeout_s)
        progress.data_states = gather_object([loader.state_dict()])
        saved = save_checkpoint(accelerator, cfg.train.output_dir, progress.step, cfg.train.keep_checkpoints,
                                keep_also=syncer.unsynced_steps(), run_id=progress.run_id)
        syncer.checkpoint_saved(saved, progress.step)  # uploaded in the background
        restarts.reached(progress.step)

    # The loop.
    batches = iter(loader)
    throughput = Throughput(global_batch, cfg.train.local_batch_size)
    health = StepHealth(accelerator.device, progress.skipped_steps, progress.nonfinite_in_a_row)
    eval_cache = ClassifierCache()  # a frozen text tower's zero-shot classifiers, kept between evaluations
    start_step = progress.step
    stragglers = Stragglers(cfg.train.straggler_factor)
    stop.arm()
    while progress.step < cfg.train.steps:
        watchdog.step(progress.step + 1)
        t0 = time.perf_counter()
        images, texts = next(batches)
        # uint8 images, normalised on the device after a non-blocking copy from pinned memory.
        images, texts = batch_to_device(images, texts, accelerator.device, loader.image_normalization)
        throughput.waited(time.perf_counter() - t0)

        lr = lr_at(progress.step, cfg.optim, cfg.train.steps)  # groups get it x their lr_scale
        set_lr(optimizer, lr)
        # Each row is scored against the global batch and, with a queue, its keys from past steps.
        step_loss_fn, candidates = loss_fn, global_batch
        if queue is not None:
            queue_img_KD, queue_txt_KD = queue.keys()
            step_loss_fn = functools.partial(loss_fn, queue_img_KD=queue_img_KD, queue_txt_KD=queue_txt_KD)
            candidates += queue.filled
        out = train_step(model, images, texts, loss_fn=step_loss_fn, chunk_size=cfg.train.chunk_size,
                         accelerator=accelerator, train_image=t.train_image, train_text=t.train_text,
                         grad_reduce=cfg.train.sharded_grad_reduce)
        reduce_replicated_grads(model)  # FSDP2: the replicated temperature/bias (no-op otherwise)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm or math.inf)
        # The norm of the all-reduced gradients: the same on every process, and non-finite when
        # any process's loss or gradient was (NaN/inf propagate through backward and all-reduce).
        # It decides on the device whether the step is applied: no host read, no collective.
        skip = ~torch.isfinite(grad_norm)
        optimizer_step(optimizer, skip, accelerator.scaler)
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # Clamp the temperature in place, as CLIP does: beyond 100 training becomes unstable.
            clip.logit_scale.clamp_(0, math.log(cfg.loss.max_logit_scale))
        if queue is not None and not skip.item():  # the queue's ring pointer is on the host
            refresh_after_step(queue, t.key_encoder, clip, images, texts, out.img_emb_BD, out.txt_emb_BD,
                               chunk_size=cfg.train.chunk_size, autocast=accelerator.autocast)
        # fp16: GradScaler skips overflowing steps by design while it calibrates its scale; only
        # a non-finite loss counts as a bad step there.
        health.record(~torch.isfinite(out.loss) if accelerator.scaler is not None else skip, progress.step + 1)
        progress.step += 1
        progress.samples_seen += global_batch
        throughput.stepped()

        last = progress.step == cfg.train.steps
        log_now = progress.step % cfg.train.log_every_steps == 0 or last
        save_now = bool(cfg.train.checkpoint_every_steps and progress.step % cfg.train.checkpoint_every_steps == 0) or last
        stop_now = False
        if log_now or save_now or progress.step % cfg.train.stop_check_every_steps == 0:
            stop_now = check_health(health, accelerator, stop, progress, cfg, checkpoint, syncer)
            # Every process's bad-sample counts; DataError above data.max_bad_fraction.
            data_metrics = check_bad_samples(accelerator, loader, bad_ceiling)
        if log_now:
            metrics = step_metrics(accelerator, cfg, clip, out, lr=lr, grad_norm=grad_norm, candidates=candidates,
                                   rates=throughput.read(), stragglers=stragglers, progress=progress,
                                   data_metrics=data_metrics)
            with isolated():
                metrics_log.log(metrics, progress.step)
            display.update(progress.step, metrics)
            restarts.reached(progress.step)
        if not last and cfg.eval.due(progress.step):  # only the entries due at this step
            watchdog.phase(f"the evaluation at step {progress.step}", cfg.train.hang_eval_timeout_s)
            with isolated():
                metrics_log.log(run_evaluation(accelerator, model, clip, cfg, bundle, eval_cache, progress.step,
                                               t.eval_copy), progress.step)
        if save_now or stop_now:
            checkpoint()
        if stop_now and not last:
            log.warning("stop signal received: checkpoint saved at step %d, exiting", progress.step)
            break

    # The end.
    display.close()
    del model, optimizer  # t still holds them: finish releases them before the group goes
    return finish(cfg, accelerator, t, progress, syncer, watchdog, metrics_log, eval_cache,
                  run_line=run_line, start_step=start_step)


@dataclass
class Trainee:
    """The model being trained and what trains with it, prepared for this launch."""

    bundle: ModelBundle  # the open_clip model, its transforms and tokenizer
    model: torch.nn.Module  # DualEncoder wrapped by accelerate (DDP / FSDP2)
    optimizer: torch.optim.Optimizer
    clip: torch.nn.Module  # the unwrapped open_clip model (its temperature is clamped in place)
    train_image: bool
    train_text: bool
    queue: Any  # loss.queue_size: negatives from past steps, or None
    key_encoder: Any  # loss.momentum: the momentum copy of the towers, or None
    eval_copy: EvalCopy | None  # FSDP2: the plain model evaluation runs on


def build_trainee(cfg: Config, accelerator: Accelerator, sharded: bool) -> Trainee:
    """The model from the config (the same initial weights on every process), its optimizer and
    negatives, wrapped for this launch."""
    set_seed(cfg.train.seed)  # the same initial weights everywhere
    bundle = build_model(cfg.model)
    if freeze_unused_logit_bias(bundle.model, cfg.loss.kind) and accelerator.is_main_process:
        log.info("loss.kind=clip does not use the model's logit_bias: it is frozen "
                 "(and kept unchanged in checkpoints and exports)")
    # Negatives beyond the batch (loss.queue_size, loss.momentum): the queue and the momentum copy
    # of the towers, made from the initial weights before torch.compile patches the model.
    queue, key_encoder = build_negatives(cfg.loss, bundle.model, bundle.name, accelerator.device)
    if cfg.model.torch_compile:
        bundle.model.encode_image = torch.compile(bundle.model.encode_image)
        bundle.model.encode_text = torch.compile(bundle.model.encode_text)
    optimizer = build_optimizer(bundle.model, cfg.optim, accelerator.device.type)  # fused AdamW on CUDA
    # FSDP2 evaluates a plain copy of the model: its structure taken now, before sharding.
    eval_copy = EvalCopy(bundle.model) if sharded and has_evaluation(cfg) else None
    model = DualEncoder(bundle.model)
    if sharded:
        prepare_model(accelerator, model)  # units, replicated temperature, float32 reduction
    model, optimizer = accelerator.prepare(model, optimizer)
    sync_buffers_every_forward(model, buffers_change_in_training(bundle.model))
    clip = accelerator.unwrap_model(model).clip
    train_image, train_text = tower_trainable(clip)
    return Trainee(bundle, model, optimizer, clip, train_image, train_text, queue, key_encoder, eval_copy)


def restore(cfg: Config, accelerator: Accelerator, t: Trainee, decision) -> RunState:
    """Register what a checkpoint holds and load the decided one (every process's RNG states too);
    without one, seed each process differently."""
    progress = RunState()
    accelerator.register_for_checkpointing(progress)
    # After RunState, which stays custom_checkpoint_0: checkpoints without a queue still resume.
    # Accelerate saves them from the main process only; they are identical on every process.
    extra_states = [x for x in (t.queue, t.key_encoder) if x is not None]
    for state in extra_states:
        accelerator.register_for_checkpointing(state)
    resume_from = decision.checkpoint
    if resume_from is not None:
        check_resume_matches(resume_from, registered=1 + len(extra_states))
        accelerator.load_state(str(resume_from))  # also restores every process's RNG states
        log.info("resumed from %s at step %d", resume_from, progress.step)
        if progress.step >= cfg.train.steps and accelerator.is_main_process:
            log.warning("train.resume: %s is at step %d >= train.steps=%d: the run is already complete "
                        "(its final outputs are written if missing)", resume_from, progress.step, cfg.train.steps)
    else:
        set_seed(cfg.train.seed, device_specific=True)  # different dropout masks per process
    progress.run_id = decision.run_id  # in every checkpoint's manifest and every metrics line
    return progress


def open_train_data(cfg: Config, accelerator: Accelerator, bundle: ModelBundle, progress: RunState):
    """This process's training stream, where the checkpoint left it (or fresh: train.resume_data)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    data_state, stream_seed = progress.data_states[rank] if progress.data_states else None, None
    if data_state is not None and cfg.train.resume_data == "fresh":  # the data changed: a new stream
        data_state, stream_seed = None, fresh_stream_seed(cfg.train.seed, progress.step)
        if accelerator.is_main_process:
            log.info("train.resume_data=fresh: model, optimizer and step %d restored; the data stream "
                     "restarts from seed %d (from train.seed and the step), epoch 0", progress.step, stream_seed)
    return build_train_loader(
        cfg.data, transform=bundle.train_transform, tokenizer=bundle.tokenizer,
        local_batch_size=cfg.train.local_batch_size, seed=cfg.train.seed, rank=rank,
        world_size=world, state=data_state, pin_memory=accelerator.device.type == "cuda",
        stream_seed=stream_seed)


def step_metrics(accelerator: Accelerator, cfg: Config, clip, out, *, lr: float, grad_norm: torch.Tensor,
                 candidates: int, rates: dict[str, float], stragglers: Stragglers, progress: RunState,
                 data_metrics: dict[str, float]) -> dict[str, float]:
    """A logging step's metrics (host reads and one small gather: logging steps only)."""
    loss = accelerator.reduce(out.loss.detach().float(), "mean").item()
    # log(N) - loss bounds the mutual information only for the plain InfoNCE objective.
    infonce = cfg.loss.kind == "clip" and cfg.loss.debias_tau_plus == 0 and cfg.loss.hardness_beta == 0
    return {
        "loss": loss,
        "lr": lr,  # the scheduled rate, not one group's (towers and layers scale it)
        "logit_scale": clip.logit_scale.exp().item(),
        "temperature": 1.0 / clip.logit_scale.exp().item(),
        "grad_norm": grad_norm.item(),
        **rates,
        # Every process's step time and data wait: one small gather, at logging steps only.
        **stragglers.gather(accelerator, cfg.train.local_batch_size / rates["samples_per_s_per_process"],
                            rates["data_wait_fraction"]),
        "samples_seen": progress.samples_seen,
        "skipped_steps": progress.skipped_steps,
        **peak_memory(accelerator.device),
        **{f"health/{k}": v for k, v in representation_health(out.img_emb_BD, out.txt_emb_BD).items()},
        "health/candidates": candidates,
        **({"health/mi_lower_bound": infonce_mi_lower_bound(loss, candidates)} if infonce else {}),
        **data_metrics,
    }


def finish(cfg: Config, accelerator: Accelerator, t: Trainee, progress: RunState, syncer: RemoteSync,
           watchdog: Watchdog, metrics_log: MetricsLog, eval_cache: ClassifierCache, *, run_line: str,
           start_step: int) -> dict[str, float]:
    """The end of a run: final evaluation and exports (the model folder too) when it is complete,
    the report, then the process group and the last upload."""
    results: dict[str, float] = {}
    watchdog.phase("the final evaluation and export", cfg.train.hang_eval_timeout_s + cfg.train.hang_checkpoint_timeout_s)
    complete = progress.step >= cfg.train.steps
    # A resume of a complete run writes the final outputs again only if they are not that checkpoint's.
    if complete and (progress.step > start_step or broadcast_object_list(
            [final_outputs_missing(cfg.train.output_dir, progress.step) if accelerator.is_main_process else None])[0]):
        results = run_evaluation(accelerator, t.model, t.clip, cfg, t.bundle, eval_cache, eval_copy=t.eval_copy)
        metrics_log.log(results, progress.step)
        final_state = open_clip_state_dict(t.model)  # full tensors on the main process (collective)
        if accelerator.is_main_process:
            export_open_clip(final_state, os.path.join(cfg.train.output_dir, "open_clip_model.pt"))
            # The shareable folder (open_clip's hub layout, with a model card): local-dir:/hf-hub:.
            write_model_folder(os.path.join(cfg.train.output_dir, RUN_FOLDER), final_state, model=t.bundle.model,
                               tokenizer=t.bundle.tokenizer, name=t.bundle.name, cfg=cfg,
                               facts=RunFacts(progress.step, accelerator.num_processes, run_line, results))
            with open(os.path.join(cfg.train.output_dir, "eval.json"), "w") as f:
                json.dump({"step": progress.step, **results}, f, indent=1)
            write_report_safely(cfg.train.output_dir)  # report.png/html; a failure only warns
    elif accelerator.is_main_process:
        write_report_safely(cfg.train.output_dir)  # stopped by a signal: the curves so far
    # Release the DDP wrapper before the process group goes: a reducer outliving its group can
    # abort the interpreter at exit ("terminate called without an active exception").
    t.model = t.optimizer = None
    accelerator.free_memory()
    accelerator.end_training()
    watchdog.phase("the wait for the last upload", cfg.train.hang_checkpoint_timeout_s + cfg.train.remote_max_unsynced_s)
    syncer.finish(stopped=not complete)  # no collectives: after end_training
    return results


def final_outputs_missing(output_dir: str, step: int) -> bool:
    """Whether the exported model, the model folder or eval.json of the checkpoint at `step` is
    missing (asked on the main process, whose disk holds them)."""
    try:
        with open(os.path.join(output_dir, "eval.json")) as f:
            evaluated = json.load(f).get("step")
    except (OSError, ValueError):
        evaluated = None
    folder = os.path.join(output_dir, RUN_FOLDER)
    return (evaluated != step or not os.path.isfile(os.path.join(output_dir, "open_clip_model.pt"))
            or not all(os.path.isfile(os.path.join(folder, name)) for name in (CONFIG_NAME, WEIGHTS_NAME)))


def check_health(health: StepHealth, accelerator: Accelerator, stop: StopRequest, progress: RunState,
                 cfg: Config, checkpoint, syncer: RemoteSync) -> bool:
    """The periodic check (one small collective, every process at the same step): skipped-step
    counts into the run state; too many non-finite steps in a row stop the run with a checkpoint
    (skipped steps change nothing, so it holds the last good weights); a bucket mirror without a
    safe copy for too long stops it too. True: a stop signal came."""
    stop_now, progress.skipped_steps, worst, progress.nonfinite_in_a_row = health.check(
        accelerator, stop.requested, syncer.overdue())
    if health.upload_overdue:
        raise syncer.overdue_error()
    if worst >= cfg.train.max_nonfinite_steps:
        checkpoint()
        raise TrainingError(f"{worst} non-finite steps in a row (train.max_nonfinite_steps); last good "
                            f"state saved in {cfg.train.output_dir}/checkpoints")
    return stop_now


def has_evaluation(cfg: Config) -> bool:
    return bool(cfg.eval.zeroshot_sets() or cfg.eval.retrieval_sets() or cfg.eval.validation_sets())


def run_evaluation(accelerator: Accelerator, model, clip, cfg: Config, bundle,
                   cache: ClassifierCache | None = None, step: int | None = None,
                   eval_copy: EvalCopy | None = None) -> dict[str, float]:
    """Every evaluation (step None: the end of training) or those due at `step`. Only the encoders
    run in the training precision: under autocast the similarities would be bf16 too.

    FSDP2 (`eval_copy`): the copy holds the weights, gathered once, only during the evaluation."""
    if eval_copy is not None:
        clip = eval_copy.load(model, accelerator.device)
    try:
        results = evaluate(clip, cfg.eval, transform=bundle.eval_transform, tokenizer=bundle.tokenizer,
                           device=accelerator.device, rank=accelerator.process_index,
                           world_size=accelerator.num_processes, show_progress=accelerator.is_main_process,
                           autocast=accelerator.autocast, loss=cfg.loss, step=step, cache=cache)
    finally:
        if eval_copy is not None:
            eval_copy.release()
    if results and accelerator.is_main_process:
        log.info("eval: %s", " ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
