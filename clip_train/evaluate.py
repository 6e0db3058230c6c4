"""Zero-shot classification, image-text retrieval and representation health (alignment/uniformity).

Every process evaluates its own part of the data (shards split by rank, then by loader worker, in
order, unshuffled) and the parts are combined with collectives: classification counts are summed,
retrieval embeddings are gathered. So an evaluation under `accelerate launch` is not N times slower,
every process returns the same numbers, and they equal a single-process evaluation. (open_clip
evaluates on rank 0 while the others wait in a collective, which hits NCCL timeouts on long runs.)

Shape suffixes: N images, T texts (captions; an image may have several), C classes, D embedding
dim, Q queries and K keys in one similarity block, k top-k.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch import nn
from tqdm import tqdm

from clip_train.config import Config, ConfigError, EvalConfig, check_shards, expand_urls

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
RECALL_KS = (1, 5, 10)
# Wang & Isola (2020): uniformity = log E exp(-t ||x - y||^2) over distinct pairs, with t = 2.
UNIFORMITY_T = 2.0


# --------------------------------------------------------------------------------------------
# Class names and prompt templates


def _read_list(path: str, key: str) -> list[str]:
    """A JSON list of strings, or a text file with one entry per non-empty line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"{key}: {path} must hold a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines()]
    items = [s for s in items if s.strip()]
    if not items:
        raise ConfigError(f"{key}: {path} is empty")
    return items


def load_classnames(spec: str) -> list[str]:
    """Class names from `eval.classnames`: `imagenet`, a JSON list or a one-per-line text file."""
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    return _read_list(spec, "eval.classnames")


@dataclass(frozen=True)
class _Template:
    # A picklable `str -> str` (loader workers may be spawned). str.format is avoided on purpose:
    # a template such as "a {} (with {braces})" would raise.
    text: str

    def __call__(self, classname: str) -> str:
        return self.text.replace("{}", classname)


def load_templates(spec: str | None) -> list[Callable[[str], str]]:
    """Prompt templates from `eval.templates`; None or `imagenet`: the 80 OpenAI templates."""
    if spec is None or spec == "imagenet":
        return list(OPENAI_IMAGENET_TEMPLATES)
    templates = _read_list(spec, "eval.templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(
            f"eval.templates: template {bad[0]!r} in {spec} has no '{{}}' where the "
            f"class name goes ({len(bad)} of {len(templates)} templates lack it)"
        )
    return [_Template(t) for t in templates]


# --------------------------------------------------------------------------------------------
# Pure maths


def build_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]],
    *,
    device: torch.device | str,
    batch_size: int,
    show_progress: bool = False,
) -> torch.Tensor:
    """Zero-shot weights [D, C]: per class, the mean over templates of the normalised text
    embeddings, renormalised (open_clip's builder, about `batch_size` prompts per forward)."""
    per_batch = max(1, batch_size // len(templates))
    weights_DC = open_clip.build_zero_shot_classifier(
        model,
        tokenizer,
        list(classnames),
        list(templates),
        num_classes_per_batch=per_batch,
        device=device,
        use_tqdm=show_progress,
    )
    return weights_DC.float()


def classification_counts(
    logits_NC: torch.Tensor, labels_N: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Summable counts: top-1/top-5 hits overall and per-class top-1 hits and totals (int64)."""
    k = min(5, logits_NC.shape[1])
    topk_Nk = logits_NC.topk(k, dim=1).indices
    hit_Nk = topk_Nk == labels_N[:, None]
    top1_N = hit_Nk[:, 0]
    return {
        "top1": top1_N.sum().long().reshape(1),
        "top5": hit_Nk.any(dim=1).sum().long().reshape(1),
        "class_correct": torch.bincount(labels_N[top1_N], minlength=num_classes).long(),
        "class_total": torch.bincount(labels_N, minlength=num_classes).long(),
    }


def classification_metrics(counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """top-1, top-5 and mean per-class recall (over the classes present) from summed counts."""
    total = int(counts["class_total"].sum())
    if total == 0:
        return {"zeroshot/num_samples": 0.0}
    present = counts["class_total"] > 0
    recall_C = counts["class_correct"][present].double() / counts["class_total"][present].double()
    return {
        "zeroshot/top1": int(counts["top1"]) / total,
        "zeroshot/top5": int(counts["top5"]) / total,
        "zeroshot/mean_per_class_recall": float(recall_C.mean()),
        "zeroshot/num_samples": float(total),
    }


def chunked_topk(
    query_QD: torch.Tensor, keys_KD: torch.Tensor, k: int, chunk_size: int
) -> torch.Tensor:
    """Indices [Q, k] of the k keys with the largest dot product with each query.

    Blocks of at most chunk_size x chunk_size similarities are formed, merging a running top-k
    across key blocks, so memory stays O(chunk_size^2) for any Q and K (1M pairs fit)."""
    num_q, num_k = query_QD.shape[0], keys_KD.shape[0]
    k = min(k, num_k)
    out_Qk = torch.empty(num_q, k, dtype=torch.long, device=query_QD.device)
    for q0 in range(0, num_q, chunk_size):
        q_QD = query_QD[q0 : q0 + chunk_size]
        best_val_Qk = q_QD.new_empty(q_QD.shape[0], 0)
        best_idx_Qk = torch.empty(q_QD.shape[0], 0, dtype=torch.long, device=q_QD.device)
        for k0 in range(0, num_k, chunk_size):
            sim_QK = q_QD @ keys_KD[k0 : k0 + chunk_size].T
            idx_QK = torch.arange(k0, k0 + sim_QK.shape[1], device=q_QD.device).expand_as(sim_QK)
            val = torch.cat([best_val_Qk, sim_QK], dim=1)
            idx = torch.cat([best_idx_Qk, idx_QK], dim=1)
            best_val_Qk, pos = val.topk(min(k, val.shape[1]), dim=1)
            best_idx_Qk = idx.gather(1, pos)
        out_Qk[q0 : q0 + chunk_size] = best_idx_Qk
    return out_Qk


def retrieval_metrics(
    img_emb_ND: torch.Tensor,
    txt_emb_TD: torch.Tensor,
    txt_owner_T: torch.Tensor,
    *,
    chunk_size: int,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k both ways on normalised embeddings; text t is a caption of image txt_owner_T[t].

    Image->text: an image counts as found when any of its captions is among the top k texts.
    Text->image: a caption counts when its image is among the top k images."""
    kmax = max(ks)
    i2t_Nk = chunked_topk(img_emb_ND, txt_emb_TD, kmax, chunk_size)
    i2t_hit_Nk = (
        txt_owner_T[i2t_Nk] == torch.arange(img_emb_ND.shape[0], device=i2t_Nk.device)[:, None]
    )
    t2i_Tk = chunked_topk(txt_emb_TD, img_emb_ND, kmax, chunk_size)
    t2i_hit_Tk = t2i_Tk == txt_owner_T[:, None]
    out = {}
    for k in ks:
        out[f"retrieval/image_to_text_R@{k}"] = float(i2t_hit_Nk[:, :k].any(dim=1).double().mean())
        out[f"retrieval/text_to_image_R@{k}"] = float(t2i_hit_Tk[:, :k].any(dim=1).double().mean())
    return out


def alignment(
    img_emb_ND: torch.Tensor, txt_emb_TD: torch.Tensor, txt_owner_T: torch.Tensor
) -> float:
    """E ||f(image) - f(caption)||^2 over positive pairs (Wang & Isola 2020, alpha = 2)."""
    diff_TD = img_emb_ND[txt_owner_T].double() - txt_emb_TD.double()
    return float(diff_TD.pow(2).sum(dim=1).mean())


def uniformity(emb_ND: torch.Tensor, *, chunk_size: int, t: float = UNIFORMITY_T) -> float:
    """log of the mean of exp(-t ||x_i - x_j||^2) over pairs i != j of normalised embeddings.

    Accumulated as a log-sum-exp over similarity blocks, never the full N x N matrix."""
    n = emb_ND.shape[0]
    if n < 2:
        return float("nan")
    lse_parts: list[float] = []
    for q0 in range(0, n, chunk_size):
        q_QD = emb_ND[q0 : q0 + chunk_size]
        for k0 in range(0, n, chunk_size):
            # For unit vectors -t ||x - y||^2 = 2t x.y - 2t: the constant leaves the sum, which
            # saves two passes over every block.
            logits_QK = (q_QD @ emb_ND[k0 : k0 + chunk_size].T).mul_(2 * t)
            if q0 == k0:
                logits_QK.fill_diagonal_(-math.inf)
            # A Python float, not a 0-d tensor: thousands of small tensors kept alive between
            # the large freed blocks fragment the CPU heap (+1 GB at N = 20k, measured).
            lse_parts.append(torch.logsumexp(logits_QK, dim=(0, 1)).item())
    lse = torch.logsumexp(torch.tensor(lse_parts, dtype=torch.float64), dim=0)
    return float(lse) - 2 * t - math.log(n * (n - 1))


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
# Data


def rank_shards(spec: str, rank: int, world_size: int) -> list[tuple[int, str]]:
    """(global index, url) of the shards this rank reads: every world_size-th, in order."""
    return list(enumerate(expand_urls(spec)))[rank::world_size]


def _number_samples(src: Iterable[dict], shard_index: dict[str, int]) -> Iterator[dict]:
    # A global sample id, (shard index, position in shard), so gathered retrieval embeddings can
    # be put back in one canonical order whatever the process and worker count.
    last_url, pos = None, 0
    for sample in src:
        url = sample["__url__"]
        if url != last_url:
            last_url, pos = url, 0
        sample["__id__"] = (shard_index[url] << 32) | pos
        pos += 1
        yield sample


def _image(sample: dict) -> object | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def _captions(sample: dict) -> list[str]:
    """Captions of a retrieval sample: a JSON `captions` list if present, else the `txt` lines."""
    meta = sample.get("json")
    if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
        caps = [str(c) for c in meta["captions"]]
    else:
        caps = str(sample.get("txt", "")).splitlines()
    return [c.strip() for c in caps if c.strip()]


class _ZeroshotSample:
    """sample -> (image tensor, class index, or -1 when the `cls` key is missing)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int] | None:
        image = _image(sample)
        if image is None:
            return None
        label = sample.get("cls", -1)
        return self.transform(image), int(label)


class _RetrievalSample:
    """sample -> (image tensor, tokens [captions, L], sample id); None without captions."""

    def __init__(self, transform: Callable, tokenizer: Callable):
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        image, captions = _image(sample), _captions(sample)
        if image is None or not captions:
            return None
        return self.transform(image), self.tokenizer(captions), sample["__id__"]


def _collate_zeroshot(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batch, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _collate_retrieval(
    batch: list,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, tokens, ids = zip(*batch, strict=True)
    counts = torch.tensor([t.shape[0] for t in tokens])
    owner_local_T = torch.repeat_interleave(torch.arange(len(images)), counts)
    return (
        torch.stack(images),
        torch.cat(tokens),
        owner_local_T,
        torch.tensor(ids, dtype=torch.long),
    )


def _drop_none(src: Iterable) -> Iterator:
    return (x for x in src if x is not None)


def _shard_loader(
    shards: list[tuple[int, str]],
    to_tuple: Callable,
    collate: Callable,
    batch_size: int,
    workers: int,
) -> Iterable:
    """Batches from this rank's shards, in order; no shard for this rank: no batches."""
    if not shards:
        return []
    urls = [url for _, url in shards]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        # Shards, not samples, are split across workers: a worker without a shard yields nothing.
        wds.split_by_worker,
        # A missing or unreadable shard is an error (results would silently cover less data);
        # a corrupt image only skips its sample, alike for any process count.
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        functools.partial(_number_samples, shard_index={url: i for i, url in shards}),
        wds.decode("pil", handler=wds.warn_and_continue),
        wds.map(to_tuple, handler=wds.warn_and_continue),
        _drop_none,
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=min(workers, len(urls))
    )


def _imagefolder_loader(
    root: str,
    transform: Callable,
    num_classes: int,
    rank: int,
    world_size: int,
    batch_size: int,
    workers: int,
) -> Iterable:
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(
            f"eval.zeroshot: {root} is not a usable ImageFolder directory ({err})"
        ) from None
    if len(dataset.classes) != num_classes:
        raise ConfigError(
            f"eval.classnames: {num_classes} class names, but eval.zeroshot ({root}) has "
            f"{len(dataset.classes)} class folders; class i is the i-th folder in sorted order"
        )
    # A strided subset: every rank gets a disjoint share, together all images exactly once.
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers)


# --------------------------------------------------------------------------------------------
# Evaluation


def _encode_images(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return F.normalize(model.encode_image(images.to(device, non_blocking=True)).float(), dim=-1)


def _encode_texts(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return F.normalize(model.encode_text(tokens.to(device, non_blocking=True)).float(), dim=-1)


def _distributed_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: list[str],
    templates: list,
    cfg: EvalConfig,
    device: torch.device,
    rank: int,
    world_size: int,
    show_progress: bool,
) -> torch.Tensor:
    """[D, C]; each rank embeds a contiguous block of classes (80 prompts each for ImageNet)."""
    num_classes = len(classnames)
    start, stop = num_classes * rank // world_size, num_classes * (rank + 1) // world_size
    if stop > start:
        part_CD = build_classifier(
            model,
            tokenizer,
            classnames[start:stop],
            templates,
            device=device,
            batch_size=cfg.batch_size,
            show_progress=show_progress and rank == 0,
        ).T.contiguous()
    else:
        part_CD = torch.empty(0, 0, device=device)
    return _all_gather_rows(part_CD, world_size).T


def _zeroshot(
    model: nn.Module,
    cfg: EvalConfig,
    transform: Callable,
    tokenizer: Callable,
    device: torch.device,
    rank: int,
    world_size: int,
    show_progress: bool,
) -> dict[str, float]:
    assert cfg.zeroshot is not None and cfg.classnames is not None
    classnames = load_classnames(cfg.classnames)
    templates = load_templates(cfg.templates)
    num_classes = len(classnames)
    classifier_DC = _distributed_classifier(
        model, tokenizer, classnames, templates, cfg, device, rank, world_size, show_progress
    )
    counts = {
        "top1": torch.zeros(1, dtype=torch.long),
        "top5": torch.zeros(1, dtype=torch.long),
        "class_correct": torch.zeros(num_classes, dtype=torch.long),
        "class_total": torch.zeros(num_classes, dtype=torch.long),
    }
    counts = {k: v.to(device) for k, v in counts.items()}
    err: Exception | None = None
    try:
        if os.path.isdir(cfg.zeroshot):
            loader = _imagefolder_loader(
                cfg.zeroshot, transform, num_classes, rank, world_size, cfg.batch_size, cfg.workers
            )
        else:
            loader = _shard_loader(
                rank_shards(cfg.zeroshot, rank, world_size),
                _ZeroshotSample(transform),
                _collate_zeroshot,
                cfg.batch_size,
                cfg.workers,
            )
        for images, labels_N in tqdm(
            loader, desc="zero-shot", unit="batch", disable=not (show_progress and rank == 0)
        ):
            _check_labels(labels_N, num_classes, cfg)
            logits_NC = _encode_images(model, images, device) @ classifier_DC
            for key, value in classification_counts(
                logits_NC, labels_N.to(device), num_classes
            ).items():
                counts[key] += value
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
        err = e
    _raise_if_any_failed(err, world_size, device)
    return classification_metrics(
        {k: _all_reduce_sum(v, world_size).cpu() for k, v in counts.items()}
    )


def _check_labels(labels_N: torch.Tensor, num_classes: int, cfg: EvalConfig) -> None:
    if (labels_N < 0).any():
        raise ConfigError(
            f"eval.zeroshot: a sample in {cfg.zeroshot} has no `cls` key "
            "(zero-shot shards need the class index under `cls`)"
        )
    if (labels_N >= num_classes).any():
        bad = int(labels_N.max())
        raise ConfigError(
            f"eval.zeroshot: class index {bad} is out of range for the {num_classes} "
            f"class names of eval.classnames ({cfg.classnames}); indices start at 0"
        )


def _retrieval(
    model: nn.Module,
    cfg: EvalConfig,
    transform: Callable,
    tokenizer: Callable,
    device: torch.device,
    rank: int,
    world_size: int,
    show_progress: bool,
) -> dict[str, float]:
    assert cfg.retrieval is not None
    img_embs, img_ids, txt_embs, txt_owner_ids = [], [], [], []
    err: Exception | None = None
    try:
        loader = _shard_loader(
            rank_shards(cfg.retrieval, rank, world_size),
            _RetrievalSample(transform, tokenizer),
            _collate_retrieval,
            cfg.batch_size,
            cfg.workers,
        )
        for images, tokens, owner_local_T, ids_N in tqdm(
            loader, desc="retrieval", unit="batch", disable=not (show_progress and rank == 0)
        ):
            img_embs.append(_encode_images(model, images, device))
            txt_embs.extend(_encode_texts(model, t, device) for t in tokens.split(cfg.batch_size))
            img_ids.append(ids_N)
            txt_owner_ids.append(ids_N[owner_local_T])
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
        err = e
    _raise_if_any_failed(err, world_size, device)

    def cat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts).to(device) if parts else empty.to(device)

    img_emb_ND = _all_gather_rows(cat(img_embs, torch.empty(0, 0)), world_size)
    txt_emb_TD = _all_gather_rows(cat(txt_embs, torch.empty(0, 0)), world_size)
    img_id_N = _all_gather_rows(cat(img_ids, torch.empty(0, dtype=torch.long)), world_size)
    txt_owner_id_T = _all_gather_rows(
        cat(txt_owner_ids, torch.empty(0, dtype=torch.long)), world_size
    )
    if img_emb_ND.shape[0] == 0:
        return {"retrieval/num_images": 0.0, "retrieval/num_texts": 0.0}
    # Canonical order (by shard, then position in shard): the same as one process reading all
    # shards in order, so even ties in top-k resolve alike. A stable sort keeps the caption order.
    img_order = img_id_N.argsort()
    img_emb_ND, img_id_N = img_emb_ND[img_order], img_id_N[img_order]
    txt_order = torch.sort(txt_owner_id_T, stable=True).indices
    txt_emb_TD, txt_owner_id_T = txt_emb_TD[txt_order], txt_owner_id_T[txt_order]
    txt_owner_T = torch.searchsorted(img_id_N, txt_owner_id_T)

    chunk = cfg.retrieval_chunk_size
    out = retrieval_metrics(img_emb_ND, txt_emb_TD, txt_owner_T, chunk_size=chunk)
    uni_img = uniformity(img_emb_ND, chunk_size=chunk)
    uni_txt = uniformity(txt_emb_TD, chunk_size=chunk)
    out.update(
        {
            "retrieval/alignment": alignment(img_emb_ND, txt_emb_TD, txt_owner_T),
            "retrieval/uniformity": (uni_img + uni_txt) / 2,
            "retrieval/uniformity_image": uni_img,
            "retrieval/uniformity_text": uni_txt,
            "retrieval/num_images": float(img_emb_ND.shape[0]),
            "retrieval/num_texts": float(txt_emb_TD.shape[0]),
        }
    )
    return out


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
) -> dict[str, float]:
    """Zero-shot classification and retrieval as configured in `cfg` ({} when neither is).

    Call on every process with the unwrapped open_clip model (encode_image/encode_text) already on
    `device`; with world_size > 1 torch.distributed must be initialised. Each rank reads its share
    of the data; every rank returns the same dict, equal to a one-process evaluation."""
    device = torch.device(device)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"evaluate: world_size={world_size} needs an initialised process group")
    # Same inputs on every rank, so a bad path fails everywhere at once, before any collective.
    if cfg.zeroshot is not None and not os.path.isdir(cfg.zeroshot):
        check_shards(cfg.zeroshot, "eval.zeroshot")
    check_shards(cfg.retrieval, "eval.retrieval")
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    try:
        with torch.no_grad():
            if cfg.zeroshot is not None:
                results.update(
                    _zeroshot(
                        model, cfg, transform, tokenizer, device, rank, world_size, show_progress
                    )
                )
            if cfg.retrieval is not None:
                results.update(
                    _retrieval(
                        model, cfg, transform, tokenizer, device, rank, world_size, show_progress
                    )
                )
    finally:
        model.train(was_training)
    return results


def format_table(results: dict[str, float]) -> str:
    """A small markdown table of the results."""
    lines = ["| metric | value |", "|---|---|"]
    for key, value in results.items():
        shown = (
            f"{value:.0f}"
            if key.endswith(("num_samples", "num_images", "num_texts"))
            else f"{value:.4f}"
        )
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def run_eval(cfg: Config, checkpoint: str | None, output: str | None) -> dict[str, float]:
    """`clip-train eval`: evaluate a training checkpoint directory or an exported open_clip file.

    Runs alone or under `accelerate launch` (every process evaluates its share). The main process
    prints a table and writes JSON to `output` (default: <train.output_dir>/eval.json)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from clip_train.checkpoint import load_model_weights
    from clip_train.model import build_model

    if cfg.eval.zeroshot is None and cfg.eval.retrieval is None:
        raise ConfigError(
            "eval: nothing to evaluate; set eval.zeroshot (with eval.classnames) "
            "and/or eval.retrieval"
        )
    if checkpoint is not None and not os.path.exists(checkpoint):
        raise ConfigError(f"--checkpoint: no such file or directory {checkpoint!r}")
    if checkpoint is not None and not os.path.isdir(checkpoint):
        # An exported open_clip file: open_clip's loader also converts older/3rd-party layouts.
        cfg.model.pretrained = checkpoint
    # As Accelerator does: ACCELERATE_USE_CPU=true makes a launched CPU job one gloo group
    # (without it every process would run alone).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    bundle = build_model(cfg.model)
    if checkpoint is not None and os.path.isdir(checkpoint):
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
        # A bar for a person at a terminal, not in cluster logs.
        show_progress=sys.stderr.isatty(),
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
