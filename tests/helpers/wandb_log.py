"""Read back the history of an offline W&B run (``run-<id>.wandb``) without wandb's own reader, which
recent versions no longer ship in Python. The file is W&B's LevelDB-style log: a 7-byte header
(":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a 7-byte header (CRC-32,
length, type: 1 full, 2 first, 3 middle, 4 last); each record is a serialised ``Record`` protobuf."""

from __future__ import annotations

import json
import struct
import zlib

BLOCK = 32768
HEADER = 7


def records(path) -> list[bytes]:
    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block tail too small for a header: zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        body = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF == crc, "W&B record checksum mismatch"
        pos += HEADER + length
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):
            out.append(pending)
            pending = b""
    return out


def history(path) -> dict[int, dict[str, float]]:
    """step -> {key: value} of every ``wandb.log`` call in the file."""
    from wandb.proto import wandb_internal_pb2 as pb

    steps: dict[int, dict[str, float]] = {}
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
        steps.setdefault(int(rec.history.step.num), {}).update(items)
    return steps
