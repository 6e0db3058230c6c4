"""Running the evaluations: zero-shot, retrieval and validation loss over named data sets, each
process evaluating its share, combined with collectives; `clip-train eval`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clip_train.config import (
    Config,
    ConfigError,
    EvalConfig,
    EvalSet,
    LossConfig,
    check_eval_paths,
    check_shards,
)
from clip_train.evaluate.data import (
    PairSample,
    RetrievalSample,
    ZeroshotSample,
    ZeroshotSource,
    collate_captions,
    collate_zeroshot,
    imagefolder_loader,
    load_classnames,
    load_templates,
    progress,
    rank_shards,
    resolve_zeroshot,
    shard_loader,
    template_text,
)
from clip_train.evaluate.maths import (
    alignment,
    build_classifier,
    classification_counts,
    classification_metrics,
    retrieval_metrics,
    uniformity,
    validation_batch_losses,
    validation_metrics,
)
from clip_train.model import tower_trainable

log = logging.getLogger("clip_train.evaluate")

Autocast = Callable[[], contextlib.AbstractContextManager]


# --------------------------------------------------------------------------------------------
# Collectives (plain torch.distributed: the model passed in is unwrapped, no Accelerator needed)


def _all_reduce_sum(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _all_gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate, in rank order, tensors whose first dimension differs between ranks.

    A rank without data passes a tensor with 0 rows (other dims may be 0 too: they are taken
    from the ranks that have data)."""
    if world_size == 1:
        return x
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    trailing = torch.stack(shapes)[:, 1:].amax(dim=0).tolist()
    padded = x.new_zeros(max(rows), *trailing)
    if x.shape[0] > 0:
        padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:r] for p, r in zip(parts, rows, strict=True)], dim=0)


def _raise_if_any_failed(err: Exception | None, world_size: int, device: torch.device) -> None:
    """Agree on failure before the next collective: a rank that fails alone (bad shard, class
    index out of range) would otherwise leave the others waiting forever."""
    failed = torch.tensor([0 if err is None else 1], dtype=torch.long, device=device)
    failed = _all_reduce_sum(failed, world_size)
    if err is not None:
        raise err
    if int(failed) > 0:
        raise RuntimeError("evaluation failed on another process (its error is in its log)")


# --------------------------------------------------------------------------------------------
# Shared state of one evaluation


class ClassifierCache:
    """Zero-shot classifiers by (class names, templates): shared by the data sets of one
    evaluation, and kept from one evaluation to the next while the text tower is frozen (its
    classifiers cannot change then: a locked text tower embeds the prompts once per run)."""

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}
        self._model_id: int | None = None
        self._text_frozen = False

    def begin(self, model: nn.Module) -> None:
        """Start an evaluation of `model`: drop what may be stale."""
        frozen = not tower_trainable(model)[1]
        if not (frozen and self._text_frozen and self._model_id == id(model)):
            self._store.clear()
        self._model_id, self._text_frozen = id(model), frozen

    def get(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._store:
            self._store[key] = build()
        return self._store[key]


@dataclass
class _Context:
    model: nn.Module
    cfg: EvalConfig
    loss: LossConfig
    transform: Callable
    tokenizer: Callable
    device: torch.device
    rank: int
    world_size: int
    show_progress: bool
    autocast: Autocast
    cache: ClassifierCache = field(default_factory=ClassifierCache)

    @property
    def reports(self) -> bool:
        return self.show_progress and self.rank == 0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw float32 image embeddings: the encoder under autocast, nothing after it."""
        with self.autocast():
            emb = self.model.encode_image(images.to(self.device, non_blocking=True))
        return emb.float()

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            emb = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return emb.float()


def _metric_prefix(key: str, kind: str) -> str:
    """eval.zeroshot -> 'zeroshot/'; eval.zeroshot.imagenet -> 'zeroshot/imagenet/'."""
    name = key.split(".", 2)[2] if key.count(".") >= 2 else ""
    return f"{kind}/{name}/" if name else f"{kind}/"


def _renamed(metrics: dict[str, float], kind: str, key: str) -> dict[str, float]:
    prefix = _metric_prefix(key, kind)
    return {prefix + k.split("/", 1)[1]: v for k, v in metrics.items()}


def _gather_canonical(ctx: _Context, parts: dict[str, list[torch.Tensor]], empty: dict) -> dict:
    """All ranks' rows of each named tensor, concatenated in rank order."""
    return {
        name: _all_gather_rows(
            (torch.cat(p) if p else empty[name]).to(ctx.device), ctx.world_size
        )
        for name, p in parts.items()
    }


# --------------------------------------------------------------------------------------------
# Zero-shot classification


def _distributed_classifier(
    ctx: _Context, classnames: list[str], templates: list, desc: str
) -> torch.Tensor:
    """[D, C]; each rank embeds a contiguous block of classes (80 prompts each for ImageNet)."""
    num_classes = len(classnames)
    start = num_classes * ctx.rank // ctx.world_size
    stop = num_classes * (ctx.rank + 1) // ctx.world_size
    if stop > start:
        part_CD = build_classifier(
            ctx.model,
            ctx.tokenizer,
            classnames[start:stop],
            templates,
            device=ctx.device,
            batch_size=ctx.cfg.batch_size,
            autocast=ctx.autocast,
            progress=lambda it, **kw: progress(it, show=ctx.reports, **{**kw, "desc": desc}),
        ).T.contiguous()
    else:
        part_CD = torch.empty(0, 0, device=ctx.device)
    return _all_gather_rows(part_CD, ctx.world_size).T


def _zeroshot(ctx: _Context, source: ZeroshotSource) -> dict[str, float]:
    classnames = load_classnames(source.classnames, source.classnames_key)
    templates = load_templates(source.templates, source.templates_key)
    num_classes = len(classnames)
    cache_key = (tuple(classnames), tuple(template_text(t) for t in templates))
    classifier_DC = ctx.cache.get(
        cache_key,
        lambda: _distributed_classifier(ctx, classnames, templates, f"{source.key} classifier"),
    )
    counts = {
        "top1": torch.zeros(1, dtype=torch.long),
        "top5": torch.zeros(1, dtype=torch.long),
        "class_correct": torch.zeros(num_classes, dtype=torch.long),
        "class_total": torch.zeros(num_classes, dtype=torch.long),
    }
    counts = {k: v.to(ctx.device) for k, v in counts.items()}
    err: Exception | None = None
    try:
        if source.kind == "imagefolder":
            loader = imagefolder_loader(
                source, ctx.transform, num_classes, ctx.rank, ctx.world_size,
                ctx.cfg.batch_size, ctx.cfg.workers,
            )
        else:
            loader = shard_loader(
                rank_shards(source.data, ctx.rank, ctx.world_size),
                ZeroshotSample(ctx.transform),
                collate_zeroshot,
                ctx.cfg.batch_size,
                ctx.cfg.workers,
            )
        for images, labels_N in progress(loader, desc=source.key, show=ctx.reports):
            _check_labels(labels_N, num_classes, source)
            # float32 similarities: the classifier and the embeddings are float32, outside autocast.
            img_ND = F.normalize(ctx.encode_images(images), dim=-1)
            logits_NC = img_ND @ classifier_DC
            for key, value in classification_counts(
                logits_NC, labels_N.to(ctx.device), num_classes
            ).items():
                counts[key] += value
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
        err = e
    _raise_if_any_failed(err, ctx.world_size, ctx.device)
    return classification_metrics(
        {k: _all_reduce_sum(v, ctx.world_size).cpu() for k, v in counts.items()}
    )


def _check_labels(labels_N: torch.Tensor, num_classes: int, source: ZeroshotSource) -> None:
    if (labels_N < 0).any():
        raise ConfigError(
            f"{source.key}: a sample in {source.data} has no `cls` key "
            "(zero-shot shards need the class index under `cls`)"
        )
    if (labels_N >= num_classes).any():
        bad = int(labels_N.max())
        raise ConfigError(
            f"{source.key}: class index {bad} is out of range for the {num_classes} "
            f"class names of {source.classnames_key} ({source.classnames}); indices start at 0"
        )


# --------------------------------------------------------------------------------------------
# Retrieval and validation loss: embeddings gathered in canonical order


def _embed_pairs(ctx: _Context, key: str, spec: str, to_tuple: Callable) -> dict | None:
    """Every rank's image and caption embeddings (raw float32), in the canonical order (by
    shard, then position: one process reading all shards in order) with txt_owner_T, the
    image index of each caption. None when the data holds no usable sample."""
    img_embs, img_ids, txt_embs, txt_owner_ids = [], [], [], []
    err: Exception | None = None
    try:
        loader = shard_loader(
            rank_shards(spec, ctx.rank, ctx.world_size),
            to_tuple,
            collate_captions,
            ctx.cfg.batch_size,
            ctx.cfg.workers,
        )
        for images, tokens, owner_local_T, ids_N in progress(loader, desc=key, show=ctx.reports):
            img_embs.append(ctx.encode_images(images))
            txt_embs.extend(ctx.encode_texts(t) for t in tokens.split(ctx.cfg.batch_size))
            img_ids.append(ids_N)
            txt_owner_ids.append(ids_N[owner_local_T])
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
        err = e
    _raise_if_any_failed(err, ctx.world_size, ctx.device)
    no_rows, no_ids = torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    g = _gather_canonical(
        ctx,
        {"img": img_embs, "txt": txt_embs, "img_id": img_ids, "owner_id": txt_owner_ids},
        {"img": no_rows, "txt": no_rows, "img_id": no_ids, "owner_id": no_ids},
    )
    if g["img"].shape[0] == 0:
        return None
    # A stable sort keeps each image's captions in their order, so even ties in top-k resolve
    # alike for any process count.
    img_order = g["img_id"].argsort()
    img_id_N = g["img_id"][img_order]
    txt_order = torch.sort(g["owner_id"], stable=True).indices
    owner_id_T = g["owner_id"][txt_order]
    return {
        "img_ND": g["img"][img_order],
        "txt_TD": g["txt"][txt_order],
        "txt_owner_T": torch.searchsorted(img_id_N, owner_id_T),
    }


def _retrieval(ctx: _Context, key: str, entry: EvalSet) -> dict[str, float]:
    emb = _embed_pairs(ctx, key, entry.data, RetrievalSample(ctx.transform, ctx.tokenizer))
    if emb is None:
        return {"retrieval/num_images": 0.0, "retrieval/num_texts": 0.0}
    img_ND = F.normalize(emb["img_ND"], dim=-1)
    txt_TD = F.normalize(emb["txt_TD"], dim=-1)
    owner_T = emb["txt_owner_T"]
    chunk = ctx.cfg.retrieval_chunk_size
    out = retrieval_metrics(img_ND, txt_TD, owner_T, chunk_size=chunk)
    uni_img = uniformity(img_ND, chunk_size=chunk)
    uni_txt = uniformity(txt_TD, chunk_size=chunk)
    out.update(
        {
            "retrieval/alignment": alignment(img_ND, txt_TD, owner_T),
            "retrieval/uniformity": (uni_img + uni_txt) / 2,
            "retrieval/uniformity_image": uni_img,
            "retrieval/uniformity_text": uni_txt,
            "retrieval/num_images": float(img_ND.shape[0]),
            "retrieval/num_texts": float(txt_TD.shape[0]),
        }
    )
    return out


def _validation(ctx: _Context, key: str, entry: EvalSet) -> dict[str, float]:
    emb = _embed_pairs(ctx, key, entry.data, PairSample(ctx.transform, ctx.tokenizer))
    if emb is None:
        return {"val/num_samples": 0.0}
    bias = getattr(ctx.model, "logit_bias", None)
    batch_size = ctx.cfg.val_batch_size
    losses_J = validation_batch_losses(
        emb["img_ND"],
        emb["txt_TD"],
        ctx.model.logit_scale.detach(),
        None if bias is None else bias.detach(),
        batch_size=batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        kind=ctx.loss.kind,
        impl=ctx.loss.impl,
        tile_size=ctx.loss.tile_size,
        max_logit_scale=ctx.loss.max_logit_scale,
        debias_tau_plus=ctx.loss.debias_tau_plus,
        hardness_beta=ctx.loss.hardness_beta,
    )
    # Each batch was computed on exactly one rank (zeros elsewhere): the sum is exact.
    losses_J = _all_reduce_sum(losses_J, ctx.world_size).cpu()
    return validation_metrics(losses_J, emb["img_ND"].shape[0], batch_size)


# --------------------------------------------------------------------------------------------
# Entry point


def evaluate(
    model: nn.Module,
    cfg: EvalConfig,
    *,
    transform: Callable,
    tokenizer: Callable,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = False,
    autocast: Autocast = contextlib.nullcontext,
    loss: LossConfig | None = None,
    step: int | None = None,
    cache: ClassifierCache | None = None,
) -> dict[str, float]:
    """Every configured evaluation ({} when none is), or with `step` only the entries whose
    cadence (eval.every_steps or the entry's own) divides it.

    Call on every process with the unwrapped open_clip model (encode_image/encode_text) already
    on `device`; with world_size > 1 torch.distributed must be initialised. Each rank reads its
    share of the data; every rank returns the same dict, equal to a one-process evaluation.
    Only the encoders run under `autocast` (e.g. accelerator.autocast): similarities, top-k,
    uniformity and losses are float32 whatever the training precision. `loss`: the objective of
    the validation loss (default LossConfig()). `cache`: pass the same ClassifierCache to every
    evaluation of a run, so a frozen text tower embeds the prompts once. `show_progress`: this
    process reports progress (a bar at a terminal, else log lines)."""
    device = torch.device(device)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"evaluate: world_size={world_size} needs an initialised process group")

    def wanted(entry: EvalSet) -> bool:
        every = cfg.cadence(entry)
        return step is None or (every > 0 and step % every == 0)

    zeroshot = {k: e for k, e in cfg.zeroshot_sets().items() if wanted(e)}
    retrieval = {k: e for k, e in cfg.retrieval_sets().items() if wanted(e)}
    validation = {k: e for k, e in cfg.validation_sets().items() if wanted(e)}
    # Same inputs on every rank, so a bad path fails everywhere at once, before any collective.
    check_eval_paths(cfg)
    sources = [
        resolve_zeroshot(k, e.data, e.classnames, e.templates, (cfg.classnames, cfg.templates))
        for k, e in zeroshot.items()
    ]
    for source in sources:
        if source.kind == "shards":  # a clip_benchmark folder's test/ shards, named by nshards.txt
            check_shards(source.data, source.key)
    ctx = _Context(
        model, cfg, loss or LossConfig(), transform, tokenizer, device, rank, world_size,
        show_progress, autocast, cache or ClassifierCache(),
    )
    ctx.cache.begin(model)
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    try:
        with torch.no_grad():
            for source in sources:
                results.update(_renamed(_zeroshot(ctx, source), "zeroshot", source.key))
            for key, entry in retrieval.items():
                results.update(_renamed(_retrieval(ctx, key, entry), "retrieval", key))
            for key, entry in validation.items():
                results.update(_renamed(_validation(ctx, key, entry), "val", key))
    finally:
        model.train(was_training)
    return results


def format_table(results: dict[str, float]) -> str:
    """A small markdown table of the results."""
    lines = ["| metric | value |", "|---|---|"]
    for key, value in results.items():
        shown = (
            f"{value:.0f}"
            if key.endswith(("num_samples", "num_images", "num_texts", "num_batches"))
            else f"{value:.4f}"
        )
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def run_eval(cfg: Config, checkpoint: str | None, output: str | None) -> dict[str, float]:
    """`clip-train eval`: evaluate a training checkpoint directory, an exported open_clip file or a
    model folder (open_clip's hub layout: a run's model/, or `clip-train export --output DIR`).

    Runs alone or under `accelerate launch` (every process evaluates its share), in float32.
    The main process prints a table and writes JSON to `output` (default:
    <train.output_dir>/eval.json)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from clip_train.checkpoint import load_model_weights
    from clip_train.hub import LOCAL_DIR_PREFIX, is_model_folder
    from clip_train.model import build_model
    from clip_train.runtime import settle_before_forks

    settle_before_forks()  # its loaders fork after collectives (runtime.fork_can_hang)

    if not (cfg.eval.zeroshot_sets() or cfg.eval.retrieval_sets() or cfg.eval.validation_sets()):
        raise ConfigError(
            "eval: nothing to evaluate; set eval.zeroshot (with eval.classnames), "
            "eval.retrieval and/or eval.validation"
        )
    if checkpoint is not None and not os.path.exists(checkpoint):
        raise ConfigError(f"--checkpoint: no such file or directory {checkpoint!r}")
    folder = checkpoint is not None and is_model_folder(checkpoint)
    if folder:
        # A model folder (a run's model/, `clip-train export --output DIR`, a downloaded hub repo):
        # architecture, weights and preprocessing come from it, as clip_benchmark loads it.
        if cfg.model.name != f"{LOCAL_DIR_PREFIX}{checkpoint}":  # logged by rank 0 only
            log.info("eval: the model is the folder %s (its open_clip_config.json), not model.name=%s",
                     checkpoint, cfg.model.name)
        cfg.model.name, cfg.model.pretrained = f"{LOCAL_DIR_PREFIX}{checkpoint}", None
    elif checkpoint is not None and not os.path.isdir(checkpoint):
        # An exported open_clip file: open_clip's loader also converts older/3rd-party layouts.
        cfg.model.pretrained = checkpoint
    # As Accelerator does: ACCELERATE_USE_CPU=true makes a launched CPU job one gloo group
    # (without it every process would run alone).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    bundle = build_model(cfg.model)
    if checkpoint is not None and os.path.isdir(checkpoint) and not folder:
        load_model_weights(bundle.model, checkpoint)
    if checkpoint is None and cfg.model.pretrained is None and state.is_main_process:
        log.warning(
            "eval: no --checkpoint and no model.pretrained: evaluating a randomly initialised model"
        )
    model = bundle.model.to(state.device)
    results = evaluate(
        model,
        cfg.eval,
        transform=bundle.eval_transform,
        tokenizer=bundle.tokenizer,
        device=state.device,
        rank=state.process_index,
        world_size=state.num_processes,
        show_progress=state.is_main_process,
        loss=cfg.loss,
    )
    if state.is_main_process:
        path = output or os.path.join(cfg.train.output_dir, "eval.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "checkpoint": checkpoint or cfg.model.pretrained,
                    "model": cfg.model.name,
                    "results": results,
                },
                f,
                indent=2,
            )
        print(format_table(results))
        print(f"wrote {path}")
    return results
