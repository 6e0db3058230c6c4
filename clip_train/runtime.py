"""What the accelerator set-up and the hot loop need to run on GPUs without a crash or a stall.

Set-up: the mixed precision `precision=auto` resolves to (probed on this process's own GPU), the
CUDA float32-matmul switch (TF32), the DDP and process-group options.

Hot loop: the host must not wait on the device in a step that does not log. A step that cannot
be applied (non-finite gradients) is skipped on the device: the gradient norm is computed from
the all-reduced gradients, so it is the same on every process and is the skip flag; a fused
optimizer (or fp16's GradScaler) applies it without reading it back. Skips are counted on the
device, and the counters and the stop signal (SIGTERM/SIGUSR1) are read with one small collective
only every `train.stop_check_every_steps` steps and at log and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import numpy as np
import torch
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch import nn

log = logging.getLogger("clip_train")


def own_cuda_device() -> torch.device:
    """This process's GPU: the launcher's LOCAL_RANK, as accelerate will pick it."""
    index = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", index % max(torch.cuda.device_count(), 1))


def cuda_bf16_native(device: torch.device) -> bool:
    """Native bf16 (Ampere or newer) on `device`, made current first: probing before the device
    is set would open a CUDA context on GPU 0 from every local rank. Emulated bf16 (pre-Ampere
    GPUs run bf16 matmuls in float32 at a fraction of fp16's speed) does not count."""
    torch.cuda.set_device(device)
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, cuda: bool, bf16_native: Callable[[], bool] = lambda: False) -> str:
    """Accelerate's mixed_precision value. auto: bf16 where the GPU has it natively, else fp16
    (with loss scaling); fp32 on the CPU unless bf16 is asked for explicitly. fp16 on the CPU is
    refused (ConfigError)."""
    if precision == "auto":
        if not cuda:
            return "no"
        return "bf16" if bf16_native() else "fp16"
    if not cuda and precision == "fp16":
        # A silent fall-back to fp32 would make a CPU run look like the fp16 run it is not.
        from clip_train.config import ConfigError

        raise ConfigError("train.precision=fp16 needs CUDA GPUs (fp16 autocast with loss scaling); on the "
                          "CPU use train.precision=no (fp32, what auto picks) or bf16")
    return precision


def cpu_precision_note(precision: str, cuda: bool) -> str | None:
    """The line a CPU run with bf16 autocast starts with (allowed: it checks bf16 numerics where
    there is no GPU, but runs several times slower than fp32)."""
    if not cuda and precision == "bf16":
        return ("train.precision=bf16 on the CPU: bf16 autocast, several times slower than fp32 "
                "(train.precision=no for fp32)")
    return None


@contextlib.contextmanager
def rng_isolated(device: torch.device) -> Iterator[None]:
    """Run what is not the training step (evaluation, trackers, the metrics file) without moving the
    training's random streams: torch's CPU generator and `device`'s, Python's `random` and
    numpy's global state are as they were afterwards.

    Why: dropout, patch dropout (open_clip draws its patch choice from the CPU generator even on
    a GPU) and drop-path consume these streams; one extra draw elsewhere (a DataLoader's base
    seed, a model built for evaluation) shifts every later mask, so a resumed run or a run with
    evaluation would no longer repeat the uninterrupted run."""
    py_state, np_state = random.getstate(), np.random.get_state()
    accel = device.type not in ("cpu", "meta")
    try:
        with torch.random.fork_rng(devices=[device] if accel else [], device_type=device.type if accel else "cuda"):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def fork_can_hang(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """CPython releases whose forked child takes the interpreter's thread-list lock before
    resetting it (gh-112275): a lock another thread held at the instant of the fork is then held
    for ever in the child. Fixed in 3.11.8; 3.12 has the right order; 3.10 counts as affected."""
    return version[:2] <= (3, 10) or (version[:2] == (3, 11) and version < (3, 11, 8))


def start_autograd_threads() -> None:
    """Start torch's autograd device threads now, at set-up, before a DataLoader forks workers.

    torch starts them at a process's first backward (one per GPU; under FSDP2 on CPUs too), and
    each, as it starts, registers with the interpreter under the thread-list lock (`fork_can_hang`):
    a loader's worker forked at that instant never started (seen: the evaluation right after a
    resumed run's first step). Started here, before the first fork, no fork can meet them
    starting; where no device has been set up yet (FSDP2 on CPUs), they never start."""
    torch.zeros((), requires_grad=True).backward()
    time.sleep(0.01)  # the GIL released: they finish registering (microseconds each)


@functools.cache  # once per process: every fork runs each registered hook
def settle_before_forks() -> bool:
    """Where `fork_can_hang`, let torch's communication threads out of the interpreter before
    every fork of this process (a DataLoader's workers); True where the hook was registered.

    gloo's threads (likely NCCL's watchdog on GPUs too; not checked) destroy finished
    collectives, and with them tensors that Python had let go (FSDP2's all-gather buffers): each
    such free enters the interpreter from that thread, registering under the thread-list lock
    (90 times in a 3-step FSDP2 run on 2 CPU processes, seen with gdb). A loader forked right
    after a collective could catch one there; its worker then never started (seen once in the
    test suite on Python 3.11.7). Before a fork the hook releases the GIL for 5 ms, so that
    pending frees finish, then waits until the lock is free (`sys._current_frames` takes it); a
    thread can then only catch the fork by starting a new free in the microseconds before it,
    and none is pending."""
    if not fork_can_hang():
        return False
    os.register_at_fork(before=_settle)
    return True


def _settle() -> None:
    time.sleep(0.005)
    sys._current_frames()


def configure_matmul_precision(tf32: bool, cuda: bool) -> None:
    """TF32 tensor cores for float32 matmuls on CUDA (the float32 parts: the loss, fp32 runs):
    ~8x the float32 throughput on Ampere+ at a 10-bit mantissa. Left alone on the CPU."""
    if cuda:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def accelerator_kwargs(process_group_timeout_s: float, init_method: str | None = None) -> list:
    """DDP and process-group options for `Accelerator(kwargs_handlers=...)`; `init_method`: the
    process group's rendezvous URL (None: torch's env://)."""
    # Every trainable parameter takes part in every step's last backward (the gradient cache
    # feeds the temperature through the forward; an unused logit bias is frozen), so DDP need
    # not search for unused parameters. Gradients as views of the all-reduce buckets: one copy
    # of the gradients less in memory and no copy in and out of the buckets.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, gradient_as_bucket_view=True)
    # Every process waits in a collective while the main process writes a checkpoint: the
    # timeout must outlast a save to a slow shared filesystem.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=process_group_timeout_s), init_method=init_method)
    return [ddp, group]


def buffers_change_in_training(model: nn.Module) -> bool:
    """True when training updates buffers (BatchNorm running statistics, e.g. open_clip's
    ModifiedResNet). Only then must DDP broadcast rank 0's buffers before every forward; a ViT's
    buffers (the text causal mask) are constant, and the broadcast would be one collective per
    step for nothing."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in model.modules())


def sync_buffers_every_forward(model: nn.Module, enabled: bool) -> None:
    """Set whether a DDP-wrapped model broadcasts rank 0's buffers before every forward (the
    initial broadcast happens either way). torch >= 2.14 names this `forward_sync_buffers` and
    warns about its `broadcast_buffers` argument, older versions read `broadcast_buffers`: the
    attribute is set after wrapping, so neither warns. Not DDP (one process, FSDP2): nothing."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.forward_sync_buffers = model.broadcast_buffers = enabled


def freeze_unused_logit_bias(clip: nn.Module, loss_kind: str) -> bool:
    """The CLIP (InfoNCE) loss never uses a logit bias (SigLIP models have one): left trainable,
    it gets no gradient and DDP fails at step 2 ("Expected to have finished reduction").
    Freeze it; it stays in checkpoints and exports unchanged. True when it was frozen."""
    bias = getattr(clip, "logit_bias", None)
    if loss_kind != "clip" or bias is None or not bias.requires_grad:
        return False
    bias.requires_grad_(False)
    return True


def optimizer_step(optimizer, skip: torch.Tensor, scaler=None) -> None:
    """optimizer.step() unless `skip` (a bool tensor, the same on every process), exactly: a
    skipped step leaves parameters and optimizer state (moments, step counts) untouched.

    fp16: GradScaler finds the inf/NaN gradients itself. A fused optimizer takes the flag as
    `found_inf` (as under GradScaler) and skips on the device. Any other optimizer needs the flag
    on the host: one device->host read per step."""
    if scaler is not None:
        optimizer.step()
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if getattr(inner, "_step_supports_amp_scaling", False) and inner.defaults.get("fused"):
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not skip.item():
        optimizer.step()


class StepHealth:
    """Skipped (non-finite) steps counted on the device; read every few steps with the stop flag.

    `record` is device-only. `check` is the one collective (a max over processes: under fp16 the
    non-finite loss is a per-process flag) and the one host read of the steps that call it."""

    def __init__(self, device: torch.device, skipped_steps: int = 0, in_a_row: int = 0):
        def counter(value: int) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.int64, device=device)

        self.device = device
        self.skipped, self.in_a_row = counter(skipped_steps), counter(in_a_row)
        self.worst_in_a_row, self.last_bad_step = counter(in_a_row), counter(0)
        self.skipped_at_last_check = skipped_steps
        self.upload_overdue = False

    def record(self, bad: torch.Tensor, step: int) -> None:
        self.skipped += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.worst_in_a_row = torch.maximum(self.worst_in_a_row, self.in_a_row)
        self.last_bad_step = torch.where(bad, step, self.last_bad_step)

    def check(self, accelerator, stop_requested: bool, upload_overdue: bool = False) -> tuple[bool, int, int, int]:
        """(stop, skipped_steps, worst run of non-finite steps since the last check, now in a
        row), agreed by every process. Call it at the same steps on every process.

        `upload_overdue` (the main process's bucket mirror has had no safe copy for too long) is
        agreed in the same collective and left in `self.upload_overdue`."""
        flags = torch.stack([torch.tensor(int(stop_requested), device=self.device), self.skipped,
                             self.worst_in_a_row, self.in_a_row, self.last_bad_step,
                             torch.tensor(int(upload_overdue), device=self.device)])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "max")
        stop, skipped, worst, in_a_row, last_bad, overdue = flags.tolist()
        self.upload_overdue = bool(overdue)
        if skipped > self.skipped_at_last_check:
            log.warning("step %d: non-finite loss or gradient, step skipped (%d skipped since the last "
                        "check, %d in a row)", last_bad, skipped - self.skipped_at_last_check, in_a_row)
        self.skipped_at_last_check = skipped
        self.worst_in_a_row = self.in_a_row.clone()
        return bool(stop), skipped, worst, in_a_row


PRECISION_WORDS = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling",
                   "fp8": "fp8"}


def describe_run(cfg, *, model_name: str, processes: int, device_type: str, mixed_precision: str,
                 sharded: bool, uint8_batches: bool, start_step: int = 0) -> str:
    """The run's first log line, in words: how it is distributed (and what is sharded), the
    precision, the gradient cache, the data path, the steps and where the outputs go."""
    local = cfg.train.local_batch_size
    where = "GPU" if device_type == "cuda" else device_type.upper()
    if processes == 1:
        layout = f"one process on the {where}"
    elif sharded:
        layout = (f"FSDP2 over {processes} {where} processes (parameters, gradients and optimizer "
                  "state sharded per transformer block; logit scale/bias replicated)")
    else:
        layout = f"DDP over {processes} {where} processes (full replicas, gradients all-reduced)"
    precision = PRECISION_WORDS.get(mixed_precision, mixed_precision)
    if device_type == "cuda" and cfg.train.tf32:
        precision += ", TF32 float32 matmuls"
    chunk = cfg.train.chunk_size
    if chunk is None or chunk >= local:
        cache = "gradient cache off"
    else:
        cache = f"gradient cache on (chunks of {chunk} of {local} samples per process"
        if sharded and processes > 1:
            cache += f", gradients reduced {cfg.train.sharded_grad_reduce.replace('_', ' ')}"
        cache += ")"
    decode = getattr(cfg.data, "decode", None)  # data.decode, where the config has it
    workers = cfg.data.workers
    data = (f"data: {f'{decode} decode, ' if decode else ''}"
            + (f"{workers} loader worker{'s' if workers > 1 else ''} per process, " if workers
               else "decoded in the training process, ")
            + ("uint8 batches normalised on the device" if uint8_batches else "float32 batches"))
    steps = f"{cfg.train.steps} steps" + (f" (resuming at step {start_step})" if start_step else "")
    outputs = f"outputs in {cfg.train.output_dir}"
    if cfg.train.remote_dir:
        outputs += f" (mirrored to {cfg.train.remote_dir})"
    return (f"training {model_name}: {layout}; global batch {local * processes} ({processes} x {local}); "
            f"{precision}; {cache}; {data}; {steps}; {outputs}")
