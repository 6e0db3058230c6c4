"""Shared-memory batch buffers that a loader worker reuses once the training process has let go
of them (`BatchSlots`).

A DataLoader worker ships each batch in shared memory. Fresh memory for every batch costs the
worker ~0.08 ms a sample at 224 px (the kernel allocates, zeroes and maps 2,350 pages of 4 KB
for a 64-image uint8 batch: measured on the 2-core VM, a sixth of what a worker spends on a
sample besides its JPEG decode). So each worker keeps a few segments and writes a batch into one
that the training process has released.

Release follows the batch's memory, not the training loop's progress: the training process
registers a finalizer on the storage it receives (`BatchSlots.received`), which runs when the
last tensor on that memory (the batch, its views, anything that holds them) is gone, and only
then marks the slot free in a small shared flag array. A worker writes only into a slot marked
free (and marks it busy first), else into fresh memory as before: a batch still referenced
anywhere in the training process is never overwritten.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch


class BatchSlots:
    """`per_worker` reusable shared-memory batch buffers for each of `num_workers` workers,
    and the shared flags that say which of them the training process still holds."""

    def __init__(self, num_workers: int, per_worker: int):
        self.per_worker = per_worker
        self.busy = torch.zeros(num_workers * per_worker, dtype=torch.uint8).share_memory_()
        self._storages: dict[int, torch.UntypedStorage] = {}  # a worker's own, made on first use

    def __getstate__(self) -> dict:
        return {"per_worker": self.per_worker, "busy": self.busy}  # the flags, not a worker's buffers

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _storages={})

    def take(self, worker: int, nbytes: int) -> tuple[int | None, torch.UntypedStorage | None]:
        """In a worker: (slot, its shared storage of `nbytes`), marked busy; (None, None) when
        the training process holds every slot of this worker."""
        busy = self.busy.numpy()
        for slot in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            if busy[slot]:
                continue
            storage = self._storages.get(slot)
            if storage is None or storage.nbytes() != nbytes:
                storage = self._storages[slot] = torch.UntypedStorage._new_shared(nbytes)
            busy[slot] = 1
            return slot, storage
        return None, None

    def received(self, images: torch.Tensor, slot: int) -> None:
        """In the training process: free `slot` once nothing references `images`' memory (torch
        keeps a storage's Python object alive as long as the storage itself)."""
        weakref.finalize(images.untyped_storage(), _release, self.busy.numpy(), slot)


def _release(busy: np.ndarray, slot: int) -> None:
    busy[slot] = 0
