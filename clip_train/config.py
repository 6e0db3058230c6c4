"""The one configuration object: dataclass schema, YAML + dotted overrides, validation.

Every knob lives here with a comment under it. YAML files and `key=value` overrides only change
values; OmegaConf merges them into this schema, so an unknown key or a wrong type is rejected with
the key's full name. `__post_init__` checks values, and `check_paths` checks that inputs exist,
before any model, data loader or process group is built.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

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
class ModelConfig:
    name: str = "ViT-B-32"
    # An open_clip model name (see `open_clip.list_models()`) or the path of a local open_clip
    # model-config JSON (the model is then named after the file, e.g. configs/models/tiny.json).
    pretrained: str | None = None
    # Local file to initialise from: an open_clip state dict or a `clip-train export` file.
    # Never downloaded: the path must exist.
    lock_image: bool = False
    # Freeze the image tower (LiT). Its embeddings are then computed once, without graphs.
    lock_image_unlocked_groups: int = 0
    # With lock_image: leave the last N layer groups of the image tower trainable (open_clip's
    # lock_image_tower: 1 = the projection, 2 = + last block and final norm, ...).
    lock_text: bool = False
    # Freeze the text tower.
    lock_text_unlocked_layers: int = 0
    # With lock_text: leave the last N layer groups of the text tower trainable (open_clip's
    # lock_text_tower: 1 = the projection, 2 = + the last block and final norm, 3 = + the block
    # before, ...).
    grad_checkpointing: bool = False
    # Activation checkpointing in both towers: less memory, about one more forward of compute.
    torch_compile: bool = False
    # Wrap the encoders in torch.compile.

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must name an open_clip model or a config JSON")
        _require(self.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups", "must be >= 0")
        _require(self.lock_text_unlocked_layers >= 0, "model.lock_text_unlocked_layers", "must be >= 0")


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
    # (open_clip's --dataset-resampled). False: epoch mode, every shard once per epoch.
    shuffle_buffer: int = 1000
    # Samples held in the shuffle buffer per worker.
    workers: int = 2
    # Data-loader worker processes per training process (0: decode in the training process).
    max_bad_fraction: float = 0.05
    # Stop the run when more than this fraction of the samples read so far were unusable
    # (corrupt images, missing captions, ...): then the data, not a sample, is broken.
    bad_fraction_min_samples: int = 1000
    # ... counting only once a process (or one of its workers) has read this many samples, so
    # that one bad sample among the first few does not stop the run.
    image_key: str = "jpg;png;webp;jpeg"
    # Image extensions tried in order (webdataset's `;` alternatives).
    text_key: str = "txt"
    # Caption extension.

    def __post_init__(self) -> None:
        _require(self.train_num_samples is None or self.train_num_samples > 0,
                 "data.train_num_samples", "must be a positive number of samples")
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _require(self.workers >= 0, "data.workers", "must be >= 0")
        _require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
        _require(self.bad_fraction_min_samples >= 1, "data.bad_fraction_min_samples", "must be >= 1")
        _require(bool(self.image_key.strip(" ;")), "data.image_key",
                 "must name at least one image extension, e.g. jpg;png;webp")
        _require(bool(self.text_key.strip()), "data.text_key", "must name the caption extension, e.g. txt")


@dataclass
class LossConfig:
    kind: str = "clip"
    # clip: symmetric InfoNCE over cosine similarities; siglip: pairwise sigmoid loss (needs a
    # model with a logit bias, e.g. `init_logit_bias` in the model config).
    impl: str = "auto"
    # plain: the B_local x B_global logit block at once; tiled: never materialises it (memory
    # linear in the batch, same loss and gradients); auto: plain while B_local * B_global <=
    # tile_size^2 (the block is no bigger than one tile), tiled beyond.
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
        _one_of(self.impl, "loss.impl", ("auto", "plain", "tiled"))
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


@dataclass
class OptimConfig:
    lr: float = 5e-4
    # Peak learning rate (after warmup).
    weight_decay: float = 0.2
    # AdamW decoupled weight decay; never applied to biases, norms, embeddings or the logit scale.
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    schedule: str = "cosine"
    # cosine | constant | const-cooldown, each after `warmup_steps` of linear warmup.
    warmup_steps: int = 0
    cooldown_steps: int = 0
    # const-cooldown: linear decay to `min_lr` over the last N steps.
    min_lr: float = 0.0
    grad_clip_norm: float | None = None
    # Clip the global gradient norm to this value (None: no clipping; the norm is logged anyway).
    image_lr_scale: float = 1.0
    text_lr_scale: float = 1.0
    # Multipliers of the learning rate per tower, e.g. 0.1 to fine-tune a pretrained tower gently.

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


@dataclass
class TrainConfig:
    steps: int = 1000
    # Optimizer steps in the whole run (the clock for schedules, logging, eval and checkpoints).
    local_batch_size: int = 256
    # Samples per process per optimizer step; the global batch is this times the process count.
    chunk_size: int | None = None
    # Gradient caching: samples per encoder forward. None (or local_batch_size): no chunking.
    precision: str = "auto"
    # auto (bf16 on CUDA, fp32 on CPU) | no | fp16 | bf16, through Accelerate's mixed precision.
    seed: int = 0
    output_dir: str = "runs/default"
    # Checkpoints, metrics.jsonl, the resolved config and evaluation results go here.
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0
    # Save a resumable checkpoint every N steps (0: only at the end).
    keep_checkpoints: int = 2
    # Keep the last K checkpoints.
    resume: str | None = None
    # latest (the newest checkpoint in output_dir or remote_dir, or start fresh if none), a
    # checkpoint path, or the URL of a checkpoint in a bucket (downloaded into output_dir).
    max_nonfinite_steps: int = 5
    # A non-finite loss or gradient skips the step; this many in a row stop the run.
    remote_dir: str | None = None
    # Mirror output_dir to this fsspec URL (s3://bucket/prefix, gs://..., any fsspec protocol;
    # s3/gcs need `pip install 'clip-train[s3]'` / `[gcs]`): every checkpoint is uploaded by the
    # main process in the background, published by a marker object written last; resume=latest
    # also looks there. output_dir may then be node-local (see README "Checkpoints in a bucket").
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
        _require(self.log_every_steps > 0, "train.log_every_steps", "must be > 0")
        _require(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0")
        _require(self.keep_checkpoints > 0, "train.keep_checkpoints", "must be > 0")
        _require(self.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be > 0")
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
class EvalConfig:
    every_steps: int = 0
    # Evaluate every N training steps (0: only at the end of training).
    zeroshot: str | None = None
    # Zero-shot classification data: webdataset shards with a class-index key `cls`, or an
    # ImageFolder directory.
    classnames: str | None = None
    # Class names: a text file (one per line), a JSON list, or `imagenet` (open_clip's names).
    templates: str | None = None
    # Prompt templates with `{}` for the class name: text file or JSON list. Default (or
    # `imagenet`): open_clip's 80 OpenAI ImageNet templates.
    retrieval: str | None = None
    # Held-out image-caption shards for image<->text recall@1/5/10 and alignment/uniformity.
    # Several captions per image: a JSON list under the `json` key `captions`, else one caption
    # per line of `txt`.
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
        _require(self.workers >= 0, "eval.workers", "must be >= 0")
        _require(self.retrieval_chunk_size > 0, "eval.retrieval_chunk_size", "must be > 0")
        _require(self.zeroshot is None or self.classnames is not None, "eval.classnames",
                 "is required with eval.zeroshot (a file of class names, or 'imagenet')")


@dataclass
class WandbConfig:
    enabled: bool = False
    # Track the run in Weights & Biases through Accelerate's tracker.
    project: str = "clip-train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"
    # auto: online when an API key is configured, offline otherwise | online | offline

    def __post_init__(self) -> None:
        _one_of(self.mode, "wandb.mode", ("auto", "online", "offline"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

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
    check_shards(cfg.eval.retrieval, "eval.retrieval")
    if cfg.eval.zeroshot is not None and not os.path.isdir(cfg.eval.zeroshot):
        check_shards(cfg.eval.zeroshot, "eval.zeroshot")
    for key, value in (("eval.classnames", cfg.eval.classnames), ("eval.templates", cfg.eval.templates)):
        if value is not None and value != "imagenet" and not os.path.isfile(value):
            raise ConfigError(f"{key}: no such file {value!r}")
    if cfg.model.pretrained is not None and not os.path.isfile(cfg.model.pretrained):
        raise ConfigError(f"model.pretrained: no such file {cfg.model.pretrained!r} "
                          "(weights are only loaded from a local file)")
    if cfg.model.name.endswith(".json") and not os.path.isfile(cfg.model.name):
        raise ConfigError(f"model.name: no such model-config file {cfg.model.name!r}")
