"""The KV wire codec without sockets: headers, limits, frame mapping and error frames round-trip and refuse
what is wrong."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from splitserve.transfer.frames import (
    MAX_HEADER_BYTES,
    MAX_REASON_BYTES,
    PREFIX,
    ErrorCode,
    FrameType,
    KVHeader,
    KVLimits,
    KVProtocolError,
    check_payload,
    check_reply_prefix,
    checksum,
    decode_error,
    decode_header,
    decode_prefix,
    encode_error,
    encode_header,
    frame_runs,
)
from tests.worker.transfer.caches import filled, layout_of
from tests.worker.transfer.wire import prefix, shape, tiny_transfer


def test_for_blocks_sizes_frames() -> None:
    header = KVHeader.for_blocks("r", 0, 4000, shape(32, 8, 128, torch.bfloat16), 16)
    assert header.blocks_per_frame == 64  # 64 KiB blocks, 4 MiB frames
    assert header.frames_per_layer == 4 and header.num_frames == 128
    assert header.frame(17) == (4, 1024, 2048)
    assert header.frame(127) == (31, 3072, 4000)
    assert header.max_frame_nbytes == 4 << 20
    assert header.total_nbytes == 4000 * 32 * 2 * 8 * 128 * 2
    small = KVHeader.for_blocks("r", 0, 5, shape(1, 1, 1, torch.float32), 16)
    assert small.blocks_per_frame == 1 and small.num_frames == 1 and small.max_frame_nbytes == 40
    huge_blocks = KVHeader.for_blocks("r", 0, 100, shape(1, 64, 256, torch.float32), 4096)
    assert huge_blocks.blocks_per_frame == 1
    int8 = KVHeader.for_blocks("r", 0, 4000, shape(32, 8, 128, torch.int8), 16)
    assert int8.token_nbytes == 2 * 8 * (128 + 2)  # each row's values, then its 2-byte scale
    assert int8.total_nbytes == 4000 * 32 * int8.token_nbytes


def test_header_round_trip_and_sizes() -> None:
    header = KVHeader("x" * 128, 2**32 - 1, 4000, 80, torch.bfloat16, 8, 128, 16, 3)
    frame = encode_header(header)
    parsed = decode_prefix(frame[: PREFIX.size])
    check_payload(parsed, frame[PREFIX.size :])
    assert decode_header(frame[PREFIX.size :]) == header
    assert header.token_nbytes == 2 * 8 * 128 * 2
    assert header.total_nbytes == 80 * 4000 * header.token_nbytes
    assert header.num_frames == 80 * 84  # ceil(4000 / 48) frames per layer
    assert len(frame) - PREFIX.size <= MAX_HEADER_BYTES


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"request_id": ""}, "request id"),
        ({"request_id": "é" * 65}, "request id"),
        ({"first_token": -1}, "first token"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_kv_heads": 2**32}, "num_kv_heads"),
        ({"head_dim": True}, "head_dim"),
        ({"block_size": 0}, "block_size"),
        ({"blocks_per_frame": 1.5}, "blocks_per_frame"),
        ({"dtype": torch.uint8}, "dtype"),
        ({"num_tokens": 2**40, "block_size": 1, "num_layers": 2**20}, "frames do not fit"),
        ({"first_position": 10}, "first position"),  # the receiver would get no token at all
        ({"first_position": -1}, "first position"),
    ],
)
def test_header_validation(fields: dict[str, object], message: str) -> None:
    valid: dict[str, object] = {
        "request_id": "r",
        "first_token": 1,
        "num_tokens": 10,
        "num_layers": 2,
        "dtype": torch.float16,
        "num_kv_heads": 4,
        "head_dim": 32,
        "block_size": 16,
        "blocks_per_frame": 1,
    }
    with pytest.raises(KVProtocolError, match=message):
        KVHeader(**(valid | fields))  # type: ignore[arg-type]


def test_limits() -> None:
    header = KVHeader("r", 0, 1000, 10, torch.float32, 8, 128, 16, 64)  # 8 MB per frame
    KVLimits(
        max_transfer_bytes=header.total_nbytes, max_frame_bytes=header.max_frame_nbytes, max_layers=10
    ).check(header)
    for limits in (
        KVLimits(max_transfer_bytes=header.total_nbytes - 1),
        KVLimits(max_frame_bytes=header.max_frame_nbytes - 1),
        KVLimits(max_layers=9),
    ):
        with pytest.raises(KVProtocolError) as caught:
            limits.check(header)
        assert caught.value.code == ErrorCode.LIMIT


def test_a_source_that_does_not_match_the_header_is_refused() -> None:
    header, source, _ = tiny_transfer()
    short = filled(layout_of(header), 7, 4)
    with pytest.raises(ValueError, match="not in the 8 slots held"):
        frame_runs(header, short, 5)

    class Truncating:
        def runs(self, layer: int, begin: int, end: int) -> list[memoryview]:
            return source.runs(layer, begin, end)[:-1]

    with pytest.raises(KVProtocolError, match="frame 0 maps to 384 bytes of KV, not 512") as caught:
        frame_runs(header, Truncating(), 0)
    assert caught.value.code == ErrorCode.INTERNAL


def test_runs_are_views_of_the_pool() -> None:
    header, source, _ = tiny_transfer(torch.bfloat16)
    runs = frame_runs(header, source, 0)
    assert len(runs) == 2 * 2  # keys and values of 2 heads, the sequence's blocks contiguous
    source.pool.data[0, 0, 0, source.first_slot, 0] = 5.0
    assert bytes(runs[0][:2]) == bytes(source.pool.data[0, 0, 0, source.first_slot, :1].view(torch.uint8))


def test_error_frames() -> None:
    frame = encode_error(ErrorCode.REJECTED, "no room " + "é" * MAX_REASON_BYTES)
    parsed = decode_prefix(frame[: PREFIX.size])
    check_reply_prefix(parsed)
    check_payload(parsed, frame[PREFIX.size :])
    code, reason = decode_error(frame[PREFIX.size :])
    assert code == ErrorCode.REJECTED and reason.startswith("no room é")
    assert len(reason.encode()) <= MAX_REASON_BYTES
    for reply in (prefix(FrameType.ERROR, 1 << 40), prefix(FrameType.OK, 1), prefix(FrameType.BLOCKS)):
        with pytest.raises(KVProtocolError):
            check_reply_prefix(decode_prefix(reply))
    with pytest.raises(KVProtocolError, match="unknown error code"):
        decode_error(struct.pack("<H", 999))


@pytest.mark.parametrize("size", [0, 100, 5000, 70_000, 3 << 20])
def test_checksum_is_zlib_crc32(size: int) -> None:
    """Whichever implementation is installed (zlib-ng or the stdlib), the wire value is zlib's CRC-32."""
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    view = data.numpy().data
    assert checksum(view) == zlib.crc32(view)
    assert checksum(view[size // 3 :], checksum(view[: size // 3])) == zlib.crc32(view)
