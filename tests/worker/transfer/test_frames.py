"""The KV wire codec without sockets: round trips, every rejection, and fuzzing of the decoder."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.transfer.frames import (
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_REASON_BYTES,
    PREFIX,
    VERSION,
    Begin,
    End,
    ErrorCode,
    Event,
    FrameType,
    KVHeader,
    KVLimits,
    KVProtocolError,
    Layer,
    TransferDecoder,
    check_payload,
    check_reply_prefix,
    checksum,
    decode_error,
    decode_header,
    decode_prefix,
    encode_error,
    encode_frame,
    encode_header,
    encode_layer_prefix,
    layer_payloads,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_layers(
    num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(num_layers)]


def encode_transfer(header: KVHeader, layers: list[torch.Tensor]) -> bytes:
    """Everything a sender writes, as one byte string."""
    parts = [encode_header(header)]
    for index, payload in enumerate(layer_payloads(header, layers)):
        parts += [encode_layer_prefix(index, len(payload), checksum(payload)), bytes(payload)]
    parts.append(encode_frame(FrameType.END))
    return b"".join(parts)


def feed(decoder: TransferDecoder, data: bytes) -> list[Event]:
    """Run `data` through the decoder; stops quietly when the data runs out (a truncated stream)."""
    events: list[Event] = []
    position = 0
    while not decoder.done:
        view = decoder.want()
        if position + len(view) > len(data):
            break
        view[:] = data[position : position + len(view)]
        position += len(view)
        event = decoder.filled()
        if isinstance(event, Layer):
            event = Layer(event.index, event.kv.clone())  # the decoder reuses the buffer
        if event is not None:
            events.append(event)
    return events


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def tiny_transfer(dtype: torch.dtype = torch.float32) -> tuple[KVHeader, list[torch.Tensor], bytes]:
    layers = make_layers(3, (2, 2, 5, 4), dtype)
    header = KVHeader.describe("req-1", 42, layers)
    return header, layers, encode_transfer(header, layers)


def header_payload(
    rid: bytes = b"r",
    dtype: int = 1,
    dims: tuple[int, ...] = (2, 1, 3, 4),
    num_layers: int = 2,
    num_tokens: int = 3,
    ndim: int | None = None,
) -> bytes:
    fixed = struct.pack(
        "<HBBIIQ", len(rid), dtype, len(dims) if ndim is None else ndim, num_layers, 0, num_tokens
    )
    return fixed + rid + struct.pack(f"<{len(dims)}Q", *dims)


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


SHAPES = [(1, (2, 1, 1, 1)), (4, (2, 4, 17, 32)), (2, (2, 3, 70, 5))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_layers", "shape"), SHAPES)
@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_round_trip_is_bit_exact(
    dtype: torch.dtype, num_layers: int, shape: tuple[int, ...], chunk_bytes: int
) -> None:
    layers = make_layers(num_layers, shape, dtype)
    header = KVHeader.describe("req-é", 7, layers)
    events = feed(TransferDecoder(KVLimits(), chunk_bytes), encode_transfer(header, layers))
    assert events[0] == Begin(header)
    assert isinstance(events[-1], End)
    received = [event for event in events if isinstance(event, Layer)]
    assert [layer.index for layer in received] == list(range(num_layers))
    for sent, got in zip(layers, received, strict=True):
        assert got.kv.dtype == dtype and tuple(got.kv.shape) == shape
        assert torch.equal(bits(sent), bits(got.kv))


def test_header_round_trip_and_sizes() -> None:
    header = KVHeader("x" * 128, 2**32 - 1, 4000, 80, torch.bfloat16, (2, 8, 4000, 128))
    frame = encode_header(header)
    parsed = decode_prefix(frame[: PREFIX.size])
    check_payload(parsed, frame[PREFIX.size :])
    assert decode_header(frame[PREFIX.size :]) == header
    assert header.layer_nbytes == 2 * 8 * 4000 * 128 * 2
    assert header.total_nbytes == 80 * header.layer_nbytes
    assert len(frame) - PREFIX.size <= MAX_HEADER_BYTES


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"request_id": ""}, "request id"),
        ({"request_id": "é" * 65}, "request id"),
        ({"first_token": -1}, "first token"),
        ({"num_layers": 0}, "num_layers"),
        ({"dtype": torch.int8}, "dtype"),
        ({"layer_shape": (2, 4, 10, 32, 1)}, "layer shape"),
        ({"layer_shape": (3, 4, 10, 32)}, "layer shape"),
        ({"layer_shape": (2, 4, 11, 32)}, "layer shape"),
        ({"layer_shape": [2, 4, 10, 32]}, "layer shape"),
    ],
)
def test_header_validation(fields: dict[str, object], message: str) -> None:
    valid: dict[str, object] = {
        "request_id": "r",
        "first_token": 1,
        "num_tokens": 10,
        "num_layers": 2,
        "dtype": torch.float16,
        "layer_shape": (2, 4, 10, 32),
    }
    with pytest.raises(KVProtocolError, match=message):
        KVHeader(**(valid | fields))  # type: ignore[arg-type]


def test_limits() -> None:
    header = KVHeader("r", 0, 1000, 10, torch.float32, (2, 8, 1000, 128))  # 8 MB per layer
    KVLimits(
        max_transfer_bytes=header.total_nbytes, max_frame_bytes=header.layer_nbytes, max_layers=10
    ).check(header)
    for limits in (
        KVLimits(max_transfer_bytes=header.total_nbytes - 1),
        KVLimits(max_frame_bytes=header.layer_nbytes - 1),
        KVLimits(max_layers=9),
    ):
        with pytest.raises(KVProtocolError) as caught:
            limits.check(header)
        assert caught.value.code == ErrorCode.LIMIT


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (prefix(magic=b"HTTP"), "bad magic"),
        (prefix(version=2), "version 2"),
        (prefix(kind=99), "unknown frame type"),
        (prefix(flags=1), "flags"),
        (prefix(FrameType.LAYER, 8), "LAYER frame before BEGIN"),
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
        (header_payload(dims=(2, 1, 3, 4, 1, 1, 1, 1, 1)), "9 dims exceed", ErrorCode.PROTOCOL),
        (header_payload(dims=(2, 1, 3, 4, 1)), "layer shape", ErrorCode.PROTOCOL),
        (header_payload(num_tokens=4), "layer shape", ErrorCode.PROTOCOL),
        (header_payload(dims=(2, 1, 3, 0)), "positive", ErrorCode.PROTOCOL),
        (header_payload(rid=b"\xff\xfe"), "utf-8", ErrorCode.PROTOCOL),
        (header_payload(ndim=3), "disagrees", ErrorCode.PROTOCOL),
        (header_payload(dims=(2, 1024, 3, 1 << 40)), "exceed", ErrorCode.LIMIT),
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
    """A decoder that has read the BEGIN of a 3-layer transfer."""
    header, _, _ = tiny_transfer()
    decoder = TransferDecoder(KVLimits())
    assert feed(decoder, encode_header(header)) == [Begin(header)]
    return decoder


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (prefix(FrameType.LAYER, 1 << 60), "layer 0 of 1152921504606846976 bytes"),
        (prefix(FrameType.LAYER, 160, index=1), "layer 1 where layer 0"),
        (prefix(FrameType.END), "END after 0 of 3 layers"),
        (prefix(FrameType.BEGIN, 40), "BEGIN frame where LAYER"),
        (prefix(FrameType.OK), "OK frame where LAYER"),
    ],
)
def test_unexpected_frame_after_begin(frames: bytes, message: str) -> None:
    decoder = begun_decoder()
    with pytest.raises(KVProtocolError, match=message):
        feed(decoder, frames)


def test_checksum_mismatch_in_a_layer() -> None:
    _, _, data = tiny_transfer()
    corrupt = bytearray(data)
    corrupt[-PREFIX.size - 5] ^= 0x01  # a byte of the last layer's payload
    with pytest.raises(KVProtocolError, match="layer 2 checksum mismatch") as caught:
        feed(TransferDecoder(KVLimits()), bytes(corrupt))
    assert caught.value.code == ErrorCode.CHECKSUM


def test_data_after_end_and_extra_layers_are_rejected() -> None:
    _, _, data = tiny_transfer()
    decoder = TransferDecoder(KVLimits())
    feed(decoder, data)
    assert decoder.done
    with pytest.raises(KVProtocolError, match="after END"):
        decoder.want()
    header, _, _ = tiny_transfer()
    extra = encode_layer_prefix(3, header.layer_nbytes, 0)
    without_end = data[: -PREFIX.size]
    with pytest.raises(KVProtocolError, match="LAYER frame where END"):
        feed(TransferDecoder(KVLimits()), without_end + extra)


def test_sender_side_checks() -> None:
    header, layers, _ = tiny_transfer(torch.float16)
    with pytest.raises(KVProtocolError, match="2 layers, the header says 3"):
        layer_payloads(header, layers[:2])
    with pytest.raises(KVProtocolError, match="layer 1 is not"):
        layer_payloads(header, [layers[0], layers[1].float(), layers[2]])
    strided = torch.randn(2, 2, 4, 5).to(torch.float16).transpose(2, 3)  # [2, 2, 5, 4], not contiguous
    header = KVHeader.describe("s", 0, [strided])
    assert bytes(layer_payloads(header, [strided])[0]) == bytes(bits(strided).numpy())


def test_payload_views_share_memory() -> None:
    layers = make_layers(2, (2, 2, 4, 4), torch.bfloat16)
    views = layer_payloads(KVHeader.describe("x", 0, layers), layers)
    layers[0][0, 0, 0, 0] = 5.0
    assert bytes(views[0]) == bytes(bits(layers[0]).numpy())


def test_error_frames() -> None:
    frame = encode_error(ErrorCode.REJECTED, "no room " + "é" * MAX_REASON_BYTES)
    parsed = decode_prefix(frame[: PREFIX.size])
    check_reply_prefix(parsed)
    check_payload(parsed, frame[PREFIX.size :])
    code, reason = decode_error(frame[PREFIX.size :])
    assert code == ErrorCode.REJECTED and reason.startswith("no room é")
    assert len(reason.encode()) <= MAX_REASON_BYTES
    for reply in (prefix(FrameType.ERROR, 1 << 40), prefix(FrameType.OK, 1), prefix(FrameType.LAYER)):
        with pytest.raises(KVProtocolError):
            check_reply_prefix(decode_prefix(reply))
    with pytest.raises(KVProtocolError, match="unknown error code"):
        decode_error(struct.pack("<H", 999))


# Fuzzing: whatever arrives, the only exception is KVProtocolError.

SMALL_LIMITS = KVLimits(max_transfer_bytes=1 << 20, max_frame_bytes=1 << 18, max_layers=16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    for attempt in (data, MAGIC + bytes([VERSION]) + data):  # the second gets past the magic
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
        feed(TransferDecoder(SMALL_LIMITS), bytes(corrupt))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_stream_never_completes(data: st.DataObject) -> None:
    _, _, stream = tiny_transfer()
    cut = data.draw(st.integers(0, len(stream) - 1))
    decoder = TransferDecoder(SMALL_LIMITS)
    events = feed(decoder, stream[:cut])
    assert not decoder.done and not any(isinstance(event, End) for event in events)


@pytest.mark.parametrize("size", [0, 100, 5000, 70_000, 3 << 20])
def test_checksum_is_zlib_crc32(size: int) -> None:
    """Whichever implementation is installed (zlib-ng or the stdlib), the wire value is zlib's CRC-32."""
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    view = data.numpy().data
    assert checksum(view) == zlib.crc32(view)
    assert checksum(view[size // 3 :], checksum(view[: size // 3])) == zlib.crc32(view)
