"""Launched by tests/test_data.py on 2 processes x 2 workers: epoch splitting, no hang, resampling.

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
from clip_train.data import build_train_loader


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
        print("RESULT " + json.dumps(result), flush=True)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
