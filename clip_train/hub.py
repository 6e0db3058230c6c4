"""The shareable model folder: open_clip's hub layout, written at the end of every run
(`<train.output_dir>/model/`) and by `clip-train export --output DIR`.

    open_clip_config.json        {"model_cfg": the architecture, "preprocess_cfg": the image size,
                                 mean, std, interpolation and resize mode used in training}
    open_clip_model.safetensors  the weights (a plain open_clip state dict)
    README.md                    the model card: model, data, steps, batch, loss, final evaluation,
                                 how to load it
    (tokenizer files)            only for Hugging Face tokenizers, which open_clip reads from the folder

It is what `open_clip.create_model_and_transforms("local-dir:<folder>")`, clip_benchmark's
`--model local-dir:<folder>` and, once uploaded with `hf upload`, `hf-hub:<user>/<repo>` load, with
no other file: a model defined by a local JSON (configs/models/*.json) travels inside the config.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import nn

from clip_train.config import Config

LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CARD_NAME = "README.md"
RUN_FOLDER = "model"  # the folder's name under train.output_dir
PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


def is_model_folder(path: str | os.PathLike) -> bool:
    """A folder in open_clip's hub layout (what `local-dir:` loads)."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def model_config(name: str, cfg: Config) -> dict:
    """The open_clip model config of the trained architecture, with force_image_size and
    force_quick_gelu applied (open_clip applies them to a copy when it builds the model, so the
    registry lacks them)."""
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config for {name!r}")
    model_cfg = json.loads(json.dumps(model_cfg))  # a plain copy, JSON-safe
    if cfg.model.force_image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = cfg.model.force_image_size
    if getattr(cfg.model, "force_quick_gelu", False):  # open_clip's force_quick_gelu, likewise
        model_cfg["quick_gelu"] = True
    return model_cfg


def preprocess_config(model: nn.Module) -> dict:
    """The preprocessing the model was built with (clip-train's eval transform and the train
    transform's normalisation use exactly these), as open_clip's PreprocessCfg keys."""
    pp = open_clip.get_model_preprocess_cfg(model)
    out = {k: pp[k] for k in PREPROCESS_KEYS if k in pp and pp[k] is not None}
    return json.loads(json.dumps(out))  # tuples -> lists


@dataclass
class RunFacts:
    """What the model card says about how the weights were made."""

    step: int | None  # None: unknown (an exported file)
    processes: int | None = None  # None: unknown (an export of a checkpoint without RNG files)
    setup: str | None = None  # the run's first line in words (clip_train.runtime.describe_run)
    results: dict[str, float] = field(default_factory=dict)  # final evaluation, metric -> value


def _safetensors_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared ones)."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ptr in seen:
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    return out


def write_model_folder(folder: str | os.PathLike, state: dict[str, torch.Tensor] | nn.Module, *,
                       model: nn.Module, tokenizer, name: str, cfg: Config, facts: RunFacts) -> Path:
    """Write the folder (replacing an older one whole): config, safetensors weights, model card.

    `model` is the open_clip model whose preprocessing is recorded (its weights are `state`, which
    sharded runs gather first: clip_train.sharding.open_clip_state_dict)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = state.state_dict() if isinstance(state, nn.Module) else state
    save_file(_safetensors_state(state), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    model_cfg, preprocess = model_config(name, cfg), preprocess_config(model)
    (tmp / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                              indent=2) + "\n")
    if hasattr(tokenizer, "save_pretrained"):  # an HFTokenizer: local-dir: reads it from the folder
        tokenizer.save_pretrained(str(tmp))
    n_params = sum(v.numel() for v in state.values())
    (tmp / CARD_NAME).write_text(model_card(folder, name, cfg, facts, preprocess, n_params))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_facts(checkpoint: str, cfg: Config) -> RunFacts:
    """What `clip-train export` knows of a checkpoint: its step and process count (one RNG-state
    file per process), and the run's final evaluation when the checkpoint is the final step."""
    from accelerate.utils.constants import RNG_STATE_NAME

    from clip_train.checkpoint import step_of

    path = Path(checkpoint)
    if not path.is_dir():
        return RunFacts(step=None)
    try:
        step = step_of(path)
    except AttributeError:  # not named step_NNNNNNNN
        step = None
    processes = len(list(path.glob(f"{RNG_STATE_NAME}_*.pkl"))) or None
    results: dict[str, float] = {}
    final = Path(cfg.train.output_dir) / "eval.json"
    if step is not None and final.is_file():
        saved = json.loads(final.read_text())
        if saved.get("step") == step:  # written by the training run at its end
            results = {k: v for k, v in saved.items() if k != "step"}
    return RunFacts(step, processes, None, results)


def _fmt(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # counts (num_samples, ...)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def model_card(folder: Path, name: str, cfg: Config, facts: RunFacts, preprocess: dict,
               n_params: int) -> str:
    """The folder's README.md: a Hugging Face model card (its YAML header tags it as open_clip)."""
    title = Path(name).stem if name.endswith(".json") else name.removeprefix("hf-hub:")
    local = f"{LOCAL_DIR_PREFIX}{folder}"
    if facts.processes is not None:
        batch = (f"{cfg.train.local_batch_size * facts.processes} ({facts.processes} "
                 f"process{'es' if facts.processes > 1 else ''} x {cfg.train.local_batch_size})")
    else:
        batch = f"{cfg.train.local_batch_size} per process"
    loss = {"clip": "CLIP (symmetric InfoNCE)", "siglip": "SigLIP (pairwise sigmoid)"}[cfg.loss.kind]
    extras = [f"queue of {cfg.loss.queue_size} keys" if cfg.loss.queue_size else "",
              f"momentum encoder {cfg.loss.momentum}" if cfg.loss.momentum else "",
              f"debiased, tau+ {cfg.loss.debias_tau_plus}" if cfg.loss.debias_tau_plus else "",
              f"hard negatives, beta {cfg.loss.hardness_beta}" if cfg.loss.hardness_beta else ""]
    loss += "".join(f", {e}" for e in extras if e)
    init = cfg.model.pretrained or ("from scratch" if not cfg.model.name.startswith(("hf-hub:", LOCAL_DIR_PREFIX))
                                    else f"from {cfg.model.name}")
    rows = [
        ("model", f"`{title}` (open_clip architecture in `{CONFIG_NAME}`), {n_params / 1e6:.1f} M parameters"),
        ("initialised", f"`{init}`" if cfg.model.pretrained else init),
        ("data", f"`{cfg.data.train}`" if cfg.data.train else "(not recorded)"),
        ("steps", f"{facts.step} of {cfg.train.steps}" if facts.step is not None else "(unknown)"),
        ("global batch", batch),
        ("samples seen", f"{facts.step * cfg.train.local_batch_size * facts.processes:,}"
         if facts.processes is not None and facts.step is not None else "(unknown)"),
        ("loss", loss + f", logit scale clamped at {cfg.loss.max_logit_scale:g}"),
        ("optimizer", f"{cfg.optim.opt}, lr {cfg.optim.lr:g} ({cfg.optim.schedule}, {cfg.optim.warmup_steps} "
                      f"warmup steps), weight decay {cfg.optim.weight_decay:g}"),
        ("preprocessing", ", ".join(f"{k} {v}" for k, v in preprocess.items())),
    ]
    if facts.setup:
        rows.append(("run", facts.setup))
    lines = [
        "---",
        "library_name: open_clip",
        "tags: [clip, open_clip, clip-train, zero-shot-image-classification]",
        "pipeline_tag: zero-shot-image-classification",
        "---",
        "",
        f"# {title}, trained with clip-train",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    evals = {k: v for k, v in facts.results.items() if k.startswith(("zeroshot/", "retrieval/", "val/"))}
    if evals:
        lines += [f"## Evaluation at step {facts.step}", "", "| metric | value |", "| --- | ---: |",
                  *[f"| {k} | {_fmt(v)} |" for k, v in evals.items()], ""]
    else:
        lines += ["## Evaluation", "",
                  f"Not evaluated when this folder was written: `clip-train eval --checkpoint {folder} "
                  "eval.zeroshot=...` scores it.", ""]
    lines += [
        "## Use it",
        "",
        "```python",
        "import open_clip",
        f'model, _, preprocess = open_clip.create_model_and_transforms("{local}")',
        f'tokenizer = open_clip.get_tokenizer("{local}")',
        "```",
        "",
        "After `hf upload <user>/<repo> " + f"{folder} .` the same loads as `hf-hub:<user>/<repo>`. "
        f"clip_benchmark: `clip_benchmark eval --model {local} --dataset ...`; clip-train: "
        f"`clip-train eval --checkpoint {folder} ...`, or fine-tune it with `model.name={local}`.",
        "",
    ]
    return "\n".join(lines)
