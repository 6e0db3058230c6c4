"""Read the history rows of an offline W&B run file (`run-<id>.wandb`) without a W&B account.

The file is a 7-byte W&B header followed by LevelDB-log records (32 KiB blocks, 7-byte record
headers: crc32, little-endian length, type) holding `wandb_internal_pb2.Record` protobufs.
"""

import json
import struct

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        parts.append(payload)
        if kind in (FULL, LAST):
            yield b"".join(parts)
            parts = []


def history(path: str) -> list[dict]:
    rows = []
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows
