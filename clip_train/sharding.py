"""Sharded training (FSDP2 through Accelerate): the one place that knows parameters may be sharded.

How a run becomes sharded: `accelerate launch --config_file launch/accelerate/fsdp2.yaml` sets
ACCELERATE_USE_FSDP=true and FSDP_VERSION=2. On GPUs Accelerate then runs its FSDP2 code
(`Accelerator.prepare` → `fsdp2_prepare_model`: `fully_shard` on every ResidualAttentionBlock of
both towers and on the root; `save_state`/`load_state` through torch.distributed.checkpoint;
DTensor-aware `clip_grad_norm_`; `no_sync` → `set_requires_gradient_sync`). On CPU processes
accelerate 1.15 ignores the FSDP settings and runs DDP (state.py switches to FSDP only for
accelerator devices, never for MULTI_CPU); `enable_fsdp2` then switches Accelerate's state to
FSDP itself, so the gloo test runs take the very same Accelerate code path as GPU runs.

What this module adds around Accelerate's path:
- open_clip's scalar `logit_scale` (and `logit_bias`) cannot be sharded (`fully_shard` refuses
  0-d parameters). They stay plain, replicated tensors (`ignored_params`), so the temperature
  clamp and logging read them as before; their gradient is averaged over processes here, once
  per step, after FSDP has reduce-scattered the rest.
- Mixed precision: bf16 parameters for compute, gradients reduced in float32, float32 master
  parameters and AdamW state (FSDP2 MixedPrecisionPolicy through Accelerate's plugin).
- Full tensors when needed: the open_clip state dict for export (gathered to the main process on
  CPU) and an unsharded copy of the model for evaluation (`EvalCopy`: made from the training
  model before sharding, filled with the gathered weights once per evaluation).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from clip_train.config import ClipTrainError

# open_clip's transformer block, in both towers: one FSDP unit each.
BLOCK_CLASS = "ResidualAttentionBlock"
SCALAR_NAMES = ("logit_scale", "logit_bias")


class ShardingError(ClipTrainError):
    """A launch or config combination that sharded training cannot run."""


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (accelerate launch with an FSDP config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp2(accelerator) -> bool:
    """Make Accelerate run its FSDP2 code path when the launch asked for it; True if sharded.

    On GPUs Accelerate already did (is_fsdp2). On CPU processes it silently fell back to DDP
    (MULTI_CPU): build the plugin from the same environment and switch the state to FSDP, so the
    rest of the run (prepare, no_sync, clip_grad_norm_, save_state/load_state) is Accelerate's
    FSDP2 code, as on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.is_fsdp2:
        return True
    if str(accelerator.distributed_type) == str(DistributedType.FSDP):
        raise ShardingError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate "
                            "config (launch/accelerate/fsdp2.yaml)")
    if not fsdp_requested():
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ShardingError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate "
                            "config (launch/accelerate/fsdp2.yaml)")
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ShardingError(f"FSDP2 needs several processes; accelerate runs {accelerator.distributed_type}")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ShardingError("fsdp_offload_params: true needs GPUs (on CPU processes the parameters are in "
                            "CPU memory already): set it to false in the accelerate config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def check_supported(cfg) -> None:
    """Config keys sharded training refuses, in one line naming them."""
    if cfg.loss.momentum > 0:
        raise ShardingError("loss.momentum > 0 (momentum encoder) is not supported with FSDP2: its EMA "
                            "copy of the towers would be a full, unsharded model on every process; use "
                            "loss.momentum=0 (a plain loss.queue_size works) or a DDP config")
    if cfg.model.torch_compile:
        raise ShardingError("model.torch_compile=true is not supported with FSDP2 here (not tested): "
                            "set model.torch_compile=false")


def check_mirror_disk(accelerator, cfg) -> None:
    """FSDP2 with train.remote_dir needs one output_dir disk for every process: each process
    writes its own shards of a checkpoint, and only the main process uploads its directory."""
    from clip_train.remote import one_disk_for_all

    if cfg.train.remote_dir and accelerator.num_processes > 1 \
            and not one_disk_for_all(accelerator, cfg.train.output_dir):
        raise ShardingError("train.remote_dir with FSDP2 needs train.output_dir on a filesystem every "
                            "process shares (each process writes its own shards; the main process "
                            "uploads them): use a shared output_dir, or a DDP config on node-local disks")


def prepare_model(accelerator, model: nn.Module) -> None:
    """Before `accelerator.prepare`: tell Accelerate's FSDP2 plugin how to shard a DualEncoder.

    Units: every open_clip ResidualAttentionBlock of both towers, then the root. The temperature
    and bias stay replicated (`ignored_params`), on the device, with their checkpoint form
    unchanged. Mixed precision reduces gradients in float32 whatever the compute dtype."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if accelerator.distributed_type != DistributedType.FSDP:
        raise ShardingError("prepare_model: accelerate is not running FSDP2 (call enable_fsdp2 first)")
    plugin = accelerator.state.fsdp_plugin
    # open_clip's model class is the unit: the same on every tower, whatever the config file says.
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = [BLOCK_CLASS]
    scalars = [p for n, p in model.named_parameters() if n.split(".")[-1] in SCALAR_NAMES]
    for p in scalars:
        p.data = p.data.to(accelerator.device)
    # Accelerate turns ignored_modules into fully_shard(ignored_params=...); a ParameterList holds
    # the very Parameter objects of the model, so nothing is copied.
    plugin.ignored_modules = [nn.ParameterList(scalars)]
    mp = plugin.mixed_precision_policy
    if mp is not None and mp.param_dtype not in (None, torch.float32):
        # Accelerate reduces in the compute dtype; summing bf16 gradients over many processes
        # loses bits, so reduce in float32 (master weights and AdamW state stay float32).
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=mp.param_dtype,
                                                             reduce_dtype=torch.float32,
                                                             output_dtype=mp.output_dtype,
                                                             cast_forward_inputs=mp.cast_forward_inputs)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP does not manage (plain tensors): the temperature and bias."""
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if not isinstance(p, DTensor)]


def reduce_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the replicated (unsharded) parameters over processes.

    FSDP reduce-scatters the gradients it manages; the ignored temperature and bias are left
    alone, so they are averaged here, once per step, like DDP would. No-op outside FSDP."""
    if not is_sharded(model) or not dist.is_initialized():
        return
    world = dist.get_world_size()
    for p in replicated_parameters(model):
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def gradient_sync_context(model: nn.Module, last: bool, accelerator, reduce: str) -> contextlib.AbstractContextManager:
    """Gradient reduction for one gradient-cache chunk.

    DDP: all-reduce once, on the last chunk (`no_sync` before). FSDP2: with reduce="every_chunk"
    (default) every chunk's backward reduce-scatters, so gradients stay sharded (1/N memory) at
    the cost of one reduce-scatter per chunk; with "last_chunk" the unsharded gradients
    accumulate locally (`set_requires_gradient_sync(False)`) and are reduced once."""
    if last:
        return contextlib.nullcontext()
    if is_sharded(model) and reduce == "every_chunk":
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def open_clip_state_dict(model: nn.Module, *, to_all: bool = False) -> dict[str, torch.Tensor]:
    """The full open_clip state dict (plain keys) of a prepared DualEncoder.

    Sharded: collective, call on every process; the main process gets the tensors on the CPU
    (to_all: every process gets them, on the device), the others {}. Unsharded (DDP or one
    process): the model's own tensors, not copied (export_open_clip moves what it writes to the
    CPU, so the other processes copy nothing)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not to_all))
    else:
        state = getattr(model, "module", model).state_dict()  # DDP wraps the DualEncoder
    return {k.removeprefix("clip."): v for k, v in state.items()}


class EvalCopy:
    """The plain open_clip model that evaluates a sharded run, on every process.

    Made once, before sharding, from the training model itself: the same modules, options
    (model.force_image_size, locked towers, a Hugging Face text tower...), frozen parameters and
    constant buffers (the text causal mask), so nothing is rebuilt, downloaded or randomly
    initialised at an evaluation (an initialisation would draw from training's generators).
    Between evaluations it holds no weights (meta tensors): `load` fills it with the current
    full weights (collective), `release` frees them. It is the same object at every evaluation,
    so a frozen text tower's zero-shot classifiers stay cached (evaluate.ClassifierCache)."""

    def __init__(self, clip: nn.Module):
        import copy

        memo: dict[int, torch.Tensor] = {}
        self._constant: dict[str, torch.Tensor] = {}  # non-persistent buffers: not in a state dict
        for prefix, module in clip.named_modules():
            for p in module.parameters(recurse=False):
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for name, b in module.named_buffers(recurse=False):
                if name in module._non_persistent_buffers_set:
                    self._constant[f"{prefix}.{name}" if prefix else name] = b.detach().clone()
                else:
                    memo[id(b)] = torch.empty_like(b, device="meta")
        # deepcopy takes every tensor found in `memo` as its own copy: the weights are never copied.
        self.model = copy.deepcopy(clip, memo)
        self.model.eval()

    def load(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The copy with `model`'s current weights on `device` (collective when sharded)."""
        state = open_clip_state_dict(model, to_all=True)
        self.model.to_empty(device=device)
        for name, value in self._constant.items():
            owner, _, buffer = name.rpartition(".")
            self.model.get_submodule(owner)._buffers[buffer] = value.to(device)
        self.model.load_state_dict(state, strict=True)
        return self.model

    def release(self) -> None:
        """Free the weights until the next `load`."""
        self.model.to("meta")


def sharded_checkpoint_state(path: str) -> dict[str, torch.Tensor] | None:
    """The full model state dict from a sharded (torch.distributed.checkpoint) accelerate
    checkpoint directory, or None when `path` holds no sharded model. Runs in one process."""
    from pathlib import Path

    model_dir = Path(path) / "pytorch_model_fsdp_0"
    if not model_dir.is_dir():
        return None
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.pt")
        dcp_to_torch_save(str(model_dir), out)
        state = torch.load(out, map_location="cpu", weights_only=True)
    # accelerate saves {"model": state_dict} under DCP
    return state.get("model", state)
