"""Builders of KV transfer byte streams for the frame codec and decoder tests."""

from __future__ import annotations

import torch

from splitserve.engine.kv_cache import SequenceKV
from splitserve.transfer.frames import (
    MAGIC,
    PREFIX,
    VERSION,
    FrameType,
    KVHeader,
    encode_blocks_prefix,
    encode_frame,
    encode_header,
    frame_runs,
    runs_checksum,
)
from tests.worker.transfer.caches import filled, layout_of


def encode_transfer(header: KVHeader, source: SequenceKV) -> bytes:
    """Everything a sender writes, as one byte string."""
    parts = [encode_header(header)]
    for index in range(header.num_frames):
        runs = frame_runs(header, source, index)
        parts += [encode_blocks_prefix(index, sum(map(len, runs)), runs_checksum(runs)), *map(bytes, runs)]
    parts.append(encode_frame(FrameType.END))
    return b"".join(parts)


def shape(layers: int = 3, heads: int = 2, head_dim: int = 4, dtype: torch.dtype = torch.float32) -> Shape:
    return (layers, heads, head_dim, dtype)


Shape = tuple[int, int, int, torch.dtype]


def tiny_transfer(dtype: torch.dtype = torch.float32) -> tuple[KVHeader, SequenceKV, bytes]:
    """3 layers, 10 tokens in blocks of 4, two blocks per frame: 6 frames of 8 + 2 tokens."""
    header = KVHeader("req-1", 42, 10, 3, dtype, 2, 4, 4, 2)
    source = filled(layout_of(header), 10, 4)
    return header, source, encode_transfer(header, source)


def prefix(
    kind: int = FrameType.BEGIN,
    length: int = 0,
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    flags: int = 0,
    index: int = 0,
    crc: int = 0,
) -> bytes:
    return PREFIX.pack(magic, version, kind, flags, index, crc, length)
