"""The webdataset pipeline: splitting, epochs, reproducibility, exact resume, bad data, make-shards."""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import random
import tarfile
import types
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import launch
from data_shards import (
    id_tokenizer,
    image_ids,
    noisy_tensor,
    png_bytes,
    to_tensor,
    truncate_inside_sample,
    write_id_shards,
)
from PIL import Image

from clip_train.config import ConfigError, DataConfig, ModelConfig
from clip_train.data import (
    BAD_KINDS,
    BadSampleCeiling,
    DataError,
    batch_to_device,
    build_train_loader,
    check_bad_samples,
    dataset_size,
    epoch_quota,
    epoch_shard_order,
    make_shards,
    make_shards_main,
    normalize_images,
    split_normalize,
    write_samples,
)

REPO = Path(__file__).resolve().parents[1]
ONE_PROCESS = types.SimpleNamespace(num_processes=1, device=torch.device("cpu"))  # for check_bad_samples


def loader(train: str, *, batch: int = 6, seed: int = 0, rank: int = 0, world: int = 1,
           state: dict | None = None, transform=to_tensor, **data):
    cfg = DataConfig(train=train, **{"shuffle_buffer": 20, "workers": 2, **data})
    return build_train_loader(cfg, transform=transform, tokenizer=id_tokenizer, local_batch_size=batch,
                              seed=seed, rank=rank, world_size=world, state=state)


def take(train_loader, n: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """n batches: sample ids (from the captions) and the image tensors."""
    ids, images = [], []
    for _, (images_BCHW, texts_BL) in zip(range(n), train_loader, strict=False):
        assert texts_BL.dtype == torch.long and images_BCHW.dtype == torch.float32
        assert image_ids(images_BCHW) == texts_BL[:, 0].tolist()  # image and caption stay paired
        ids.append(texts_BL[:, 0].tolist())
        images.append(images_BCHW)
    return ids, images


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> str:
    return write_id_shards(tmp_path_factory.mktemp("even"), [12] * 8)  # 96 samples


# ---------------------------------------------------------------------------------------------
# Epoch mode


def test_epoch_mode_every_sample_once_per_epoch_with_a_new_order(even_shards):
    L = loader(even_shards, resampled=False)
    assert (L.num_samples, L.steps_per_epoch) == (96, 16)
    ids, _ = take(L, 32)
    epochs = [sum(ids[:16], []), sum(ids[16:], [])]
    for seen in epochs:
        assert sorted(seen) == list(range(96))
    assert epochs[0] != epochs[1]  # reshuffled inside the same (persistent) workers
    assert L.epoch == 2 and L.batches_consumed == 32


def test_epoch_mode_two_ranks_split_the_data(even_shards):
    per_rank = [sum(take(loader(even_shards, resampled=False, rank=r, world=2), 8)[0], []) for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(96))  # once each, none on both ranks


def test_epoch_shard_order_is_shared_and_changes_every_epoch():
    urls = [f"s{i}.tar" for i in range(20)]
    assert epoch_shard_order(urls, 0, 3) == epoch_shard_order(urls, 0, 3)
    orders = {tuple(epoch_shard_order(urls, 0, e)) for e in range(5)}
    assert len(orders) == 5 and all(sorted(o) == sorted(urls) for o in orders)


@pytest.mark.parametrize("steps,workers", [(16, 2), (7, 3), (2, 4), (1, 1)])
def test_epoch_quota_splits_every_epoch_exactly(steps, workers):
    for epoch in range(5):
        quotas = [epoch_quota(epoch, w, steps, workers) for w in range(workers)]
        assert sum(quotas) == steps
        # batch i of the process comes from worker i % workers
        expected = Counter(i % workers for i in range(epoch * steps, (epoch + 1) * steps))
        assert quotas == [expected[w] for w in range(workers)]


def test_uneven_shards_give_every_rank_the_same_steps(tmp_path):
    train = write_id_shards(tmp_path, [3, 20, 7, 11, 2, 9])  # 52 samples, very uneven
    loaders = [loader(train, batch=4, resampled=False, rank=r, world=2) for r in (0, 1)]
    assert all(L.steps_per_epoch == 52 // 8 for L in loaders)
    for L in loaders:
        ids, _ = take(L, 2 * L.steps_per_epoch)
        assert L.epoch == 2 and all(len(b) == 4 for b in ids)
        assert len(set(sum(ids, []))) > 10  # a real share of the data, not one shard repeated


# ---------------------------------------------------------------------------------------------
# Resampled mode and resume


def test_resampled_stream_is_a_function_of_seed_rank_and_worker(even_shards):
    a_ids, a_img = take(loader(even_shards, transform=noisy_tensor), 10)
    b_ids, b_img = take(loader(even_shards, transform=noisy_tensor), 10)
    assert a_ids == b_ids and all(torch.equal(x, y) for x, y in zip(a_img, b_img, strict=True))
    assert take(loader(even_shards, seed=1), 10)[0] != a_ids
    assert take(loader(even_shards, rank=1, world=2), 10)[0] != a_ids
    # The two workers draw different shards (batches 0 and 1 come from workers 0 and 1).
    assert a_ids[0] != a_ids[1]
    # Augmentations: the same sample gets different noise each time it is drawn.
    noise = {}
    for ids, images in zip(a_ids, a_img, strict=True):
        for i, image in zip(ids, images, strict=True):
            noise.setdefault(i, set()).add(round(float(image[0, 0, 0] - image[0, 0, 0].floor()), 6))
    drawn_twice = [i for i, n in Counter(sum(a_ids, [])).items() if n > 1]
    assert drawn_twice and all(len(noise[i]) > 1 for i in drawn_twice)


@pytest.mark.parametrize("resampled,stop", [(True, 7), (False, 11), (False, 16), (False, 21)])
def test_resume_continues_exactly(even_shards, resampled, stop):
    full_ids, full_img = take(loader(even_shards, resampled=resampled, transform=noisy_tensor), stop + 9)
    first = loader(even_shards, resampled=resampled, transform=noisy_tensor)
    take(first, stop)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert json.loads(json.dumps(state)) == state  # plain data: any checkpoint format can hold it
    resumed = loader(even_shards, resampled=resampled, transform=noisy_tensor, state=state)
    assert resumed.batches_consumed == stop and resumed.epoch == stop // 16
    ids, images = take(resumed, 9)
    assert ids == full_ids[stop:]
    assert all(torch.equal(x, y) for x, y in zip(images, full_img[stop:], strict=True))


def test_resume_with_in_process_loading_and_counts_carried(tmp_path):
    train = write_id_shards(tmp_path, [10, 10])
    with tarfile.open(tmp_path / "t-000000.tar", "a") as tar:  # one sample without a caption
        info = tarfile.TarInfo("nocap.png")
        data = png_bytes(999)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    full = loader(train, batch=4, workers=0, resampled=False, train_num_samples=20)
    full_ids, _ = take(full, 9)
    first = loader(train, batch=4, workers=0, resampled=False, train_num_samples=20)
    take(first, 3)
    resumed = loader(train, batch=4, workers=0, resampled=False, train_num_samples=20,
                     state=first.state_dict())
    assert take(resumed, 6)[0] == full_ids[3:]
    assert resumed.bad_counts()["missing_caption"] == full.bad_counts()["missing_caption"] == 2


def test_the_state_a_batch_carries_is_not_changed_by_later_batches(tmp_path):
    """In-process loading hands the worker's state to the loader without a pickle in between:
    what a batch carried (and a checkpoint would write) must stay what it was while the worker
    goes on -- new buffer positions, RNG, counts, a new epoch and pass."""
    train = write_id_shards(tmp_path, [7, 6])
    with tarfile.open(tmp_path / "t-000000.tar", "a") as tar:  # a bad sample: the counts change
        info = tarfile.TarInfo("nocap.png")
        data = png_bytes(999)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    stream = loader(train, batch=4, workers=0, shuffle_buffer=5, resampled=False, train_num_samples=12)
    carried = []
    for _ in zip(range(8), stream, strict=False):
        state = stream._workers[0]
        carried.append((state, json.dumps(state, sort_keys=True)))
    assert len({text for _, text in carried}) == len(carried)  # every batch moved the state on
    assert carried[-1][0]["epoch"] > 0 and carried[-1][0]["bad"]["missing_caption"] > 0
    for state, text in carried:
        assert json.dumps(state, sort_keys=True) == text


@pytest.mark.parametrize("resampled", [True, False])
def test_resume_over_bad_data_repeats_neither_batches_nor_counts(tmp_path, resampled):
    write_id_shards(tmp_path, [8, 6, 7], sizes_file=False)
    truncate_inside_sample(tmp_path / "t-000001.tar", keep_samples=4)
    with tarfile.open(tmp_path / "t-000002.tar", "a") as tar:  # + a sample with an empty caption
        for name, data in (("empty.png", png_bytes(999)), ("empty.txt", b" ")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "empty.tar").write_bytes(b"")
    train = f"{tmp_path}/t-{{000000..000002}}.tar::{tmp_path}/empty.tar::pipe:cat {tmp_path}/gone.tar"

    def make(state=None):
        return loader(train, batch=3, workers=2, shuffle_buffer=5, resampled=resampled,
                      train_num_samples=19, max_bad_fraction=1.0, state=state)

    full = make()
    full_ids, _ = take(full, 17)
    first = make()
    take(first, 5)
    resumed = make(first.state_dict())
    assert take(resumed, 12)[0] == full_ids[5:]
    assert resumed.bad_counts() == full.bad_counts() and resumed.samples_read() == full.samples_read()
    assert full.bad_counts()["bad_tar"] > 0 and full.bad_counts()["empty_caption"] > 0


def test_resume_refuses_a_changed_stream(even_shards):
    first = loader(even_shards)
    take(first, 2)
    with pytest.raises(ConfigError, match="data.workers.*set train.resume_data=fresh"):
        loader(even_shards, workers=1, state=first.state_dict())
    with pytest.raises(ConfigError, match="train.seed"):
        loader(even_shards, seed=5, state=first.state_dict())


def test_resume_refuses_changed_source_weights(tmp_path):
    a = write_id_shards(tmp_path / "a", [6, 6])
    b = write_id_shards(tmp_path / "b", [6, 6], first_id=12)
    first = loader(f"{a}::{b}", train_data_weights="1::9", train_num_samples=24)
    take(first, 2)
    state = first.state_dict()
    same = loader(f"{a}::{b}", train_data_weights="1.0::9", train_num_samples=24, state=state)
    assert same.batches_consumed == 2  # the same weights, written differently
    with pytest.raises(ConfigError, match=r"data.train_data_weights: changed.*train.resume_data=fresh"):
        loader(f"{a}::{b}", train_data_weights="9::1", train_num_samples=24, state=state)


def test_fresh_stream_seed_is_new_per_step_and_resumes_exactly(even_shards):
    from clip_train.data import fresh_stream_seed

    assert fresh_stream_seed(0, 100) == fresh_stream_seed(0, 100) != fresh_stream_seed(0, 101)
    base = take(loader(even_shards), 4)[0]
    fresh = build_train_loader(DataConfig(train=even_shards, shuffle_buffer=20), transform=to_tensor,
                               tokenizer=id_tokenizer, local_batch_size=6, seed=0, rank=0, world_size=1,
                               stream_seed=fresh_stream_seed(0, 100))
    full = take(fresh, 6)[0]
    assert full[:4] != base
    # A checkpoint of the fresh stream resumes it exactly, with only train.seed given.
    again = build_train_loader(DataConfig(train=even_shards, shuffle_buffer=20), transform=to_tensor,
                               tokenizer=id_tokenizer, local_batch_size=6, seed=0, rank=0, world_size=1,
                               stream_seed=fresh_stream_seed(0, 100))
    take(again, 4)
    assert take(loader(even_shards, state=again.state_dict()), 2)[0] == full[4:]


def test_workers_reuse_a_batch_buffer_only_once_the_training_process_let_go_of_it(even_shards):
    """Each worker writes batches into a few shared-memory buffers it reuses (`BatchSlots`), never
    into one whose batch -- or a view of it -- the training process still holds: batches dropped
    at once come in reused buffers; batches kept, whole or as views, keep their values; every
    batch equals the one made in the training process itself (workers=0, no shared memory)."""
    n, per_worker = 24, 2 + 2  # the loader's default prefetch_factor, + 2

    def run(keep):
        L = loader(even_shards, batch=4, workers=1, resampled=True)
        kept, copies = [], []
        for images, _ in islice(L, n):
            copies.append(images.clone())
            kept.append(keep(images))
        return L, kept, copies

    expected = [images for images, _ in islice(loader(even_shards, batch=4, workers=0, resampled=True), n)]
    dropped, _, copies = run(lambda images: None)
    assert all(torch.equal(a, b) for a, b in zip(copies, expected, strict=True))
    assert dropped.slot_batches > n // 2  # only 4 buffers: most batches came in reused ones
    held, kept, _ = run(lambda images: images)
    assert held.slot_batches == per_worker  # the first four, never released
    assert all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True))
    # Views only, every one kept (the batches themselves dropped): their buffers stay taken.
    window, kept, _ = run(lambda images: images[:, :, 1:])
    assert window.slot_batches == per_worker
    assert all(torch.equal(a, b[:, :, 1:]) for a, b in zip(kept, expected, strict=True))


def test_workers_freeze_the_objects_they_inherit(even_shards):
    """A worker's garbage collector leaves alone what it inherited from the training process:
    `init_worker` freezes it first (inside the worker, gc's frozen count is its parent's objects);
    the training process itself is left as it was."""
    import gc

    def tokenizer(texts):  # runs inside the worker
        return torch.tensor([[gc.get_freeze_count()]] * len(texts))

    cfg = DataConfig(train=even_shards, shuffle_buffer=20, workers=1, resampled=True)
    train_loader = build_train_loader(cfg, transform=to_tensor, tokenizer=tokenizer, local_batch_size=4,
                                      seed=0, rank=0, world_size=1)
    _, texts = next(iter(train_loader))
    assert texts.min() > 10_000  # torch's, open_clip's... objects, imported before the fork
    assert gc.get_freeze_count() == 0


# ---------------------------------------------------------------------------------------------
# Bad data


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path, caplog):
    good = [{"__key__": f"{i:06d}", "png": png_bytes(i), "txt": str(i)} for i in range(12)]
    truncated_png = png_bytes(500, size=32)[:60]
    bad = [
        {"__key__": "badimg", "png": b"not an image at all", "txt": "100"},
        {"__key__": "truncimg", "png": truncated_png, "txt": "101"},
        {"__key__": "nocap", "png": png_bytes(102)},
        {"__key__": "emptycap", "png": png_bytes(103), "txt": "  \n"},
        {"__key__": "latin1", "png": png_bytes(104), "txt": b"caf\xe9 \xff"},
        {"__key__": "noimg", "txt": "105"},
    ]
    samples = [s for pair in zip(good, bad + [None] * 6, strict=True) for s in pair if s is not None]
    with wds.TarWriter(str(tmp_path / "mixed-000000.tar"), encoder=False) as sink:
        for s in samples:  # good ones first and last: a full pass reads every bad one
            sink.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in s.items()})
    caplog.set_level(logging.WARNING, logger="clip_train.data")
    L = loader(str(tmp_path / "mixed-000000.tar"), batch=4, workers=0, shuffle_buffer=0,
               resampled=False, train_num_samples=12, max_bad_fraction=1.0)
    ids, _ = take(L, 3)  # the whole epoch trains
    assert sorted(sum(ids, [])) == list(range(12))
    assert L.bad_counts() == {"unreachable_shard": 0, "bad_tar": 0, "missing_image": 1,
                              "missing_caption": 1, "empty_caption": 1, "undecodable_text": 1,
                              "corrupt_image": 2}
    assert L.samples_read() == 12 + 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6 and all("mixed-000000.tar" in w for w in warnings)


def test_broken_and_unreachable_shards_are_skipped_and_counted(tmp_path):
    write_id_shards(tmp_path, [8, 6], sizes_file=False)
    truncate_inside_sample(tmp_path / "t-000001.tar", keep_samples=4)  # samples 8..11 survive
    (tmp_path / "empty.tar").write_bytes(b"")
    missing = tmp_path / "gone.tar"
    # Shard 0 through a `pipe:` command too: reading it whole must not count as a failure.
    train = (f"pipe:cat {tmp_path}/t-000000.tar::{tmp_path}/t-000001.tar::{tmp_path}/empty.tar"
             f"::pipe:cat {missing}")
    # A buffer larger than the data: every shard is read before the first batch comes out.
    L = loader(train, batch=4, workers=1, shuffle_buffer=100, resampled=False, train_num_samples=12,
               max_bad_fraction=1.0)
    ids, _ = take(L, 3)
    assert sorted(sum(ids, [])) == list(range(12))
    counts = L.bad_counts()
    assert counts == {**dict.fromkeys(BAD_KINDS, 0), "bad_tar": 2, "unreachable_shard": 1}, counts
    assert L.samples_read() == 12 + 3


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_fraction_ceiling_stops_the_run(tmp_path, workers):
    with wds.TarWriter(str(tmp_path / "half-000000.tar")) as sink:
        for i in range(40):
            sample = {"__key__": f"{i:06d}", "png": png_bytes(i)}
            if i % 2:
                sample["txt"] = str(i)
            sink.write(sample)
    L = loader(str(tmp_path / "half-000000.tar"), batch=2, workers=workers, train_num_samples=40,
               bad_fraction_min_samples=10)
    take(L, 10)  # half the data is bad, yet this worker trains: no per-worker stop
    ceiling = BadSampleCeiling(0.2, min_samples=10, window_samples=1000)
    with pytest.raises(DataError, match=r"data.max_bad_fraction=0.2.*half-000000.tar \(\d+ bad\)"):
        check_bad_samples(ONE_PROCESS, L, ceiling)


def test_bad_sample_ceiling_over_the_whole_run_and_a_recent_window():
    ceiling = BadSampleCeiling(0.05, min_samples=1000, window_samples=10000)
    assert ceiling.judge(500, 400) is None  # too few samples read to judge
    assert ceiling.judge(1000, 40) is None  # one bad shard early: 4%
    for read in range(2000, 1_000_001, 1000):  # a long run of good data
        assert ceiling.judge(read, 40) is None
    # Data that breaks late, 20% bad from 1e6 on: stops once the last 10000 samples are over 5%
    # (after 3000 broken ones), while the whole run is at 0.06%.
    verdicts = [ceiling.judge(1_000_000 + k, 40 + k // 5) for k in range(1000, 4001, 1000)]
    assert verdicts[:2] == [None, None] and verdicts[2] == (
        "600 of the last 10000 samples read by all processes (6.0%) were unusable (640 of 1003000 in the whole run)")
    # Mostly broken data from the start stops at the first judged check.
    verdict = BadSampleCeiling(0.05, 1000, 10000).judge(1000, 300)
    assert verdict == "300 of the 1000 samples read by all processes (30.0%) were unusable"
    line = ceiling.message(verdict, {**dict.fromkeys(BAD_KINDS, 0), "corrupt_image": 300},
                           {"s/a.tar": 10, "s/b.tar": 290})
    assert "data.max_bad_fraction=0.05 (corrupt_image=300); worst shards: s/b.tar (290 bad), s/a.tar (10 bad)" in line


def test_epoch_ranges_and_pieces_split_every_sample_once():
    from clip_train.data import epoch_pieces, epoch_ranges

    for world, workers, batch, sizes in [(2, 2, 3, [12] * 5), (2, 2, 3, [12] * 6), (3, 2, 4, [7, 30, 1, 12, 9]),
                                         (1, 3, 5, [100]), (2, 4, 2, [13, 5, 22, 8, 17, 9, 30])]:
        urls = tuple(f"s{i}.tar" for i in range(len(sizes)))
        steps = sum(sizes) // (world * batch)
        for epoch in range(3):
            ranges = epoch_ranges(world, workers, epoch, steps, batch, sum(sizes))
            assert ranges[0][0] == 0 and ranges[-1][1] == sum(sizes)
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
            for u, (lo, hi) in enumerate(ranges):  # each unit's range holds its batch quota
                assert hi - lo >= epoch_quota(epoch, u % workers, steps, workers) * batch
            seen = Counter()
            for rank in range(world):
                for worker in range(workers):
                    for url, first, end in epoch_pieces(urls, tuple(sizes), 0, epoch, rank, world, worker,
                                                        workers, steps, batch):
                        n = sizes[urls.index(url)]
                        seen.update((url, i) for i in range(first, n if end is None else end))
            assert seen == Counter((u, i) for u, n in zip(urls, sizes, strict=True) for i in range(n))


def test_a_broken_shard_split_between_workers_is_counted_once(tmp_path):
    write_id_shards(tmp_path, [6, 14])  # sizes.json: 20 samples, cut into 10 + 10 for 2 workers
    truncate_inside_sample(tmp_path / "t-000001.tar", keep_samples=2)  # both workers read into it
    L = loader(f"{tmp_path}/t-{{000000..000001}}.tar", batch=2, workers=2, shuffle_buffer=100, resampled=False)
    take(L, 2)  # one batch per worker: each has read its whole part once (the buffer holds it)
    assert L.bad_counts()["bad_tar"] == 1 and L.samples_read() == 6 + 2 + 1


def test_epoch_mode_with_unknown_shard_sizes_warns_with_the_numbers(tmp_path, caplog):
    train = write_id_shards(tmp_path, [12] * 6, sizes_file=False)
    caplog.set_level(logging.WARNING, logger="clip_train.data")
    loader(train, resampled=False, world=2, train_num_samples=72, batch=3)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "no sizes.json" in line and "6 shards over 2 processes x 2 workers = 4: 2 workers read one shard more" in line
    caplog.clear()
    sized = write_id_shards(tmp_path / "sized", [12] * 6)
    loader(sized, resampled=False, world=2, batch=5)  # 72 samples, 7 global batches of 10: 2 unseen
    (line,) = [r.getMessage() for r in caplog.records]
    assert "72 samples, 70 per epoch in whole global batches: 2 samples" in line


def test_a_worker_whose_shards_are_all_broken_borrows_shards(tmp_path, caplog):
    write_id_shards(tmp_path, [6, 6], sizes_file=False)
    (tmp_path / "empty.tar").write_bytes(b"")
    train = f"{tmp_path}/t-{{000000..000001}}.tar::{tmp_path}/empty.tar::pipe:cat {tmp_path}/gone.tar"
    caplog.set_level(logging.WARNING, logger="clip_train.data")
    # 4 shards over 2 ranks: in some epoch a rank gets only the two broken ones.
    for rank in (0, 1):
        L = loader(train, batch=2, workers=0, rank=rank, world=2, resampled=False,
                   train_num_samples=12, max_bad_fraction=1.0)
        ids, _ = take(L, 2 * L.steps_per_epoch)
        assert all(0 <= i < 12 for i in sum(ids, []))
    assert any("drawing shards from all of data.train" in r.getMessage() for r in caplog.records)


def test_shards_without_any_usable_sample_fail_clearly(tmp_path):
    with wds.TarWriter(str(tmp_path / "nocap-000000.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:06d}", "png": png_bytes(i)})
    L = loader(str(tmp_path / "nocap-000000.tar"), batch=1, workers=0, resampled=False,
               train_num_samples=5, max_bad_fraction=1.0)
    with pytest.raises(DataError, match="not one usable sample"):
        take(L, 1)


# ---------------------------------------------------------------------------------------------
# Configuration errors, sizes, sources


def test_config_errors_name_the_key_and_the_fix(tmp_path, even_shards):
    with pytest.raises(ConfigError, match="data.train: shard .*not found"):
        loader(str(tmp_path / "nothing-{000000..000003}.tar"))
    no_sizes = write_id_shards(tmp_path / "nosizes", [4, 4], sizes_file=False)
    with pytest.raises(ConfigError, match="data.train_num_samples: the dataset size is unknown"):
        loader(no_sizes)
    with pytest.raises(ConfigError, match=r"2 shards for 2 processes x 5 workers in epoch mode without known"):
        loader(no_sizes, resampled=False, world=2, workers=5, train_num_samples=24)
    with pytest.raises(ConfigError, match="less than one global batch"):
        loader(even_shards, batch=50, world=2)
    with pytest.raises(ConfigError, match="one weight per source"):
        loader(f"{even_shards}::{even_shards}", train_data_weights="1::2::3")
    with pytest.raises(ConfigError, match="only used with data.resampled=true"):
        loader(f"{even_shards}::{even_shards}", train_data_weights="1::2", resampled=False)
    with pytest.raises(ConfigError, match="data.bad_fraction_min_samples"):
        DataConfig(train="x", bad_fraction_min_samples=0)


def test_dataset_size_from_sizes_json_and_img2dataset_stats(tmp_path):
    train = write_id_shards(tmp_path / "a", [5, 7, 9])
    assert dataset_size(DataConfig(train=train)) == 21
    assert dataset_size(DataConfig(train=train, train_num_samples=100)) == 100
    img2 = tmp_path / "b"
    write_id_shards(img2, [3, 4], prefix="x", sizes_file=False)
    for i, n in enumerate([3, 4]):  # img2dataset names shards 00000.tar with 00000_stats.json
        (img2 / f"x-{i:06d}.tar").rename(img2 / f"{i:05d}.tar")
        (img2 / f"{i:05d}_stats.json").write_text(json.dumps({"successes": n, "count": n + 2}))
    assert dataset_size(DataConfig(train=f"{img2}/{{00000..00001}}.tar::{train}")) == 7 + 21


def test_weighted_sources_in_resampled_mode(tmp_path):
    a = write_id_shards(tmp_path / "a", [10, 10], first_id=0)
    b = write_id_shards(tmp_path / "b", [10, 10], first_id=1000)
    ids = sum(take(loader(f"{a}::{b}", train_data_weights="1::3", batch=10, workers=0,
                          shuffle_buffer=0), 40)[0], [])
    share_b = sum(i >= 1000 for i in ids) / len(ids)
    assert 0.6 < share_b < 0.9  # 0.75 expected; 40 shard draws


def test_fsspec_urls_are_read(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    write_id_shards(tmp_path, [6])
    fs = fsspec.filesystem("memory")
    fs.pipe("/shards/m-000000.tar", (tmp_path / "t-000000.tar").read_bytes())
    fs.pipe("/shards/sizes.json", b'{"m-000000.tar": 6}')
    L = loader("memory://shards/m-000000.tar", batch=3, workers=0, resampled=False)
    assert L.num_samples == 6  # sizes.json read through fsspec too
    assert sorted(sum(take(L, 2)[0], [])) == list(range(6))


def test_open_clip_transform_and_tokenizer_in_workers(color_shards):
    from clip_train.model import build_model

    bundle = build_model(ModelConfig(name=str(REPO / "configs/models/tiny-vit.json")))
    # exact decode: the uint8 and float paths then resample alike (fast's uint8 path may use
    # torch's resampler; tests/test_fast_decode.py holds it to the exact path).
    cfg = DataConfig(train=color_shards, workers=1, shuffle_buffer=10, decode="exact")
    def first_batches(uint8_images: bool):
        L = build_train_loader(cfg, transform=bundle.train_transform, tokenizer=bundle.tokenizer,
                               local_batch_size=5, seed=0, rank=0, world_size=1,
                               uint8_images=uint8_images)
        return L, list(islice(L, 3))

    L, batches = first_batches(uint8_images=True)
    images, texts = batches[0]
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8  # 4x less than float32
    assert texts.shape == (5, 32) and texts.dtype == torch.long
    names = ["red", "green", "blue", "yellow"]
    expected = bundle.tokenizer([f"a photo of a {n} square" for n in names])
    assert all(any(torch.equal(row, e) for e in expected) for row in texts)
    # Normalised on the "device", the batches are bit-identical to the float32 path's: ToTensor
    # of an 8-bit image is exactly k/255 and the same float32 operations follow (tolerance 0).
    norm = L.image_normalization
    assert norm is not None and norm.mean == pytest.approx(bundle.model.visual.image_mean)
    _, float_batches = first_batches(uint8_images=False)
    for (u8, texts_u8), (f32, texts_f32) in zip(batches, float_batches, strict=True):
        assert f32.dtype == torch.float32 and torch.equal(texts_u8, texts_f32)
        moved, moved_texts = batch_to_device(u8, texts_u8, torch.device("cpu"), norm)
        assert moved.dtype == torch.float32 and torch.equal(moved, f32)
        assert torch.equal(moved_texts, texts_f32)


def _augmented_transforms():
    import open_clip

    yield "open_clip default", open_clip.image_transform(32, is_train=True)
    yield "open_clip jitter + gray", open_clip.image_transform(
        32, is_train=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
        aug_cfg={"color_jitter_prob": 0.8, "color_jitter": (0.4, 0.4, 0.4, 0.1), "gray_scale_prob": 0.5})
    yield "timm without erasing", open_clip.image_transform(32, is_train=True, aug_cfg={"use_timm": True})
    yield "open_clip eval", open_clip.image_transform(32, is_train=False)


@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")  # open_clip 3.3 warns spuriously
@pytest.mark.parametrize("name", [n for n, _ in _augmented_transforms()])
def test_split_transform_matches_the_float_transform(name):
    transform = dict(_augmented_transforms())[name]
    uint8_transform, norm = split_normalize(transform)
    assert norm is not None
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for seed in range(4):  # random augmentations draw the same numbers on both paths
        random.seed(seed), torch.manual_seed(seed)  # as the loader seeds each sample
        reference = transform(image)
        random.seed(seed), torch.manual_seed(seed)
        u8 = uint8_transform(image)
        assert u8.dtype == torch.uint8 and u8.shape == reference.shape
        assert torch.equal(normalize_images(u8[None], norm.mean, norm.std)[0], reference)
    assert normalize_images(u8[None], norm.mean, norm.std, torch.bfloat16).dtype == torch.bfloat16


def test_transforms_that_need_float_images_stay_float():
    import open_clip

    # timm's random erasing works on the normalised float image: no split, float32 batches.
    erasing = open_clip.image_transform(32, is_train=True, aug_cfg={"use_timm": True, "re_prob": 0.5})
    assert split_normalize(erasing) == (erasing, None)
    assert split_normalize(to_tensor) == (to_tensor, None)  # a plain function
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(torch.zeros(1, 3, 2, 2), (0.0,) * 3, (1.0,) * 3)
    images, texts = torch.rand(2, 3, 4, 4), torch.zeros(2, 3, dtype=torch.long)
    moved, _ = batch_to_device(images, texts, torch.device("cpu"), None)
    assert moved is images or torch.equal(moved, images)


# ---------------------------------------------------------------------------------------------
# make-shards


def _read_shards(pattern: str) -> list[dict]:
    dataset = wds.WebDataset(pattern, shardshuffle=False, empty_check=False)
    return list(dataset)


def _photo(seed: int, size=(40, 30), fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for i in range(7):
        ext, fmt = (".png", "PNG") if i % 3 == 0 else (".jpg", "JPEG")
        stem = str(root / ("sub" if i % 2 else "") / f"img.{i}")  # a dot in the name: keys stay valid
        Path(stem + ext).write_bytes(_photo(i, fmt=fmt))
        Path(stem + ".txt").write_text(f"caption number {i} ünïcode\n")
        if i % 2 == 0:
            Path(stem + ".cls").write_text(str(i % 4))
            Path(stem + ".json").write_text(json.dumps({"url": f"http://x/{i}"}))
    (root / "orphan.jpg").write_bytes(_photo(99))  # no caption: skipped and reported
    return root


def test_make_shards_from_a_folder_round_trip(tmp_path, image_folder):
    out = tmp_path / "out"
    summary = make_shards(str(image_folder), str(out), samples_per_shard=3, progress=False)
    assert summary["num_samples"] == 7 and summary["num_shards"] == 3
    assert summary["skipped"] == {"missing_caption": 1}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    samples = _read_shards(summary["pattern"])
    assert len(samples) == 7
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert len(by_source) == 7  # every input exactly once
    for source, s in by_source.items():
        i = int(source.split(".")[1])
        original = (image_folder / source).read_bytes()
        assert s["txt"].decode() == f"caption number {i} ünïcode"
        assert s["png" if i % 3 == 0 else "jpg"] == original  # original bytes and format kept
        if i % 2 == 0:
            assert int(s["cls"]) == i % 4 and json.loads(s["json"])["url"] == f"http://x/{i}"
        else:
            assert "cls" not in s
    # Loadable by the training loader, sizes from sizes.json.
    L = build_train_loader(DataConfig(train=summary["pattern"], workers=0), transform=to_tensor,
                           tokenizer=lambda caps: torch.zeros(len(caps), 2, dtype=torch.long),
                           local_batch_size=7, seed=0, rank=0, world_size=1)
    assert L.num_samples == 7
    # Deterministic: a re-run writes identical bytes.
    again = tmp_path / "again"
    make_shards(str(image_folder), str(again), samples_per_shard=3, progress=False)
    for name in sizes:
        assert (again / name).read_bytes() == (out / name).read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        make_shards(str(image_folder), str(out), progress=False)


def test_make_shards_from_manifests_with_resize(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(5):
        (images / f"{i}.png").write_bytes(_photo(i, size=(64, 48), fmt="PNG"))
        rows.append({"filepath": f"imgs/{i}.png", "caption": f"a, \"quoted\" caption {i}",
                     "label": str(i % 2), "source_id": f"id{i}"})
    rows.append({"filepath": "imgs/missing.png", "caption": "gone", "label": "0", "source_id": "x"})
    rows.append({"filepath": "imgs/0.png", "caption": "", "label": "0", "source_id": "y"})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for manifest in ("m.csv", "m.jsonl"):
        out = tmp_path / f"out_{manifest}"
        code = make_shards_main([str(tmp_path / manifest), str(out), "--samples-per-shard", "2",
                                 "--image-size", "24", "--cls-column", "label", "--no-progress"])
        assert code == 0
        samples = _read_shards(f"{out}/shard-{{000000..000002}}.tar")
        assert [s["txt"].decode() for s in samples] == [f"a, \"quoted\" caption {i}" for i in range(5)]
        assert [int(s["cls"]) for s in samples] == [0, 1, 0, 1, 0]
        assert [json.loads(s["json"])["source_id"] for s in samples] == [f"id{i}" for i in range(5)]
        sizes = [Image.open(io.BytesIO(s["jpg"])).size for s in samples]
        assert sizes == [(32, 24)] * 5  # shorter side reduced to 24, stored as jpg
        assert json.loads((out / "sizes.json").read_text()) == {
            "shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}


def test_write_samples_encodes_pil_images_ints_and_text(tmp_path):
    def samples():
        for i in range(5):
            image = Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8))
            yield {"__key__": f"k{i}", "png": image, "txt": f"digit {i}", "cls": i}

    sizes = write_samples(samples(), str(tmp_path / "w"), 2, prefix="train", progress=False)
    assert sizes == {"train-000000.tar": 2, "train-000001.tar": 2, "train-000002.tar": 1}
    got = _read_shards(f"{tmp_path}/w/train-{{000000..000002}}.tar")
    assert [int(s["cls"]) for s in got] == list(range(5))
    assert [s["txt"].decode() for s in got] == [f"digit {i}" for i in range(5)]
    assert np.asarray(Image.open(io.BytesIO(got[3]["png"])))[0, 0, 0] == 30  # PNG is lossless


# ---------------------------------------------------------------------------------------------
# Two real processes


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_processes_split_epochs_exactly_and_never_hang(tmp_path):
    proc = launch(["tests/helpers/dist_data_check.py", str(tmp_path)], timeout=440)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["world_size"] == 2
    # Even shards, 2 processes x 2 workers: every sample exactly once per epoch, new order each.
    assert result["even_once_per_epoch"] == [True, True]
    assert result["even_ranks_disjoint"] and result["even_epochs_differ"]
    # Uneven shards: both processes make steps_per_epoch batches per epoch, with an all-reduce
    # per step (a process that ran out early would hang the other; the launch has a timeout).
    assert result["uneven_steps"] == [[result["uneven_steps_per_epoch"]] * 2] * 2
    assert result["uneven_allreduce_sum"] == 2 * 2 * result["uneven_steps_per_epoch"]
    # Resampled mode: different streams per rank, each reproducible.
    assert result["resampled_ranks_differ"] and result["resampled_reproducible"] == [True, True]
    # Epoch mode over 5 and 6 equal shards (not a multiple of 2 x 2 workers): every sample
    # exactly once in each of 2 epochs (the shards' sizes are known, so the split is by sample).
    assert result["shards_5"] == [True, True] and result["shards_6"] == [True, True]
    # 3.1% of the captions missing, default shuffle buffer (1000, so most samples read are
    # still in it): no stop, and the fraction the metrics report is the truth (1/32) at every check.
    b3 = result["b3"]
    assert b3["stop"] is None and b3["max_fraction"] < 0.035, b3
    assert b3["final"]["data/samples_read"] == 4000 and b3["final"]["data/bad_samples"] == 125, b3
    assert b3["final"]["data/bad/missing_caption"] == 125
    # 30% missing: both processes stop at the same check, with one line naming the worst shards.
    stop_0, stop_1 = result["b30"]
    assert stop_0 == stop_1 and "above data.max_bad_fraction=0.05" in stop_0, stop_0
    assert "missing_caption=" in stop_0 and stop_0.count("b30/t-") == 5 and "(30 bad)" in stop_0
    # One shard among 100 without any caption, drawn 4th, default settings: judged, no stop.
    one = result["one_bad_shard"]
    assert one["stop"] is None, one["stop"]
    assert one["final"]["data/samples_read"] >= one["judged_from"]
    # The bad shard once in each epoch read so far (its worker, 100 samples short of its batch
    # quota, reads part of its range twice): about 1% of the samples read.
    final = one["final"]
    assert final["data/bad/missing_caption"] >= 200 and final["data/bad_samples"] / final["data/samples_read"] < 0.015


# ---------------------------------------------------------------------------------------------
# Continuing after the data changed (train.resume_data)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_data_fresh_continues_after_shards_are_added(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import write_color_shards

    first = write_color_shards(tmp_path / "a", n_shards=2, per_shard=16)
    added = write_color_shards(tmp_path / "b", n_shards=2, per_shard=16)
    out = tmp_path / "run"
    common = ["model.name=configs/models/tiny-vit.json", "train.local_batch_size=8", "train.log_every_steps=1",
              "data.workers=1", "data.shuffle_buffer=8", f"train.output_dir={out}", "train.resume=latest"]

    def train(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
        env.pop("WORLD_SIZE", None)
        return subprocess.run([sys.executable, "-m", "clip_train", "train", *common, *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240)

    proc = train(f"data.train={first}", "train.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # More shards: the exact stream cannot continue, and the refusal names the way forward.
    proc = train(f"data.train={first}::{added}", "train.steps=6")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clip-train: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "data.train: changed since the checkpoint" in errors[0] and "train.resume_data=fresh" in errors[0]
    proc = train(f"data.train={first}::{added}", "train.steps=6", "train.resume_data=fresh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.resume_data=fresh: model, optimizer and step 3 restored; the data stream restarts" in proc.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert all(m["data/samples_read"] > 0 for m in metrics if "loss" in m)
    assert (out / "checkpoints" / "step_00000006").is_dir()
