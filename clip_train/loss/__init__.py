"""Contrastive losses (CLIP / SigLIP): exact, distributed, and memory-linear in the batch.

Pure functions, no module state. Each process passes its LOCAL raw embeddings; they are
normalised in float32, all-gathered WITH gradient, and the process computes the loss of its own
rows against every global column (open_clip's `local_loss=True, gather_with_grad=True`). The mean
of the per-process losses is the single-process loss on the concatenated batch, and because the
gather's backward sums the gradient from every process before slicing, the gradients averaged by
DDP/Accelerate are the single-process gradients (encoders and logit scale/bias alike).

Two implementations of the same maths:
- plain: the B x G logit block exists (fast while it is small);
- tiled: custom autograd Functions walk T x C tiles, keep an online log-sum-exp (clip) or a running
  softplus sum (siglip) in the forward, and recompute tiles in the backward. Peak extra memory is
  O((B + G) * D + T * C) instead of O(B * G).
A third, `ring`, computes what `tiled` computes without the gather: the other processes'
embeddings travel around a ring of processes in chunks, and so do the gradients owed to them;
peak extra memory O(B * D + T * C), whatever the number of processes (see `ring`).
Both form each row's loss from its negatives relative to its positive logit (softplus of a
shifted log-sum-exp, see "Precision" in `tiled`), so the loss keeps its relative precision when it is
~1e-6 at a logit scale of 100, where log-sum-exp minus the positive logit would be all rounding.

Options beyond the plain objective (all off by default, all composable with both
implementations and any number of processes):
- extra negatives (`queue_img_KD`, `queue_txt_KD`): K constant keys, e.g. a MoCo/ALBEF queue of
  past key embeddings (clip_train.negatives). They are extra columns: image->text rows see
  [global texts; queued texts], text->image rows see [global images; queued images].
- debiased (Chuang et al., 2020, class prior tau+) and hard-negative weighted (Robinson et al.,
  2021, hardness beta) InfoNCE: both rewrite each row's negative term; see `_clip_reweighted`.

Shape legend: B local batch (rows of this process), G global batch (world * B), K extra
(queued) keys, D embedding dim, T row tile, C column tile (or, outside the kernels, the columns
G + K a row is compared with; in the ring kernels, a chunk of one process's columns), X the
embedding dim of whatever travels the ring.

Modules: `gather` (the all-gather with gradient), `tiled` (the tiled kernels and the precision
argument they share), `ring` (the ring kernels), `contrastive` (the objectives, `contrastive_loss`
and the logged metrics).
"""

from clip_train.loss.contrastive import (
    IMPLS,
    contrastive_loss,
    infonce_mi_lower_bound,
    representation_health,
    resolve_impl,
)
from clip_train.loss.gather import all_gather_with_grad
from clip_train.loss.ring import Ring

__all__ = [
    "IMPLS",
    "Ring",
    "all_gather_with_grad",
    "contrastive_loss",
    "infonce_mi_lower_bound",
    "representation_health",
    "resolve_impl",
]
