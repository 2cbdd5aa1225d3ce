"""The KV wire codec without sockets: round trips, every rejection, and fuzzing of the decoder."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.kv_cache import KVLayout, SequenceKV
from splitserve.transfer.frame_decoder import Begin, End, Event, TransferDecoder
from splitserve.transfer.frames import (
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_REASON_BYTES,
    PREFIX,
    VERSION,
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
    encode_blocks_prefix,
    encode_error,
    encode_frame,
    encode_header,
    frame_runs,
    runs_checksum,
)
from tests.worker.transfer.caches import filled, layout_of, sequence, wire_bytes

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def encode_transfer(header: KVHeader, source: SequenceKV) -> bytes:
    """Everything a sender writes, as one byte string."""
    parts = [encode_header(header)]
    for index in range(header.num_frames):
        runs = frame_runs(header, source, index)
        parts += [encode_blocks_prefix(index, sum(map(len, runs)), runs_checksum(runs)), *map(bytes, runs)]
    parts.append(encode_frame(FrameType.END))
    return b"".join(parts)


def feed(
    decoder: TransferDecoder, data: bytes, block_size: int = 3, fragmented: bool = False
) -> tuple[list[Event], SequenceKV | None]:
    """Run `data` through the decoder, landing frames in a fresh pool's blocks taken on Begin (as the
    decode worker does); stops quietly when the data runs out (a truncated stream)."""
    events: list[Event] = []
    landing: SequenceKV | None = None
    position = 0
    while not decoder.done:
        view = decoder.want()
        if position + len(view) > len(data):
            break
        view[:] = data[position : position + len(view)]
        position += len(view)
        event = decoder.filled()
        if isinstance(event, Begin):
            landing = sequence(layout_of(event.header), event.header.num_tokens, block_size, fragmented)
            decoder.land_into(landing)
        if event is not None:
            events.append(event)
    return events, landing


def shape(layers: int = 3, heads: int = 2, head_dim: int = 4, dtype: torch.dtype = torch.float32) -> Shape:
    return (layers, heads, head_dim, dtype)


Shape = tuple[int, int, int, torch.dtype]


def tiny_transfer(dtype: torch.dtype = torch.float32) -> tuple[KVHeader, SequenceKV, bytes]:
    """3 layers, 10 tokens in blocks of 4, two blocks per frame: 6 frames of 8 + 2 tokens."""
    header = KVHeader("req-1", 42, 10, 3, dtype, 2, 4, 4, 2)
    source = filled(layout_of(header), 10, 4)
    return header, source, encode_transfer(header, source)


def header_payload(
    rid: bytes = b"r",
    dtype: int = 1,
    num_layers: int = 2,
    num_tokens: int = 3,
    heads: int = 1,
    head_dim: int = 4,
    block_size: int = 2,
    per_frame: int = 1,
    first_position: int = 0,
) -> bytes:
    fixed = struct.pack(
        "<HBxIIQIIIIQ",
        len(rid),
        dtype,
        num_layers,
        0,
        num_tokens,
        heads,
        head_dim,
        block_size,
        per_frame,
        first_position,
    )
    return fixed + rid


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "sender_block", "receiver_block", "fragmented"),
    [
        (1, 16, 16, False),
        (32, 16, 16, False),  # on a block boundary
        (33, 16, 16, True),  # one past it, the receiver's blocks apart
        (70, 16, 5, True),  # the receiver's blocks are smaller and scattered
        (70, 4, 32, False),  # ... or bigger
        (17, 1, 3, True),
    ],
)
@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_round_trip_is_bit_exact(
    dtype: torch.dtype,
    tokens: int,
    sender_block: int,
    receiver_block: int,
    fragmented: bool,
    chunk_bytes: int,
) -> None:
    source = filled(KVLayout(3, 2, 8, dtype), tokens, sender_block, fragmented=not fragmented)
    header = KVHeader.for_blocks("req-é", 7, tokens, shape(3, 2, 8, dtype), sender_block, frame_bytes=600)
    assert header.num_frames >= 3
    decoder = TransferDecoder(KVLimits(), chunk_bytes)
    events, landed = feed(decoder, encode_transfer(header, source), receiver_block, fragmented)
    assert events == [Begin(header), End()]
    assert landed is not None
    assert wire_bytes(landed, tokens) == wire_bytes(source, tokens)


@pytest.mark.parametrize(
    ("tokens", "first", "sender_block", "receiver_block"),
    [
        (70, 64, 16, 16),  # the receiver holds 4 whole blocks: 6 tokens move
        (70, 15, 16, 5),  # its blocks are smaller: the first position is in the sender's first block
        (70, 32, 4, 32),  # ... or bigger
        (17, 16, 1, 16),  # one token moves
    ],
)
def test_a_transfer_past_the_held_prefix_moves_only_the_rest(
    tokens: int, first: int, sender_block: int, receiver_block: int
) -> None:
    """Tokens `first..` land at their own positions of the receiver's blocks; only their bytes move."""
    source = filled(KVLayout(3, 2, 8, torch.float16), tokens, sender_block)
    header = KVHeader.for_blocks(
        "part", 7, tokens, shape(3, 2, 8, torch.float16), sender_block, frame_bytes=600, first_position=first
    )
    assert header.sent_tokens == tokens - first
    assert header.total_nbytes == (tokens - first) * header.token_nbytes * 3
    assert all(first <= begin < end <= tokens for _, begin, end in header.frames())
    data = encode_transfer(header, source)
    events, landed = feed(TransferDecoder(KVLimits()), data, receiver_block, fragmented=True)
    assert events == [Begin(header), End()]  # the first position made it through the BEGIN frame
    assert landed is not None
    for layer in range(3):
        assert b"".join(landed.runs(layer, first, tokens)) == b"".join(source.runs(layer, first, tokens))
    framing = len(encode_header(header)) + (header.num_frames + 1) * PREFIX.size
    assert len(data) == header.total_nbytes + framing


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


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (prefix(magic=b"HTTP"), "bad magic"),
        (prefix(version=1), "KV frame version 1, this side speaks 3: both ends .* same splitserve release"),
        (prefix(version=2), "KV frame version 2, this side speaks 3"),  # sent the whole prompt always
        (prefix(version=4), "version 4"),
        (prefix(kind=99), "unknown frame type"),
        (prefix(flags=1), "flags"),
        (prefix(FrameType.BLOCKS, 8), "BLOCKS frame before BEGIN"),
        (prefix(FrameType.BEGIN, 1 << 62), "BEGIN frame of"),
        (prefix(FrameType.BEGIN, 3), "BEGIN frame of"),
    ],
)
def test_bad_prefix_is_rejected_before_any_payload(frame: bytes, message: str) -> None:
    decoder = TransferDecoder(KVLimits())
    decoder.want()[:] = frame
    with pytest.raises(KVProtocolError, match=message):
        decoder.filled()


@pytest.mark.parametrize(
    ("payload", "message", "code"),
    [
        (header_payload(dtype=9), "unknown dtype", ErrorCode.PROTOCOL),
        (header_payload(heads=0), "num_kv_heads", ErrorCode.PROTOCOL),
        (header_payload(block_size=0), "block_size", ErrorCode.PROTOCOL),
        (header_payload(per_frame=0), "blocks_per_frame", ErrorCode.PROTOCOL),
        (header_payload(num_tokens=0), "num_tokens", ErrorCode.PROTOCOL),
        (header_payload(first_position=3), "first position", ErrorCode.PROTOCOL),
        (header_payload(rid=b"\xff\xfe"), "utf-8", ErrorCode.PROTOCOL),
        (header_payload()[:-1] + b"ab", "disagrees", ErrorCode.PROTOCOL),
        (header_payload(heads=1024, head_dim=1 << 30), "exceed", ErrorCode.LIMIT),
        (header_payload(num_layers=100_000), "layers exceed", ErrorCode.LIMIT),
    ],
)
def test_bad_header_is_rejected(payload: bytes, message: str, code: ErrorCode) -> None:
    decoder = TransferDecoder(KVLimits())
    frame = encode_frame(FrameType.BEGIN, payload)
    with pytest.raises(KVProtocolError, match=message) as caught:
        feed(decoder, frame)
    assert caught.value.code == code
    assert decoder.header is None


def begun_decoder() -> TransferDecoder:
    """A decoder that has read the BEGIN of tiny_transfer and has blocks to land in."""
    header, _, _ = tiny_transfer()
    decoder = TransferDecoder(KVLimits())
    assert feed(decoder, encode_header(header))[0] == [Begin(header)]
    return decoder


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (prefix(FrameType.BLOCKS, 1 << 60), "frame 0 of 1152921504606846976 bytes, the header says 512"),
        (prefix(FrameType.BLOCKS, 512, index=1), "frame 1 where frame 0"),
        (prefix(FrameType.END), "END after 0 of 6 frames"),
        (prefix(FrameType.BEGIN, 40), "BEGIN frame where BLOCKS"),
        (prefix(FrameType.OK), "OK frame where BLOCKS"),
    ],
)
def test_unexpected_frame_after_begin(frames: bytes, message: str) -> None:
    decoder = begun_decoder()
    with pytest.raises(KVProtocolError, match=message):
        feed(decoder, frames)


def test_frames_before_blocks_were_taken_are_a_usage_error() -> None:
    header, _, data = tiny_transfer()
    decoder = TransferDecoder(KVLimits())
    decoder.want()[:] = data[: PREFIX.size]
    decoder.filled()
    decoder.want()[:] = data[PREFIX.size : len(encode_header(header))]
    assert decoder.filled() == Begin(header)
    decoder.want()[:] = data[len(encode_header(header)) :][: PREFIX.size]
    with pytest.raises(RuntimeError, match="land_into"):
        decoder.filled()


def test_checksum_mismatch_in_a_frame() -> None:
    _, _, data = tiny_transfer()
    corrupt = bytearray(data)
    corrupt[-PREFIX.size - 5] ^= 0x01  # a byte of the last frame's payload
    with pytest.raises(KVProtocolError, match="frame 5 checksum mismatch") as caught:
        feed(TransferDecoder(KVLimits()), bytes(corrupt))
    assert caught.value.code == ErrorCode.CHECKSUM


def test_data_after_end_and_extra_frames_are_rejected() -> None:
    header, _, data = tiny_transfer()
    decoder = TransferDecoder(KVLimits())
    feed(decoder, data)
    assert decoder.done
    with pytest.raises(KVProtocolError, match="after END"):
        decoder.want()
    extra = encode_blocks_prefix(6, 2 * header.token_nbytes, 0)
    without_end = data[: -PREFIX.size]
    with pytest.raises(KVProtocolError, match="BLOCKS frame where END"):
        feed(TransferDecoder(KVLimits()), without_end + extra)


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


# Fuzzing: whatever arrives, the only exception is KVProtocolError.

SMALL_LIMITS = KVLimits(max_transfer_bytes=1 << 20, max_frame_bytes=1 << 18, max_layers=16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    header, _, stream = tiny_transfer()
    begin = encode_header(header)
    attempts = (
        data,
        MAGIC + bytes([VERSION]) + data,
        begin + data,
        stream[: len(begin) + PREFIX.size] + data,
    )
    for attempt in attempts:  # past the magic, past BEGIN, inside a frame
        with contextlib.suppress(KVProtocolError):
            feed(TransferDecoder(SMALL_LIMITS), attempt)
    for parser in (decode_prefix, decode_header, decode_error):
        with contextlib.suppress(KVProtocolError):
            parser(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_byte_corruption_is_detected(data: st.DataObject) -> None:
    _, _, stream = tiny_transfer(data.draw(st.sampled_from(DTYPES)))
    position = data.draw(st.integers(0, len(stream) - 1))
    flip = data.draw(st.integers(1, 255))
    corrupt = bytearray(stream)
    corrupt[position] ^= flip
    with pytest.raises(KVProtocolError):
        feed(TransferDecoder(SMALL_LIMITS), bytes(corrupt), fragmented=data.draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_stream_never_completes(data: st.DataObject) -> None:
    _, _, stream = tiny_transfer()
    cut = data.draw(st.integers(0, len(stream) - 1))
    decoder = TransferDecoder(SMALL_LIMITS)
    events, _ = feed(decoder, stream[:cut])
    assert not decoder.done and not any(isinstance(event, End) for event in events)


@pytest.mark.parametrize("size", [0, 100, 5000, 70_000, 3 << 20])
def test_checksum_is_zlib_crc32(size: int) -> None:
    """Whichever implementation is installed (zlib-ng or the stdlib), the wire value is zlib's CRC-32."""
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    view = data.numpy().data
    assert checksum(view) == zlib.crc32(view)
    assert checksum(view[size // 3 :], checksum(view[: size // 3])) == zlib.crc32(view)
