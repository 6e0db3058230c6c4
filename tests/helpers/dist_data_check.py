"""Launched by tests/test_data.py on 2 processes x 2 workers: epoch splitting (every sample once
for any shard count), no hang, resampling, and the bad-sample ceiling judged over both processes.

Prints `RESULT {json}` on rank 0.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from data_shards import id_tokenizer, noisy_tensor, to_tensor, write_id_shards

from clip_train.config import DataConfig
from clip_train.data import (
    BadSampleCeiling,
    DataError,
    build_train_loader,
    check_bad_samples,
    epoch_shard_order,
)


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def loader(train, rank, world, transform=to_tensor, batch=6, **data):
    cfg = DataConfig(train=train, **{"workers": 2, "shuffle_buffer": 20, **data})
    return build_train_loader(cfg, transform=transform, tokenizer=id_tokenizer,
                              local_batch_size=batch, seed=0, rank=rank, world_size=world)


def first_batches(train_loader, n):
    return [texts[:, 0].tolist() for _, (_, texts) in zip(range(n), train_loader, strict=False)]


def judged(train_loader, accelerator, ceiling, batches, every):
    """Consume up to `batches` batches, judging every process's counts every `every` batches as
    train.py does at its stop checks: (fractions seen at the checks, last metrics, stop message)."""
    fractions, metrics = [], {}
    it = iter(train_loader)
    try:
        for i in range(1, batches + 1):
            next(it)
            if i % every == 0:
                metrics = check_bad_samples(accelerator, train_loader, ceiling)
                fractions.append(metrics["data/bad_samples"] / metrics["data/samples_read"])
    except DataError as exn:
        return fractions, metrics, str(exn)
    return fractions, metrics, None


def bad_data_checks(tmp, accelerator, rank, world) -> dict:
    result = {}
    # 3.1% of the captions missing, uniformly; default shuffle buffer and ceiling.
    if rank == 0:
        write_id_shards(tmp / "b3", [100] * 40, bad=lambda i: "caption" if i % 32 == 31 else None)
        write_id_shards(tmp / "b30", [100] * 20, bad=lambda i: "caption" if i % 10 < 3 else None)
    accelerator.wait_for_everyone()
    ceiling = BadSampleCeiling(0.05, min_samples=1000, window_samples=200000)
    L = loader(str(tmp / "b3/t-{000000..000039}.tar"), rank, world, resampled=False, shuffle_buffer=1000)
    fractions, metrics, stop = judged(L, accelerator, ceiling, 160, every=10)
    result["b3"] = {"stop": stop, "max_fraction": max(fractions), "final": metrics}
    # 30% missing: every process stops at the same check, naming the worst shards.
    ceiling = BadSampleCeiling(0.05, min_samples=1000, window_samples=200000)
    L = loader(str(tmp / "b30/t-{000000..000019}.tar"), rank, world, resampled=False, shuffle_buffer=1000)
    _, _, stop = judged(L, accelerator, ceiling, 160, every=10)
    result["b30"] = gather(stop)
    # One shard of 100 without a single caption among 100 such shards, drawn 4th; the data
    # settings at their defaults (the ceiling judged from 20000 samples read by the job).
    urls = [str(tmp / f"one/t-{s:06d}.tar") for s in range(100)]
    bad_shard = urls.index(epoch_shard_order(urls, 0, 0)[3])
    if rank == 0:
        write_id_shards(tmp / "one", [100] * 100, bad=lambda i: "caption" if i // 100 == bad_shard else None)
    accelerator.wait_for_everyone()
    defaults = DataConfig(train="x")
    ceiling = BadSampleCeiling(defaults.max_bad_fraction, defaults.bad_fraction_min_samples,
                               defaults.bad_fraction_window_samples)
    L = loader(str(tmp / "one/t-{000000..000099}.tar"), rank, world, batch=32, resampled=False,
               shuffle_buffer=defaults.shuffle_buffer)
    fractions, metrics, stop = judged(L, accelerator, ceiling, 2 * L.steps_per_epoch + 10, every=10)
    result["one_bad_shard"] = {"stop": stop, "final": metrics, "bad_shard": urls[bad_shard],
                               "judged_from": defaults.bad_fraction_min_samples}
    return result


def every_sample_once(tmp, accelerator, rank, world) -> dict:
    """Epoch mode over 5 and 6 equal shards on 2 processes x 2 workers: the ids of 2 epochs."""
    result = {}
    for n in (5, 6):
        if rank == 0:
            write_id_shards(tmp / f"s{n}", [12] * n)
        accelerator.wait_for_everyone()
        L = loader(str(tmp / f"s{n}/t-{{000000..{n - 1:06d}}}.tar"), rank, world, batch=3, resampled=False)
        it = iter(L)
        epochs = [sum((next(it)[1][:, 0].tolist() for _ in range(L.steps_per_epoch)), []) for _ in range(2)]
        per_rank = gather(epochs)
        result[f"shards_{n}"] = [sorted(per_rank[0][e] + per_rank[1][e]) == list(range(12 * n)) for e in range(2)]
    return result


def main() -> None:
    accelerator = Accelerator()  # sets up the gloo process group; the loader stays out of prepare()
    rank, world = accelerator.process_index, accelerator.num_processes
    tmp = Path(sys.argv[1])
    if rank == 0:
        write_id_shards(tmp / "even", [12] * 8)
        write_id_shards(tmp / "uneven", [3, 20, 7, 11, 2, 9])
    accelerator.wait_for_everyone()
    result = {"world_size": world}

    # Even shards: 96 samples, global batch 12 -> 8 steps per epoch on each process.
    L = loader(str(tmp / "even/t-{000000..000007}.tar"), rank, world, resampled=False)
    it = iter(L)
    epochs = []
    for _ in range(2):
        ids = []
        for _ in range(L.steps_per_epoch):
            ids += next(it)[1][:, 0].tolist()
        epochs.append(ids)
    per_rank = gather(epochs)
    if rank == 0:
        result["even_once_per_epoch"] = [sorted(per_rank[0][e] + per_rank[1][e]) == list(range(96))
                                         for e in range(2)]
        result["even_ranks_disjoint"] = not set(per_rank[0][0]) & set(per_rank[1][0])
        result["even_epochs_differ"] = per_rank[0][0] != per_rank[0][1]

    # Uneven shards: rank 0 gets 3 of them, rank 1 gets 3 others of different sizes.
    L = loader(str(tmp / "uneven/t-{000000..000005}.tar"), rank, world, resampled=False)
    total, counted = torch.zeros(1), {}
    it = iter(L)
    while L.epoch < 2:
        epoch = L.epoch
        next(it)
        counted[epoch] = counted.get(epoch, 0) + 1
        step = torch.ones(1)
        dist.all_reduce(step)  # would hang if the other process had stopped
        total += step
    steps = [counted[0], counted[1]]
    gathered = gather(steps)
    if rank == 0:
        result["uneven_steps"] = gathered
        result["uneven_steps_per_epoch"] = L.steps_per_epoch
        result["uneven_allreduce_sum"] = int(total.item())

    # Resampled: a stream per (seed, rank, worker); same seed -> same stream.
    train = str(tmp / "even/t-{000000..000007}.tar")
    a = first_batches(loader(train, rank, world, transform=noisy_tensor), 5)
    b = first_batches(loader(train, rank, world, transform=noisy_tensor), 5)
    both = gather({"a": a, "same": a == b})
    if rank == 0:
        result["resampled_ranks_differ"] = both[0]["a"] != both[1]["a"]
        result["resampled_reproducible"] = [both[0]["same"], both[1]["same"]]
    result.update(every_sample_once(tmp, accelerator, rank, world))
    result.update(bad_data_checks(tmp, accelerator, rank, world))
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
