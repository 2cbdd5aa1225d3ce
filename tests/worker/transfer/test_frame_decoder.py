"""The receiving state machine (transfer/frame_decoder.py): streams fed whole, fragmented and corrupted,
landing bit-exact or refused with a protocol error, never more."""

from __future__ import annotations

import contextlib
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.kv_cache import KVLayout, SequenceKV
from splitserve.transfer.frame_decoder import Begin, End, Event, TransferDecoder
from splitserve.transfer.frames import (
    MAGIC,
    PREFIX,
    VERSION,
    ErrorCode,
    FrameType,
    KVHeader,
    KVLimits,
    KVProtocolError,
    decode_error,
    decode_header,
    decode_prefix,
    encode_blocks_prefix,
    encode_frame,
    encode_header,
)
from tests.worker.transfer.caches import filled, layout_of, sequence, wire_bytes
from tests.worker.transfer.wire import encode_transfer, prefix, shape, tiny_transfer

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


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
