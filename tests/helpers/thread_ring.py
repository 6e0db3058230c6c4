"""A ring of W simulated processes in one: threads, with queues for the point-to-point messages.
It speaks the `Ring` protocol of clip_train.loss (rank, world, shift), so the ring kernels run
unchanged, with every message checked for shape and dtype; cheap to test many process counts.
The real gloo runs are tests/helpers/dist_ring_check.py."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch


class _Received:
    def __init__(self, box: queue.Queue, recv: list[torch.Tensor]):
        self.box, self.recv = box, recv

    def wait(self) -> None:
        sent = self.box.get(timeout=60)  # a ring out of step would hang: fail instead
        assert [(t.shape, t.dtype) for t in sent] == [(t.shape, t.dtype) for t in self.recv], (
            "message shapes differ between sender and receiver")
        for dst, src in zip(self.recv, sent, strict=True):
            dst.copy_(src)


class ThreadRing:
    def __init__(self, rank: int, world: int, boxes: dict):
        self.rank, self.world, self.boxes = rank, world, boxes
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world
        self.messages = 0  # shifts (each: one send to the next, one receive from the previous)
        self.rows_sent: list[int] = []  # the length of every tensor sent

    def shift(self, send: list[torch.Tensor], recv: list[torch.Tensor], tag: int) -> list:
        assert all(t.is_contiguous() for t in send + recv), "gloo needs contiguous tensors"
        self.messages += 1
        self.rows_sent.extend(t.shape[0] for t in send)
        # Sends are buffered (a copy), as an isend's buffer must not change until it completes.
        self.boxes[(self.rank, self.next, tag)].put([t.clone() for t in send])
        return [_Received(self.boxes[(self.prev, self.rank, tag)], recv)]


def run_ring(world: int, fn: Callable[[int, ThreadRing], object]) -> list:
    """fn(rank, ring) in `world` threads; their results in rank order (re-raises a failure)."""
    boxes = {(r, (r + 1) % world, tag): queue.Queue() for r in range(world) for tag in range(100)}
    results, errors = [None] * world, []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, ThreadRing(rank, world, boxes))
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            errors.append(err)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
