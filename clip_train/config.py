"""The one configuration object: dataclass schema, YAML + dotted overrides, validation.

Every knob lives here with a comment under it. YAML files and `key=value` overrides only change
values; OmegaConf merges them into this schema, so an unknown key or a wrong type is rejected with
the key's full name. `__post_init__` checks values, and `check_paths` checks that inputs exist,
before any model, data loader or process group is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import braceexpand
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ClipTrainError(Exception):
    """An error the user can fix; the CLI prints its message as one line, without a traceback."""


class ConfigError(ClipTrainError, ValueError):
    """A bad configuration value; the message names the key and the fix."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"got {value!r}, expected one of {', '.join(choices)}")


@dataclass
class AugConfig:
    """Training-time augmentation: open_clip's AugmentationCfg (its --aug-cfg), plus timm's
    auto-augment. The defaults are open_clip's: RandomResizedCrop(scale 0.9-1), nothing else."""

    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    # RandomResizedCrop area range, as a fraction of the image (CLIP/open_clip: 0.9-1.0;
    # SLIP/EVA-CLIP-style stronger cropping: e.g. 0.5-1.0 or 0.08-1.0).
    ratio: list[float] | None = None
    # RandomResizedCrop aspect-ratio range (timm only: needs use_timm; timm's default 3/4-4/3).
    color_jitter: list[float] | None = None
    # Brightness, contrast, saturation[, hue] strengths. Without use_timm it needs 4 values and
    # color_jitter_prob (open_clip's SimCLR-style jitter); with use_timm 1, 3 or 4 values (one
    # value, e.g. [0.4], is open_clip's single number: that strength for brightness, contrast and
    # saturation, no hue).
    color_jitter_prob: float | None = None
    # Probability of applying color_jitter to a sample (open_clip's path only, not timm).
    gray_scale_prob: float | None = None
    # Probability of converting a sample to grayscale (open_clip's path only, not timm).
    re_prob: float | None = None
    # Random erasing probability (timm only: needs use_timm), e.g. 0.25.
    re_count: int | None = None
    # Random erasing: number of boxes per erased image (timm only).
    use_timm: bool = False
    # Build the training transform with timm's create_transform (as open_clip's use_timm).
    auto_augment: str | None = None
    # timm auto-augment policy (needs use_timm), e.g. rand-m9-mstd0.5-inc1 (RandAugment),
    # augmix-m5-w4-d2, or original (AutoAugment).

    def __post_init__(self) -> None:
        _require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "model.aug.scale",
                 f"must be [min, max] with 0 < min <= max <= 1, got {list(self.scale)}")
        _require(self.ratio is None or (len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1]),
                 "model.aug.ratio", "must be [min, max] aspect ratios with 0 < min <= max")
        for key in ("color_jitter_prob", "gray_scale_prob", "re_prob"):
            value = getattr(self, key)
            _require(value is None or 0 <= value <= 1, f"model.aug.{key}", "must be in [0, 1]")
        _require(self.re_count is None or self.re_count >= 1, "model.aug.re_count", "must be >= 1")
        if self.use_timm:
            for key in ("color_jitter_prob", "gray_scale_prob"):
                _require(getattr(self, key) is None, f"model.aug.{key}",
                         "is open_clip's own augmentation: unset it, or set model.aug.use_timm=false")
            _require(self.color_jitter is None or len(self.color_jitter) in (1, 3, 4), "model.aug.color_jitter",
                     "must hold 1, 3 or 4 values with use_timm")
        else:
            # open_clip ignores these without timm (it only warns): refuse instead.
            for key in ("ratio", "re_prob", "re_count", "auto_augment"):
                _require(getattr(self, key) is None, f"model.aug.{key}",
                         "is a timm augmentation: set model.aug.use_timm=true too")
            _require((self.color_jitter is None) == (self.color_jitter_prob is None), "model.aug.color_jitter",
                     "and model.aug.color_jitter_prob go together without use_timm (e.g. [0.4, 0.4, 0.4, 0.1] "
                     "and 0.8)")
            _require(self.color_jitter is None or len(self.color_jitter) == 4, "model.aug.color_jitter",
                     "must hold 4 values (brightness, contrast, saturation, hue) without use_timm")

    def open_clip_cfg(self) -> dict:
        """open_clip's aug_cfg: the AugmentationCfg fields that are set (auto_augment is ours)."""
        keys = ("scale", "ratio", "color_jitter", "color_jitter_prob", "gray_scale_prob", "re_prob",
                "re_count", "use_timm")
        values = {k: getattr(self, k) for k in keys}
        if self.color_jitter is not None and len(self.color_jitter) == 1:
            # open_clip's AugmentationCfg takes one number (timm asserts that a sequence holds 3 or 4).
            values["color_jitter"] = float(self.color_jitter[0])
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


@dataclass
class ModelConfig:
    name: str = "ViT-B-32"
    # An open_clip model name (see `open_clip.list_models()`), the path of a local open_clip
    # model-config JSON (the model is then named after the file, e.g. configs/models/tiny.json),
    # `hf-hub:org/repo` (architecture, weights and preprocessing of an open_clip hub repo), or
    # `local-dir:FOLDER` (the same from a folder on disk, e.g. the model/ folder of a finished run).
    pretrained: str | None = None
    # Weights to start from: a local file (an open_clip state dict or a `clip-train export`
    # file), an open_clip pretrained tag of model.name (e.g. laion2b_s34b_b79k for ViT-B-32; see
    # open_clip.list_pretrained_tags_by_model), or `hf-hub:org/repo`. Tags and hub repos are
    # fetched by open_clip/huggingface_hub into the Hugging Face cache (HF_HOME): pre-fetch on a
    # login node, run compute nodes with HF_HUB_OFFLINE=1. Their preprocessing (mean, std,
    # interpolation, resize mode, and a hub repo's fill colour for resize_mode=longest padding)
    # comes with them unless set below.
    pretrained_image_path: str | None = None
    # The image tower only (after `pretrained`), in the same forms: a full CLIP checkpoint (its
    # visual.* weights are taken) or a state dict of the image tower. Converted as open_clip's
    # full load does (position embeddings resized to force_image_size), then loaded strictly.
    # Preprocessing follows the image tower: a tag's or hub repo's here wins, key by key, over
    # model.pretrained's (a local file carries none: model.pretrained's, else open_clip's, apply).
    pretrained_text_path: str | None = None
    # The text tower only (after `pretrained`), in the same forms: a full CLIP checkpoint
    # (everything but visual.* and the logit scale/bias) or a state dict of the text tower.
    # Converted as open_clip's full load does (a CLIP-layout text tower into a CustomTextCLIP
    # model's text.*, position embeddings resized to the context length), then loaded strictly.
    pretrained_image: bool = False
    # timm image towers (`timm_model_name` in the model config): start from timm's pretrained
    # weights (open_clip's pretrained_image), unless a checkpoint sets that tower.
    pretrained_text: bool = False
    # Hugging Face text towers (`hf_model_name` in the model config): start from the HF model's
    # weights (open_clip's pretrained_text; needs `pip install transformers`), unless a
    # checkpoint sets that tower.
    lock_image: bool = False
    # Freeze the image tower (LiT). Its embeddings are then computed once, without graphs.
    lock_image_unlocked_groups: int = 0
    # With lock_image: leave the last N layer groups of the image tower trainable (open_clip's
    # lock_image_tower: 1 = the projection, 2 = + last block and final norm, ...).
    lock_image_freeze_bn_stats: bool = False
    # With lock_image: also freeze the BatchNorm running statistics of the locked groups (open_clip's
    # --lock-image-freeze-bn-stats; they become FrozenBatchNorm2d). Without it a locked BN tower
    # (RN50, a timm ConvNet) has no trainable parameters, yet its statistics follow the new data
    # in every training forward. No effect on towers without BatchNorm (ViTs).
    lock_text: bool = False
    # Freeze the text tower.
    lock_text_unlocked_layers: int = 0
    # With lock_text: leave the last N layer groups of the text tower trainable (open_clip's
    # lock_text_tower: 1 = the projection, 2 = + the last block and final norm, 3 = + the block
    # before, ...).
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    # Normalisation of the images (null: the pretrained weights' own, else open_clip's OpenAI
    # mean/std).
    image_interpolation: str | None = None
    # bicubic | bilinear (null: the weights' own, else bicubic). timm augmentation also: random.
    image_resize_mode: str | None = None
    # Evaluation resize: shortest (resize the short side, centre crop) | longest (fit, pad) |
    # squash (null: the weights' own, else shortest). Training always uses RandomResizedCrop.
    force_image_size: int | None = None
    # Train and evaluate at this image size instead of the model config's (open_clip's
    # force_image_size). Pretrained weights of an open_clip ViT (full or per tower) get their
    # position embeddings resized as open_clip does; a timm trunk's checkpoint must match the size.
    force_quick_gelu: bool = False
    # Build the model with QuickGELU whatever its config says (open_clip's --force-quick-gelu),
    # for weights trained with it (OpenAI's, open_clip's *-quickgelu tags). An open_clip tag
    # whose activation differs from the model's is refused, naming the -quickgelu model or this
    # key (open_clip itself only warns, and the model would run with the wrong activation).
    aug: AugConfig = field(default_factory=AugConfig)
    # Training augmentation (model.aug.scale=[0.5,1.0] ...); evaluation is never augmented.
    grad_checkpointing: bool = False
    # Activation checkpointing in both towers: less memory, about one more forward of compute.
    torch_compile: bool = False
    # Wrap the encoders in torch.compile.

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must name an open_clip model or a config JSON")
        _require(not (self.name.startswith(("hf-hub:", "local-dir:")) and self.pretrained), "model.pretrained",
                 "must be null with model.name=hf-hub:... or local-dir:... (the weights come from there)")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            _require(value is None or len(value) in (1, 3), f"model.{key}", "must hold 1 or 3 values (per channel)")
        _require(self.image_std is None or all(v > 0 for v in self.image_std), "model.image_std", "must be > 0")
        if self.image_interpolation is not None:
            _one_of(self.image_interpolation, "model.image_interpolation", ("bicubic", "bilinear", "random"))
            _require(self.image_interpolation != "random" or self.aug.use_timm, "model.image_interpolation",
                     "random is a timm augmentation: set model.aug.use_timm=true too")
        if self.image_resize_mode is not None:
            _one_of(self.image_resize_mode, "model.image_resize_mode", ("shortest", "longest", "squash"))
        _require(self.force_image_size is None or self.force_image_size > 0, "model.force_image_size",
                 "must be > 0 pixels")
        _require(self.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups", "must be >= 0")
        _require(self.lock_text_unlocked_layers >= 0, "model.lock_text_unlocked_layers", "must be >= 0")
        _require(not self.lock_image_freeze_bn_stats or self.lock_image, "model.lock_image_freeze_bn_stats",
                 "freezes the statistics of the locked image tower: set model.lock_image=true too")


@dataclass
class DataConfig:
    train: str | None = None
    # Training shards (required to train): brace patterns (`shards/train-{000000..000099}.tar`),
    # several joined with `::`, local paths, `pipe:` commands or fsspec URLs. img2dataset layout:
    # jpg/png/webp + txt.
    train_num_samples: int | None = None
    # Samples in one pass over `train`. Default: read from the sizes file next to the shards
    # (`sizes.json`, written by `clip-train make-shards`, or img2dataset's `*_stats.json`).
    train_data_weights: str | None = None
    # With several `::`-joined sources in resampled mode: one weight per source, `::`-joined
    # (open_clip's --train-data-upsampling-factors): each shard of a source is drawn with its
    # source's weight, so a source's share is proportional to weight x number of shards.
    resampled: bool = True
    # True: shards drawn with replacement, an endless stream that is a function of the seed
    # (open_clip's --dataset-resampled). False: epoch mode, every sample once per epoch when
    # the shard sizes are known (sizes.json), whole shards per worker otherwise (docs/data.md).
    shuffle_buffer: int = 1000
    # Samples held in the shuffle buffer per worker.
    workers: int = 2
    # Data-loader worker processes per training process (0: decode in the training process).
    max_bad_fraction: float = 0.05
    # Stop the run when more than this fraction of the samples read were unusable (corrupt
    # images, missing/empty/undecodable captions, unreadable shards): then the data, not a
    # sample, is broken. Fraction = bad / read, summed over every process and worker, where
    # "read" is every raw sample taken from a shard (including those still in the shuffle
    # buffer; an unreadable shard or broken tar counts once) and a sample is bad when a check
    # rejects it on reading or its image fails to decode as it leaves the buffer. Judged at
    # every train.stop_check_every_steps over the whole run and over the last
    # bad_fraction_window_samples; the logged data/bad_samples / data/samples_read is the same
    # fraction. The stop message names the shards with the most bad samples.
    bad_fraction_min_samples: int = 20000
    # ... judged only once all processes together have read this many samples, so that a bad
    # shard among the first few does not stop the run (a wholly broken shard weighs about
    # 1 / (processes x data.workers) of the stream while it is read). A worker that finds not
    # one usable sample in this many stops the run by itself.
    bad_fraction_window_samples: int = 200000
    # The recent window: the ceiling is also judged over the last (at least) this many samples
    # read by all processes, so data that breaks late in a long run still stops it.
    image_key: str = "jpg;png;webp;jpeg"
    # Image extensions tried in order (webdataset's `;` alternatives).
    text_key: str = "txt"
    # Caption extension.
    caption_list_key: str | None = None
    # Several captions per sample (e.g. the alt-text plus synthetic recaptions): the key of a
    # list of captions (or one string) in the sample's `json`, e.g. captions. One candidate is
    # drawn per sample per epoch, reproducibly (from train.seed, the sample key and the epoch;
    # resampled mode adds the stream position), so a resumed run draws the same captions. An
    # unreadable part (corrupt json, non-UTF-8 txt) loses only its own captions: the sample
    # trains on the other part's (warned, not counted bad); with neither, it is skipped.
    caption_list_with_text: bool = True
    # With caption_list_key: the `text_key` caption is candidate 0, before the list's entries;
    # false: only the list (the text_key caption is used when a sample has no list).
    caption_probs: list[float] | None = None
    # Draw weights by candidate position ([txt, list[0], list[1], ...]); the last weight is
    # shared equally by every candidate from its position on, e.g. [0.5, 0.5]: the original
    # half of the time, one of the recaptions otherwise. null: uniform over the candidates. A
    # weight of 0 is never drawn ([1.0, 0.0]: only the txt caption): a sample with no candidate
    # of positive weight is skipped, counted as missing_caption (the txt fallback of
    # caption_list_with_text=false excepted).
    decode: str = "fast"
    # fast: draw the augmentation's crop first, decode a JPEG at the smallest DCT scale (1/2,
    # 1/4, 1/8) that still covers the crop at the model's resolution, resample once: the same
    # crop and augmentation parameters as exact, pixels within 30+ dB PSNR of it, 2.0-3.9x less
    # CPU per sample (docs/data.md). exact: full decode + the model's transform, bit for bit as
    # open_clip. A transform fast cannot reproduce (no RandomResizedCrop, ...) decodes exactly
    # (logged).

    def __post_init__(self) -> None:
        _require(self.train_num_samples is None or self.train_num_samples > 0,
                 "data.train_num_samples", "must be a positive number of samples")
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _require(self.workers >= 0, "data.workers", "must be >= 0")
        _require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
        _require(self.bad_fraction_min_samples >= 1, "data.bad_fraction_min_samples", "must be >= 1")
        _require(self.bad_fraction_window_samples >= 1, "data.bad_fraction_window_samples",
                 "must be >= 1 samples (e.g. 200000)")
        _require(bool(self.image_key.strip(" ;")), "data.image_key",
                 "must name at least one image extension, e.g. jpg;png;webp")
        _require(bool(self.text_key.strip()), "data.text_key", "must name the caption extension, e.g. txt")
        _require(self.caption_list_key is None or bool(self.caption_list_key.strip()), "data.caption_list_key",
                 "must name a key of the sample's json, e.g. captions (or be null)")
        _require(self.caption_probs is None or self.caption_list_key is not None, "data.caption_probs",
                 "needs data.caption_list_key (the captions to draw from)")
        _one_of(self.decode, "data.decode", ("fast", "exact"))
        _require(self.caption_probs is None or (len(self.caption_probs) > 0 and all(p >= 0 for p in self.caption_probs)
                                                and sum(self.caption_probs) > 0),
                 "data.caption_probs", "must be non-negative weights with a positive sum, e.g. [0.5, 0.5]")


@dataclass
class LossConfig:
    kind: str = "clip"
    # clip: symmetric InfoNCE over cosine similarities; siglip: pairwise sigmoid loss (needs a
    # model with a logit bias, e.g. `init_logit_bias` in the model config).
    impl: str = "auto"
    # plain: the B_local x B_global logit block at once; tiled: never materialises it (memory
    # linear in the batch, same loss and gradients); auto: plain while B_local * B_global <=
    # tile_size^2 (the block is no bigger than one tile), tiled beyond. ring: like tiled, but no
    # process gathers the global batch: the other processes' embeddings (and the gradients owed
    # to them) pass around a ring in chunks of tile_size rows, so memory stays flat in the
    # number of processes at the cost of point-to-point traffic in forward and backward (see
    # docs/performance.md); with one process it runs as tiled. Not with debias_tau_plus or
    # hardness_beta.
    tile_size: int = 4096
    # Rows/columns per tile of the tiled implementation: peak extra memory is a few
    # tile_size^2 float32 buffers (4096: ~64 MiB each) plus O(batch * embed_dim).
    max_logit_scale: float = 100.0
    # Clamp of the learnable logit scale (inverse temperature): CLIP found training unstable
    # beyond 100.
    queue_size: int = 0
    # K > 0 (kind=clip): keep the last K image and K text key embeddings of the global batch in a
    # queue (MoCo/ALBEF) and add them as extra negatives to each direction of the loss: K more
    # candidates per row at the cost of (K x embed_dim) floats per modality. 0: no queue.
    momentum: float = 0.0
    # With a queue: EMA momentum m of a copy of both towers that computes the queued keys after
    # every step (theta_k <- m theta_k + (1 - m) theta; MoCo/ALBEF use 0.995-0.999); costs a
    # copy of the weights and one no-grad forward of the batch per step. 0: no momentum
    # encoder, the queue holds past online embeddings (warned: stale keys drift).
    debias_tau_plus: float = 0.0
    # Debiased contrastive loss (Chuang et al., 2020; kind=clip): the class prior tau+ in [0, 1),
    # the chance that a negative is in fact a positive (e.g. 1/classes), whose expected share is
    # removed from each row's negatives. 0: off.
    hardness_beta: float = 0.0
    # Hard-negative weighting (Robinson et al., 2021; kind=clip): negatives weighted by
    # exp(beta * logit), so near misses count more (the paper uses ~0.5-1). 0: off.

    def __post_init__(self) -> None:
        _one_of(self.kind, "loss.kind", ("clip", "siglip"))
        _one_of(self.impl, "loss.impl", ("auto", "plain", "tiled", "ring"))
        _require(self.impl != "ring" or (self.debias_tau_plus == 0 and self.hardness_beta == 0),
                 "loss.impl", "ring computes the plain InfoNCE / SigLIP objectives: with "
                 "loss.debias_tau_plus or loss.hardness_beta set loss.impl=tiled")
        _require(self.tile_size > 0, "loss.tile_size", "must be > 0")
        _require(self.max_logit_scale > 0, "loss.max_logit_scale", "must be > 0")
        _require(self.queue_size >= 0, "loss.queue_size", "must be >= 0 (0: no queue)")
        _require(0.0 <= self.momentum < 1.0, "loss.momentum",
                 f"must be in [0, 1) (e.g. 0.995; 0: no momentum encoder), got {self.momentum}")
        _require(self.momentum == 0.0 or self.queue_size > 0, "loss.momentum",
                 "a momentum encoder only fills the queue: set loss.queue_size > 0 too")
        _require(0.0 <= self.debias_tau_plus < 1.0, "loss.debias_tau_plus",
                 f"must be in [0, 1) (e.g. 0.1; 0: off), got {self.debias_tau_plus}")
        _require(self.hardness_beta >= 0.0 and math.isfinite(self.hardness_beta),
                 "loss.hardness_beta", f"must be >= 0 (e.g. 0.5; 0: off), got {self.hardness_beta}")
        for key, on in (("loss.queue_size", self.queue_size > 0),
                        ("loss.debias_tau_plus", self.debias_tau_plus > 0),
                        ("loss.hardness_beta", self.hardness_beta > 0)):
            _require(not on or self.kind == "clip", key,
                     "is implemented for loss.kind=clip (InfoNCE) only")


NO_DECAY_PRESETS = ("clip-train", "open_clip")


@dataclass
class OptimConfig:
    opt: str = "adamw"
    # Optimizer, by timm's name (timm.optim.list_optimizers(): adamw, lamb, lion, adafactor,
    # adafactorbv, adopt, laprop, muon, sgd, ...; open_clip's `timm/lamb` spelling works too),
    # created by timm's factory over our parameter groups. AdamW is torch's; on CUDA it runs
    # fused (fused=True), unless optim.kwargs sets fused or foreach.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Extra keyword arguments of the optimizer, e.g. {decoupled_decay: true} for LAMB or
    # {momentum: 0.9, nesterov: true} for SGD. beta1/beta2/eps below are passed where it takes them.
    lr: float = 5e-4
    # Peak learning rate (after warmup).
    weight_decay: float = 0.2
    # Decoupled weight decay, on the parameters that `no_decay` and `no_decay_patterns` leave.
    no_decay: str = "clip-train"
    # Which parameters get no weight decay (besides every 1-D tensor: biases, norm gains):
    # clip-train: the logit scale/bias and every embedding (token, positional, class) — their
    #   names match *logit_scale*, *logit_bias*, *positional_embedding*, *class_embedding*,
    #   *token_embedding*, *cls_emb*, plus a timm trunk's own no_weight_decay() names
    #   (visual.trunk.pos_embed, cls_token, reg_token, dist_token);
    # open_clip: open_clip_train's rule (names matching *bn*, *ln*, *bias*, *logit_scale*), which
    #   does decay the token and positional embeddings.
    no_decay_patterns: list[str] = field(default_factory=list)
    # More parameter-name patterns (fnmatch, e.g. "visual.transformer.resblocks.0.*") without
    # weight decay, added to the preset.
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    # Adam-style betas and epsilon, passed to optimizers that take them (not to Adafactor, whose
    # eps and betas mean something else: set those in optim.kwargs).
    schedule: str = "cosine"
    # cosine | constant | const-cooldown, each after `warmup_steps` of linear warmup.
    warmup_steps: int = 0
    # Linear warmup to `lr` over the first N steps, lr/N at the first (every schedule).
    cooldown_steps: int = 0
    # const-cooldown: decay towards `min_lr` over the last N steps, as open_clip_train's
    # const_lr_cooldown: the first of them still runs at lr, the last at
    # min_lr + (lr - min_lr) * (1/N)^power (min_lr itself would be the step after the run).
    cooldown_power: float = 1.0
    # Shape of that decay (open_clip's --lr-cooldown-power): lr = min_lr + (lr - min_lr) *
    # (1 - k/N)^power at the k-th (0-based) cooldown step; 1 is linear, 0.5 stays high longer.
    min_lr: float = 0.0
    # The learning rate at the end of the cosine schedule and of the const-cooldown decay.
    grad_clip_norm: float | None = None
    # Clip the global gradient norm to this value (None: no clipping; the norm is logged anyway).
    image_lr_scale: float = 1.0
    text_lr_scale: float = 1.0
    # Multipliers of the learning rate per tower, e.g. 0.1 to fine-tune a pretrained tower gently.
    image_layer_decay: float = 1.0
    text_layer_decay: float = 1.0
    # Layer-wise learning-rate decay per tower (BEiT/EVA-CLIP): the output layer group keeps the
    # tower's lr, each block below gets `decay` times the one above, the embeddings the least.
    # Layers are open_clip's transformer.resblocks.N (or a timm trunk's own grouping). 1: off.

    def __post_init__(self) -> None:
        _require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", f"must be a positive number, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be > 0")
        _one_of(self.schedule, "optim.schedule", ("cosine", "constant", "const-cooldown"))
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(self.cooldown_steps >= 0, "optim.cooldown_steps", "must be >= 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        _require(self.image_lr_scale >= 0 and self.text_lr_scale >= 0, "optim.image_lr_scale/text_lr_scale",
                 "must be >= 0")
        _require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "optim.grad_clip_norm",
                 "must be > 0 (or null for no clipping)")
        _require(bool(self.opt.strip()), "optim.opt", "must name an optimizer, e.g. adamw, lamb or lion")
        _one_of(self.no_decay, "optim.no_decay", NO_DECAY_PRESETS)
        _require(self.cooldown_power > 0, "optim.cooldown_power", "must be > 0 (1: linear)")
        _require(0 < self.image_layer_decay <= 1 and 0 < self.text_layer_decay <= 1,
                 "optim.image_layer_decay/text_layer_decay", "must be in (0, 1] (1: off; e.g. 0.75)")
        for key in ("lr", "weight_decay", "params"):
            _require(key not in self.kwargs, f"optim.kwargs.{key}", f"is set by the trainer: use optim.{key}"
                     if key != "params" else "is set by the trainer")


@dataclass
class TrainConfig:
    steps: int = 1000
    # Optimizer steps in the whole run (the clock for schedules, logging, eval and checkpoints).
    local_batch_size: int = 256
    # Samples per process per optimizer step; the global batch is this times the process count.
    chunk_size: int | None = None
    # Gradient caching: samples per encoder forward. None (or local_batch_size): no chunking.
    sharded_grad_reduce: str = "every_chunk"
    # FSDP2 runs with chunking (launch/accelerate/fsdp2.yaml): every_chunk reduce-scatters each
    # chunk's gradients (they stay sharded: 1/N memory) | last_chunk keeps full gradients until
    # the last chunk, then reduces once (less communication, a full gradient copy per process).
    precision: str = "auto"
    # auto (bf16 on GPUs with native bf16, Ampere or newer; fp16 with loss scaling on older ones;
    # fp32 on CPU) | no | fp16 | bf16, through Accelerate's mixed precision. On the CPU fp16 is
    # refused and bf16 runs (several times slower than fp32), saying so in the run's first line.
    tf32: bool = True
    # On CUDA, float32 matmuls (the loss, fp32 runs) use TF32 tensor cores
    # (torch.set_float32_matmul_precision("high")); false: full float32 ("highest").
    seed: int = 0
    # Seeds the initial weights (the same on every process), the data stream, augmentation and
    # dropout (per process): a run is a function of its seed and process count.
    output_dir: str = "runs/default"
    # Checkpoints, metrics.jsonl, the resolved config and evaluation results go here.
    log_every_steps: int = 10
    # Write a metrics.jsonl line (and feed the trackers) every N steps, and at the last one.
    checkpoint_every_steps: int = 0
    # Save a resumable checkpoint every N steps (0: only at the end).
    keep_checkpoints: int = 2
    # Keep this run's last K checkpoints (at least 2: the one before the newest is the fallback
    # when the newest is damaged). Another run's checkpoints are never pruned (docs/checkpoints.md).
    resume: str | None = None
    # latest (the newest checkpoint in output_dir or remote_dir whose manifest verifies; none:
    # start fresh), a checkpoint path, or the URL of a checkpoint in a bucket (downloaded into
    # output_dir). A damaged checkpoint named explicitly stops the run in one line.
    overwrite: str | None = None
    # A fresh run into an output_dir (or remote_dir) that holds another run's checkpoints is
    # refused unless this says what to do with them: archive (moved, with that run's metrics and
    # outputs, to <output_dir>/archive/<their run id>/; in the bucket <remote_dir>/archive/) |
    # remove (deleted). null: refuse.
    resume_data: str = "exact"
    # exact: the data stream continues exactly where the checkpoint's stopped (refused if
    # data.train, its weights, data.workers, shuffle_buffer, the batch size or the process count
    # changed). fresh: model, optimizer and step are restored and the stream restarts from a new
    # seed derived from train.seed and the step: the way to continue after the data changed.
    max_nonfinite_steps: int = 5
    # A non-finite loss or gradient skips the step; this many in a row stop the run (noticed at
    # the next stop check, below).
    stop_check_every_steps: int = 10
    # Every N steps (and at every log and checkpoint step) the processes agree, with one small
    # collective, on a stop signal (SIGTERM/SIGUSR1) and on the skipped-step counts. Other steps
    # never wait for the device: a signal is acted on within N steps.
    process_group_timeout_s: float = 1800.0
    # Seconds a collective may wait before the run fails: every process waits while the main
    # process writes a checkpoint, so this must outlast a save to a slow shared filesystem.
    # With hang detection on (train.hang_timeout_s > 0) this holds only until the first step has
    # completed; then every collective times out with the watchdog's allowance of the phase
    # (a step, an evaluation, a checkpoint) plus a few seconds.
    hang_timeout_s: float = 600.0
    # Hang detection: a process that completes no step for this long writes every thread's
    # Python stack to the log and to <output_dir>/faults/stacks-rank<R>.txt and exits with code 1,
    # so that the launcher restarts the group (accelerate launch --max_restarts N; launch/local.sh
    # RESTARTS=N). Works when the process is stuck in C code, with or without the GIL. 0: off.
    # Size it to a few times the slowest step (GPU clusters: 600 covers a straggling node).
    hang_startup_timeout_s: float = 1800.0
    # The allowance from the process's start to its first step: rendezvous with every node,
    # model build, checkpoint download and load, the loader's first batches.
    hang_first_step_timeout_s: float = 1800.0
    # The allowance of the first step after every start (torch.compile, CUDA and NCCL warm-up).
    hang_eval_timeout_s: float = 3600.0
    # The allowance of one evaluation (zero-shot, retrieval and validation sets due at a step).
    hang_checkpoint_timeout_s: float = 3600.0
    # The allowance of one checkpoint save (gather, write, prune); at the end of training also
    # of the export and, with train.remote_dir, of the wait for the last upload (plus
    # train.remote_max_unsynced_s).
    max_restarts_without_progress: int = 3
    # Launcher restarts in a row that complete no step past the furthest step any attempt
    # completed (recorded at logging and checkpoint steps in <output_dir>/faults/progress.json):
    # the next start stops with one line naming the step and stops the launcher. 0: no limit.
    straggler_factor: float = 2.0
    # At logging steps every process's step time and data-wait fraction reach the main process
    # (metrics straggler/*: slowest_rank, step times, data-wait fractions); a process that waits
    # for data this many times the other processes' median, in 3 logging windows in a row, is
    # named in a warning.
    remote_dir: str | None = None
    # Mirror output_dir to this fsspec URL (s3://bucket/prefix, gs://..., any fsspec protocol;
    # s3/gcs need `pip install 'clip-train[s3]'` / `[gcs]`): every checkpoint is uploaded by the
    # main process in the background, published by a marker object written last; resume=latest
    # also looks there. output_dir may then be node-local (docs/checkpoints.md, "Checkpoints in a bucket").
    remote_keep_checkpoints: int | None = None
    # Keep the last K complete checkpoints in remote_dir (None: train.keep_checkpoints).
    remote_max_unsynced_s: float = 3600.0
    # Stop the run with an error when a checkpoint (or a final file) has waited this long without
    # reaching remote_dir: failed uploads are retried with back-off until then. Must exceed the
    # time one checkpoint takes to upload.
    remote_stop_wait_s: float = 60.0
    # After SIGTERM/SIGUSR1, wait this long for the pending upload before exiting; keep it below
    # the launcher's grace time minus the checkpoint's save time (launch/slurm.sbatch STOP_GRACE_S).

    def __post_init__(self) -> None:
        _require(self.steps > 0, "train.steps", "must be > 0")
        _require(self.local_batch_size > 0, "train.local_batch_size", "must be > 0")
        _require(self.chunk_size is None or 0 < self.chunk_size <= self.local_batch_size,
                 "train.chunk_size", f"must be in [1, train.local_batch_size={self.local_batch_size}] or null")
        _one_of(self.precision, "train.precision", ("auto", "no", "fp16", "bf16"))
        _one_of(self.sharded_grad_reduce, "train.sharded_grad_reduce", ("every_chunk", "last_chunk"))
        _require(self.log_every_steps > 0, "train.log_every_steps", "must be > 0")
        _require(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0")
        _require(self.keep_checkpoints >= 2, "train.keep_checkpoints",
                 "must be >= 2 (the checkpoint before the newest is the fallback when the newest is damaged)")
        if self.overwrite is not None:
            _one_of(self.overwrite, "train.overwrite", ("archive", "remove"))
        _require(self.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be > 0")
        _one_of(self.resume_data, "train.resume_data", ("exact", "fresh"))
        _require(self.stop_check_every_steps > 0, "train.stop_check_every_steps",
                 "must be > 0 (e.g. 10: a stop signal is acted on within 10 steps)")
        _require(self.process_group_timeout_s > 0, "train.process_group_timeout_s",
                 "must be > 0 seconds (e.g. 1800: long enough to write a checkpoint)")
        for key in ("hang_timeout_s", "hang_startup_timeout_s", "hang_first_step_timeout_s",
                    "hang_eval_timeout_s", "hang_checkpoint_timeout_s"):
            _require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 seconds (train.hang_timeout_s=0: off)")
        if self.hang_timeout_s > 0:
            for key in ("hang_startup_timeout_s", "hang_first_step_timeout_s", "hang_eval_timeout_s",
                        "hang_checkpoint_timeout_s"):
                _require(getattr(self, key) > 0, f"train.{key}", "must be > 0 seconds while "
                         "train.hang_timeout_s > 0 (set train.hang_timeout_s=0 to turn hang detection off)")
        _require(self.max_restarts_without_progress >= 0, "train.max_restarts_without_progress",
                 "must be >= 0 (0: no limit)")
        _require(self.straggler_factor > 1, "train.straggler_factor", "must be > 1 (e.g. 2.0)")
        if self.remote_dir is not None:
            _require(bool(self.remote_dir.strip().rstrip("/")), "train.remote_dir",
                     "must be an fsspec URL such as s3://bucket/prefix (or null: no mirror)")
            _require(os.path.abspath(self.remote_dir.rstrip("/")) != os.path.abspath(self.output_dir.rstrip("/")),
                     "train.remote_dir", "must differ from train.output_dir (it mirrors it)")
        _require(self.remote_keep_checkpoints is None or self.remote_keep_checkpoints > 0,
                 "train.remote_keep_checkpoints", "must be > 0 (or null: train.keep_checkpoints)")
        _require(self.remote_max_unsynced_s > 0, "train.remote_max_unsynced_s", "must be > 0 seconds")
        _require(self.remote_stop_wait_s >= 0, "train.remote_stop_wait_s", "must be >= 0 seconds")


@dataclass
class EvalSet:
    """One named evaluation data set (an entry of eval.zeroshot, eval.retrieval or eval.validation)."""

    data: str
    # Shards (brace pattern), an ImageFolder directory (zero-shot), or a clip_benchmark
    # webdataset folder (zero-shot: test/*.tar, classnames.txt, zeroshot_classification_templates.txt).
    every_steps: int | None = None
    # Cadence of this entry in training steps (0: only at the end). None: eval.every_steps.
    classnames: str | None = None
    # Zero-shot only: overrides the folder's classnames.txt and eval.classnames.
    templates: str | None = None
    # Zero-shot only: overrides the folder's templates and eval.templates.


EVAL_SET_KEYS = ("data", "every_steps", "classnames", "templates")


def clip_benchmark_folder(path: str) -> bool:
    """A clip_benchmark webdataset folder: <path>/test/ holds nshards.txt or .tar shards."""
    test = os.path.join(path, "test")
    return os.path.isdir(test) and (
        os.path.isfile(os.path.join(test, "nshards.txt"))
        or any(name.endswith(".tar") for name in os.listdir(test)))


@dataclass
class EvalConfig:
    every_steps: int = 0
    # Evaluate every N training steps (0: only at the end of training); the default cadence of
    # every entry of zeroshot / retrieval / validation.
    zeroshot: Any = None
    # Zero-shot classification: one data set (a string; metrics `zeroshot/top1`, ...) or a map
    # name -> data set (metrics `zeroshot/<name>/top1`, ...). A data set is a string or
    # {data, every_steps, classnames, templates}; its data: webdataset shards with a class index
    # `cls`, an ImageFolder directory, or a clip_benchmark webdataset folder (class names and
    # templates are then read from it).
    classnames: str | None = None
    # Class names for zero-shot entries that name none: a text file (one per line), a JSON list,
    # or `imagenet` (open_clip's names).
    templates: str | None = None
    # Prompt templates with `{}` (or clip_benchmark's `{c}`) for the class name: text file or JSON
    # list. Default (or `imagenet`): open_clip's 80 OpenAI ImageNet templates.
    retrieval: Any = None
    # Held-out image-caption shards for image<->text recall@1/5/10 and alignment/uniformity: a
    # string (metrics `retrieval/...`) or a map name -> string or {data, every_steps}
    # (`retrieval/<name>/...`). Several captions per image: a JSON list under the `json` key
    # `captions`, else one caption per line of `txt`.
    validation: Any = None
    # Held-out image-caption shards (jpg/png/webp + txt) for the validation contrastive loss: the
    # training objective (loss.*) over fixed consecutive batches of val_batch_size. A string
    # (metrics `val/loss`, ...) or a map name -> string or {data, every_steps} (`val/<name>/...`).
    val_batch_size: int = 256
    # Samples per validation-loss batch, the same for any number of processes. The loss grows
    # with the number of negatives: compare runs at one value (e.g. the training global batch).
    batch_size: int = 64
    # Images (or prompts, captions) per forward during evaluation.
    workers: int = 1
    # Data-loader workers per process for evaluation data.
    retrieval_chunk_size: int = 4096
    # Rows and columns of one similarity block in retrieval and uniformity: memory grows with its
    # square, never with the number of pairs.

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _require(self.batch_size > 0, "eval.batch_size", "must be > 0")
        _require(self.val_batch_size > 1, "eval.val_batch_size",
                 "must be > 1 (a contrastive loss needs negatives)")
        _require(self.workers >= 0, "eval.workers", "must be >= 0")
        _require(self.retrieval_chunk_size > 0, "eval.retrieval_chunk_size", "must be > 0")
        for key, entry in self.zeroshot_sets().items():
            _require(entry.classnames is not None or self.classnames is not None
                     or (os.path.isdir(entry.data) and clip_benchmark_folder(entry.data)),
                     f"{key}.classnames" if key != "eval.zeroshot" else "eval.classnames",
                     f"is required with {key} (a file of class names, or 'imagenet'), unless its "
                     "data is a clip_benchmark folder with a classnames.txt")
        self.retrieval_sets()
        self.validation_sets()

    def zeroshot_sets(self) -> dict[str, EvalSet]:
        """{config key: entry}, e.g. {'eval.zeroshot': ...} or {'eval.zeroshot.imagenet': ...}."""
        return _eval_sets(self.zeroshot, "eval.zeroshot", zeroshot=True)

    def retrieval_sets(self) -> dict[str, EvalSet]:
        return _eval_sets(self.retrieval, "eval.retrieval", zeroshot=False)

    def validation_sets(self) -> dict[str, EvalSet]:
        return _eval_sets(self.validation, "eval.validation", zeroshot=False)

    def cadence(self, entry: EvalSet) -> int:
        return self.every_steps if entry.every_steps is None else entry.every_steps

    def due(self, step: int) -> bool:
        """Does any entry evaluate at this training step (before the end of training)?"""
        sets = {**self.zeroshot_sets(), **self.retrieval_sets(), **self.validation_sets()}
        return any(self.cadence(e) > 0 and step % self.cadence(e) == 0 for e in sets.values())


def _eval_sets(value: Any, key: str, zeroshot: bool) -> dict[str, EvalSet]:
    """Normalise a string / map of entries to {config key of the entry: EvalSet}."""
    if value is None:
        return {}
    if isinstance(value, str):
        _require(bool(value.strip()), key, "is empty: give a data set path")
        return {key: EvalSet(data=value)}
    _require(isinstance(value, dict), key,
             f"must be a data set path or a map name -> data set, got {type(value).__name__}")
    out = {}
    for name, entry in value.items():
        entry_key = f"{key}.{name}"
        _require(isinstance(name, str) and bool(name) and "/" not in name, entry_key,
                 "entry names must be non-empty and contain no '/' (they become metric prefixes)")
        if isinstance(entry, EvalSet):
            entry = dataclasses.asdict(entry)
        if isinstance(entry, str):
            entry = {"data": entry}
        _require(isinstance(entry, dict), entry_key,
                 f"must be a data set path or a map with keys {', '.join(EVAL_SET_KEYS)}")
        unknown = sorted(set(entry) - set(EVAL_SET_KEYS))
        _require(not unknown, f"{entry_key}.{unknown[0] if unknown else ''}",
                 f"unknown key (expected one of {', '.join(EVAL_SET_KEYS)})")
        _require(isinstance(entry.get("data"), str) and bool(entry["data"]), f"{entry_key}.data",
                 "is required: the data set path")
        every = entry.get("every_steps")
        _require(every is None or (isinstance(every, int) and every >= 0), f"{entry_key}.every_steps",
                 f"must be an integer >= 0 (0: only at the end), got {every!r}")
        for opt in ("classnames", "templates"):
            _require(entry.get(opt) is None or isinstance(entry[opt], str), f"{entry_key}.{opt}",
                     "must be a path (or 'imagenet')")
            _require(zeroshot or entry.get(opt) is None, f"{entry_key}.{opt}",
                     "only zero-shot entries have class names and templates")
        out[entry_key] = EvalSet(**entry)
    return out


@dataclass
class WandbConfig:
    enabled: bool = False
    # Track the run in Weights & Biases through Accelerate's tracker (same as listing wandb in
    # tracking.report_to).
    project: str = "clip-train"
    # W&B project of the run.
    entity: str | None = None
    # W&B team or user (null: your default entity).
    name: str | None = None
    # Display name of the run (null: W&B picks one).
    tags: list[str] = field(default_factory=list)
    # W&B tags of the run, e.g. [baseline, b32].
    mode: str = "auto"
    # auto: online when an API key is configured, offline otherwise | online | offline

    def __post_init__(self) -> None:
        _one_of(self.mode, "wandb.mode", ("auto", "online", "offline"))


TRACKERS = ("wandb", "tensorboard")


@dataclass
class TrackingConfig:
    report_to: list[str] = field(default_factory=list)
    # Trackers fed through Accelerate besides metrics.jsonl, e.g. [wandb, tensorboard].
    # wandb: settings in `wandb.*` (`wandb.enabled=true` is the same as listing it here);
    # tensorboard: event files in <train.output_dir>/tensorboard (pip install 'clip-train[tensorboard]').

    def __post_init__(self) -> None:
        for name in self.report_to:
            _one_of(name, "tracking.report_to", TRACKERS)
        _require(len(set(self.report_to)) == len(self.report_to), "tracking.report_to",
                 f"lists a tracker twice: {list(self.report_to)}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.optim.schedule == "const-cooldown":
            _require(self.optim.cooldown_steps > 0, "optim.cooldown_steps",
                     "must be > 0 with optim.schedule=const-cooldown")
        _require(self.optim.warmup_steps + self.optim.cooldown_steps <= self.train.steps,
                 "optim.warmup_steps", "warmup + cooldown steps exceed train.steps")


def _omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    # OmegaConf's first line says what went wrong; later lines repeat the key and object type.
    what = str(err).splitlines()[0] if str(err) else type(err).__name__
    if key:
        return ConfigError(f"{key}: {what} (from {source})")
    return ConfigError(f"{what} (from {source})")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the validated Config from an optional YAML file and dotted `key=value` overrides."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, path) from None
        except Exception as err:  # yaml.YAMLError and friends: malformed file
            raise ConfigError(f"--config: cannot parse {path}: {str(err).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, "command line" if overrides else str(path)) from None
    assert isinstance(cfg, Config)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def expand_urls(spec: str) -> list[str]:
    """Shard list of a `::`-joined set of brace patterns, in order."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    return urls


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def check_shards(spec: str | None, key: str) -> None:
    """Fail fast when local shards named by `key` are missing (remote ones are checked when read)."""
    if spec is None:
        return
    urls = expand_urls(spec)
    _require(bool(urls), key, "is empty: give a shard pattern such as shards/train-{000000..000009}.tar")
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        hint = "" if len(missing) == 1 else f" and {len(missing) - 1} more"
        raise ConfigError(f"{key}: shard {missing[0]!r}{hint} not found "
                          f"(check the path, or make shards with `clip-train make-shards`)")


def check_paths(cfg: Config, training: bool = True) -> None:
    """Check that every local input the config names exists; called before anything heavy."""
    if training and cfg.data.train is None:
        raise ConfigError("data.train: required for training, e.g. data.train='shards/train-{000000..000009}.tar'")
    check_shards(cfg.data.train, "data.train")
    check_eval_paths(cfg.eval)
    for key in ("pretrained", "pretrained_image_path", "pretrained_text_path"):
        value = getattr(cfg.model, key)
        # A path-like value must exist; other values are open_clip tags or hf-hub: repos,
        # checked when the model is built.
        if value is not None and not value.startswith("hf-hub:") and not os.path.isfile(value) \
                and (os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))):
            raise ConfigError(f"model.{key}: no such file {value!r} (a local file, an open_clip "
                              "tag such as laion2b_s34b_b79k, or hf-hub:org/repo)")
    if cfg.model.name.endswith(".json") and not os.path.isfile(cfg.model.name):
        raise ConfigError(f"model.name: no such model-config file {cfg.model.name!r}")
    folder = cfg.model.name.removeprefix("local-dir:")
    if cfg.model.name.startswith("local-dir:") and not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        raise ConfigError(f"model.name: {folder!r} is not a model folder (no open_clip_config.json in it)")


def check_eval_paths(cfg: EvalConfig) -> None:
    """Every evaluation input exists (shards, folders, class-name and template files)."""
    for key, entry in {**cfg.retrieval_sets(), **cfg.validation_sets()}.items():
        check_shards(entry.data, key)
    files = {"eval.classnames": cfg.classnames, "eval.templates": cfg.templates}
    for key, entry in cfg.zeroshot_sets().items():
        if not os.path.isdir(entry.data):
            check_shards(entry.data, key)
        files.update({f"{key}.classnames": entry.classnames, f"{key}.templates": entry.templates})
    for key, value in files.items():
        if value is not None and value != "imagenet" and not os.path.isfile(value):
            raise ConfigError(f"{key}: no such file {value!r}")
