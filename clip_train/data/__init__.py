"""Training data: webdataset shards streamed to every process, bad samples counted, shards written.

One stream per data-loader worker. Worker `w` of process `rank` runs the *logical* stream
`(w + offset) % W` (W workers, offset = batches consumed before a resume, mod W), because PyTorch's
DataLoader takes batch i from worker i % W: batch i of a process therefore always comes from
logical stream i % W, across resumes. A logical stream is

    shard urls -> raw samples (bytes; cheap caption checks) -> shuffle buffer of raw samples
               -> decode (PIL, RGB; data.decode=fast: at the DCT scale the drawn crop needs)
               + augment + tokenize -> batches of exactly local_batch_size

and it is a pure function of (seed, rank, logical worker, epoch, pass):

* resampled mode: `webdataset.ResampledShards` draws shards with replacement from a seed built
  from (seed, rank, worker); endless.
* epoch mode: the shard list is shuffled with a seed built from (seed, epoch) (the same order on
  every rank, a new one every epoch, whatever the DataLoader does with its workers). Every
  process yields exactly `steps_per_epoch` batches per epoch, so no process waits at a
  collective for one that ran out of data: logical worker l makes the batches i of the epoch
  with i % W == l. When every shard's size is known (sizes.json), the epoch's shard sequence is
  cut at sample level into one contiguous range per (rank, worker) holding exactly the samples
  of its batches (`epoch_ranges`, `epoch_pieces`): every sample once per epoch, for any number
  of shards. Otherwise each worker reads whole shards, split by node then by worker
  (`islice(rank, None, world)`, `islice(worker, None, W)`, as webdataset's
  `split_by_node`/`split_by_worker` do, from the explicit rank and logical worker), and a start
  warning gives the numbers when they do not divide evenly. A worker whose part holds fewer
  usable samples than its batches need starts another pass over it (a few samples are seen
  twice this epoch); one with more stops early (its last samples, a random set thanks to the
  shuffle, are not seen this epoch). A worker whose part yields no usable sample at all (all
  unreachable, say) draws shards from the whole list for the rest of the epoch instead of
  stopping the run.

Exact resume: each batch carries its worker's position: the next raw sample to read (shard index
in the worker's shard sequence, sample index in the shard), the positions of the raw samples in
the shuffle buffer, the shuffle RNG state and the worker's good/bad counts. `TrainLoader` keeps the
position of the last batch consumed from each worker (never of prefetched ones), and a resumed
worker regenerates its shard sequence, skips whole shards without opening them, re-reads only the
shards that held buffered samples (no decoding), and continues. Augmentation is seeded per sample
from its position, so it is reproduced too.

Images travel as uint8 (B, 3, H, W): the train transform is split before its ToTensor +
Normalize (`split_normalize`), and the training process normalises each batch on its device
(`batch_to_device`, `normalize_images`) after a pinned, non-blocking copy, 4x less data through
the workers' shared memory and the host-to-device copy than float32. A worker reuses its batch
buffers in shared memory once the training process has dropped every tensor on them
(`slots.BatchSlots`). A transform that needs float
images after Normalize (timm's random erasing) keeps the float32 path.

Bad data never stops the run by itself: unreachable shards, broken tars, missing or empty or
undecodable captions, missing or corrupt images are skipped, counted by kind with the shards
they came from, and the first few of each kind logged with the shard name. Every raw sample
read counts, those still in the shuffle buffer included (`_Counts`). `check_bad_samples` sums
the counts of every process (train.py calls it at its periodic stop check) and raises
`DataError`, naming the worst shards, when more than `data.max_bad_fraction` of the samples read
by the whole job, or of a recent window, were bad (`BadSampleCeiling`); a worker that reads
nothing usable stops by itself. See docs/data.md.

The package's modules: `sources` (shard lists, sizes, epoch order and quotas), `captions`
(several captions per sample), `stream` (the resumable per-worker stream and its bad-sample
accounting), `decode` (decode + augmentation, the uint8 split), `fast` (`data.decode=fast`: the
crop drawn first, a reduced JPEG decode, one resample), `loader` (`build_train_loader`,
`TrainLoader`, `batch_to_device`) and `writer` (`write_samples`, `make-shards`). Every public name
is importable from `clip_train.data` as before.
"""

from clip_train.data.captions import CaptionSpec, caption_weights, draw_caption
from clip_train.data.decode import ImageNormalization, split_normalize
from clip_train.data.loader import (
    TrainLoader,
    batch_to_device,
    build_train_loader,
    check_bad_samples,
    fresh_stream_seed,
    normalize_images,
)
from clip_train.data.sources import (
    dataset_size,
    epoch_pieces,
    epoch_quota,
    epoch_ranges,
    epoch_shard_order,
    shard_sizes,
)
from clip_train.data.stream import (
    BAD_KINDS,
    STATE_VERSION,
    WARN_FIRST,
    BadSampleCeiling,
    DataError,
)
from clip_train.data.writer import IMAGE_SUFFIXES, make_shards, make_shards_main, write_samples

__all__ = [
    "BAD_KINDS", "IMAGE_SUFFIXES", "STATE_VERSION", "WARN_FIRST", "BadSampleCeiling", "CaptionSpec",
    "DataError", "ImageNormalization", "TrainLoader", "batch_to_device", "build_train_loader",
    "caption_weights", "check_bad_samples", "dataset_size", "draw_caption", "epoch_pieces",
    "epoch_quota", "epoch_ranges", "epoch_shard_order", "fresh_stream_seed",
    "make_shards", "make_shards_main", "normalize_images", "shard_sizes", "split_normalize",
    "write_samples",
]
