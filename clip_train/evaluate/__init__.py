"""Zero-shot classification, image-text retrieval, representation health (alignment/uniformity)
and the validation contrastive loss, over any number of named data sets.

Every process evaluates its own part of the data (shards split by rank, then by loader worker, in
order, unshuffled, batched per shard) and the parts are combined with collectives: classification
counts are summed, embeddings are gathered in one canonical order. So an evaluation under
`accelerate launch` is not N times slower, every process returns the same numbers, and they equal
a single-process evaluation. (open_clip evaluates on rank 0 while the others wait in a
collective, which hits NCCL timeouts on long runs.)

- `maths`: pure functions on embeddings (classifier, counts, recall, uniformity, val loss);
- `data`: class names/templates, clip_benchmark folders, sample readers, loaders, progress;
- `run`: `evaluate` (the per-process driver) and `run_eval` (`clip-train eval`).
"""

from clip_train.evaluate.data import (
    load_classnames,
    load_templates,
    rank_shards,
    resolve_zeroshot,
)
from clip_train.evaluate.maths import (
    RECALL_KS,
    UNIFORMITY_T,
    alignment,
    build_classifier,
    chunked_topk,
    classification_counts,
    classification_metrics,
    retrieval_metrics,
    uniformity,
    validation_batch_losses,
    validation_metrics,
)
from clip_train.evaluate.run import (
    ClassifierCache,
    _all_gather_rows,
    evaluate,
    format_table,
    run_eval,
)

__all__ = [
    "RECALL_KS",
    "UNIFORMITY_T",
    "ClassifierCache",
    "_all_gather_rows",
    "alignment",
    "build_classifier",
    "chunked_topk",
    "classification_counts",
    "classification_metrics",
    "evaluate",
    "format_table",
    "load_classnames",
    "load_templates",
    "rank_shards",
    "resolve_zeroshot",
    "retrieval_metrics",
    "run_eval",
    "uniformity",
    "validation_batch_losses",
    "validation_metrics",
]
