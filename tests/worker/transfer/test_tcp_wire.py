"""KV transfer over real sockets: malformed and truncated wire input, each refused before it lands and
contained to its own connection."""

from __future__ import annotations

import pytest

from splitserve.transfer.frames import (
    PREFIX,
    VERSION,
    ErrorCode,
    FrameType,
    encode_frame,
    encode_header,
)
from splitserve.transfer.tcp import TcpKVReceiver
from tests.worker.transfer.tcp_harness import (
    HEADER,
    Sink,
    assert_still_serves,
    begin_payload_with,
    blocks_frame,
    raw_session,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic", id="bad-magic"),
        pytest.param(
            b"SSKV\x01" + bytes(19),
            "KV frame version 1, this side speaks 3: both ends of a transfer must run the same",
            id="v1-peer",
        ),
        pytest.param(
            PREFIX.pack(b"SSKV", VERSION, FrameType.BEGIN, 0, 0, 0, 1 << 62),
            "BEGIN frame of 4611686018427387904 bytes",
            id="oversized-header",
        ),
        pytest.param(begin_payload_with(dtype=200), "unknown dtype code 200", id="unknown-dtype"),
        pytest.param(begin_payload_with(head_dim=0), "head_dim 0 is not a positive u32", id="zero-head-dim"),
        pytest.param(encode_header(HEADER)[:-2] + b"\x00" * 2, "checksum mismatch", id="header-checksum"),
        pytest.param(
            begin_payload_with(head_dim=1 << 30),
            "a frame of 85899345920 bytes exceeds the limit of 67108864",
            id="frame-over-the-limit",
        ),
    ],
)
async def test_bad_begin_is_rejected_before_the_sink(
    receiver: TcpKVReceiver, sink: Sink, stream: bytes, reason: str
) -> None:
    replies = await raw_session(receiver, stream)
    assert [r.type for r in replies] == [FrameType.ERROR]
    assert reason in replies[0].reason
    assert sink.opens == 0
    await assert_still_serves(receiver, sink)


async def test_oversized_frame_length_is_rejected_before_reading_it(
    receiver: TcpKVReceiver, sink: Sink
) -> None:
    forged = PREFIX.pack(b"SSKV", VERSION, FrameType.BLOCKS, 0, 0, 0, 1 << 50)
    replies = await raw_session(receiver, encode_header(HEADER), forged)
    assert [r.type for r in replies] == [FrameType.ACCEPT, FrameType.ERROR]
    assert "frame 0 of 1125899906842624 bytes, the header says 640" in replies[1].reason
    assert (await sink.wait_ended("raw")).aborted is not None
    await assert_still_serves(receiver, sink)


@pytest.mark.parametrize(
    ("frames", "reason", "code"),
    [
        pytest.param(
            [blocks_frame(0, bytes(640), crc=1)],
            "frame 0 checksum mismatch",
            ErrorCode.CHECKSUM,
            id="checksum",
        ),
        pytest.param(
            [blocks_frame(1, bytes(640))],
            "frame 1 where frame 0 was expected",
            ErrorCode.PROTOCOL,
            id="out-of-order",
        ),
        pytest.param(
            [blocks_frame(0, bytes(640)), encode_frame(FrameType.END)],
            "END after 1 of 2 frames",
            ErrorCode.PROTOCOL,
            id="early-end",
        ),
        pytest.param(
            [blocks_frame(0, bytes(64))], "frame 0 of 64 bytes", ErrorCode.PROTOCOL, id="short-frame"
        ),
    ],
)
async def test_bad_blocks_frames_abort_the_destination(
    receiver: TcpKVReceiver, sink: Sink, frames: list[bytes], reason: str, code: ErrorCode
) -> None:
    replies = await raw_session(receiver, encode_header(HEADER), *frames)
    assert [r.type for r in replies] == [FrameType.ACCEPT, FrameType.ERROR]
    assert replies[1].code == code and reason in replies[1].reason
    destination = await sink.wait_ended("raw")
    assert not destination.committed and destination.aborted is not None and reason in destination.aborted
    await assert_still_serves(receiver, sink)


async def test_truncated_stream_aborts(receiver: TcpKVReceiver, sink: Sink) -> None:
    half_frame = blocks_frame(0, bytes(640))[: PREFIX.size + 300]
    await raw_session(receiver, encode_header(HEADER), half_frame, close_early=True)
    destination = await sink.wait_ended("raw")
    assert destination.aborted == "the sender closed the connection mid-transfer"
    assert destination.leaked_blocks == 0
    await assert_still_serves(receiver, sink)
