"""KV transfer over real sockets on 127.0.0.1: round trips, failures that stay contained, cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

import splitserve.transfer.tcp as kv_transfer
from splitserve.engine.kv_cache import KVLayout, SequenceKV
from splitserve.transfer.base import KVDestination, KVRejected, KVTransferError, TransferStats
from splitserve.transfer.frames import (
    PREFIX,
    VERSION,
    ErrorCode,
    FrameType,
    KVHeader,
    KVLimits,
    checksum,
    decode_error,
    decode_prefix,
    encode_blocks_prefix,
    encode_frame,
    encode_header,
    runs_checksum,
)
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender
from tests.worker.transfer.caches import filled, header_for, layout_of, sequence, wire_bytes

pytestmark = pytest.mark.timeout(60)

LIMITS = KVLimits(max_transfer_bytes=256 << 20, max_frame_bytes=64 << 20, max_layers=64)
RECEIVER_BLOCK = 5  # the decode side's blocks, another size than the senders' 16


def cache(
    layers: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> SequenceKV:
    """A prefill worker's cache, in blocks of 16."""
    return filled(KVLayout(layers, heads, head_dim, dtype), tokens, 16, seed)


@dataclass
class Destination:
    """Blocks of the receiver's own pool (scattered, of RECEIVER_BLOCK tokens), as the decode worker
    takes them before ACCEPT; what landed is read back at commit, and the blocks are given back either way."""

    header: KVHeader
    kv: SequenceKV
    on_runs: Callable[[int], None] | None = None
    received: list[bytes] = field(default_factory=list)
    committed: bool = False
    aborted: str | None = None

    def runs(self, layer: int, begin: int, end: int) -> list[memoryview]:
        if self.on_runs is not None:
            self.on_runs(layer)
        return self.kv.runs(layer, begin, end)

    def commit(self) -> None:
        self.received = wire_bytes(self.kv, self.header.num_tokens)
        self.committed = True
        self.kv.release()

    def abort(self, reason: str) -> None:
        self.aborted = reason
        self.kv.release()

    @property
    def leaked_blocks(self) -> int:
        return self.kv.pool.allocator.num_used


class Sink:
    """Records every destination; `gate` (when set) makes open() wait, `reject` refuses."""

    def __init__(self) -> None:
        self.destinations: dict[str, Destination] = {}
        self.opens = 0
        self.gate: asyncio.Event | None = None
        self.open_cancelled = asyncio.Event()
        self.reject: str | None = None
        self.on_runs: Callable[[int], None] | None = None

    async def open(self, header: KVHeader) -> KVDestination:
        self.opens += 1
        if self.reject is not None:
            raise KVRejected(self.reject)
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.open_cancelled.set()
                raise
        kv = sequence(layout_of(header), header.num_tokens, RECEIVER_BLOCK, fragmented=True)
        destination = Destination(header, kv, self.on_runs)
        self.destinations[header.request_id] = destination
        return destination

    async def wait_opened(self, request_id: str) -> Destination:
        for _ in range(500):
            if request_id in self.destinations:
                return self.destinations[request_id]
            await asyncio.sleep(0.01)
        raise AssertionError(f"{request_id} never opened")

    async def wait_ended(self, request_id: str) -> Destination:
        """The destination once it was committed or aborted (the receiver may lag the sender)."""
        for _ in range(500):
            destination = self.destinations.get(request_id)
            if destination is not None and (destination.committed or destination.aborted):
                return destination
            await asyncio.sleep(0.01)
        raise AssertionError(f"{request_id} neither committed nor aborted")


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    # Every transfer ended (the receivers are closed by now), and none kept a block it took.
    assert {rid: d.leaked_blocks for rid, d in sink.destinations.items()} == dict.fromkeys(
        sink.destinations, 0
    )


@pytest.fixture
async def receiver(sink: Sink) -> AsyncIterator[TcpKVReceiver]:
    server = TcpKVReceiver("127.0.0.1", 0, sink, LIMITS, idle_timeout=5.0, linger_seconds=2.0)
    await server.start()
    yield server
    await server.close()


def target(receiver: TcpKVReceiver) -> str:
    return f"127.0.0.1:{receiver.port}"


async def send(
    receiver: TcpKVReceiver, request_id: str, kv: SequenceKV, sender: TcpKVSender | None = None
) -> TransferStats:
    return await (sender or TcpKVSender()).send(target(receiver), header_for(request_id, kv), kv)


async def assert_still_serves(receiver: TcpKVReceiver, sink: Sink) -> None:
    kv = cache(2, 2, 9, 8, seed=99)
    request_id = f"after-{len(sink.destinations)}"
    await send(receiver, request_id, kv)
    destination = sink.destinations[request_id]
    assert destination.committed and destination.aborted is None
    assert destination.received == wire_bytes(kv, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("layers", "heads", "tokens", "head_dim"),
    [(4, 4, 4000, 32), (1, 1, 1, 1), (3, 3, 77, 5), (2, 2, 32, 8), (2, 2, 33, 8)],
)
async def test_round_trip_is_bit_exact(
    receiver: TcpKVReceiver,
    sink: Sink,
    dtype: torch.dtype,
    layers: int,
    heads: int,
    tokens: int,
    head_dim: int,
) -> None:
    kv = cache(layers, heads, tokens, head_dim, dtype)
    stats = await send(receiver, "req-1", kv)
    destination = await sink.wait_ended("req-1")
    assert destination.committed and destination.aborted is None
    shape = (layers, heads, head_dim, dtype)
    assert destination.header == KVHeader.for_blocks("req-1", 11, tokens, shape, 16)
    assert destination.received == wire_bytes(kv, tokens)
    assert stats.bytes == layers * 2 * heads * tokens * head_dim * dtype.itemsize
    assert stats.seconds >= stats.accept_seconds > 0


async def test_a_paced_receiver_lands_the_same_bytes(sink: Sink) -> None:
    """With landing held to a twentieth of the loop thread, frames still land whole and in order."""
    receiver = TcpKVReceiver("127.0.0.1", 0, sink, LIMITS, landing_share=0.05)
    await receiver.start()
    try:
        kv = cache(4, 4, 4000, 32)
        await send(receiver, "paced", kv)
        assert sink.destinations["paced"].received == wire_bytes(kv, 4000)
    finally:
        await receiver.close()
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="landing_share must be in"):
            TcpKVReceiver("127.0.0.1", 0, sink, LIMITS, landing_share=share)


async def test_many_concurrent_transfers(receiver: TcpKVReceiver, sink: Sink) -> None:
    transfers = {f"req-{i}": cache(4, 4, 50 + 37 * i, 32, seed=i) for i in range(16)}
    sender = TcpKVSender()
    await asyncio.gather(*(send(receiver, rid, kv, sender) for rid, kv in transfers.items()))
    for rid, kv in transfers.items():
        destination = sink.destinations[rid]
        assert destination.committed
        assert destination.received == wire_bytes(kv, kv.length)


async def test_checksum_corruption_aborts_and_tells_the_sender(
    receiver: TcpKVReceiver, sink: Sink, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kv_transfer, "runs_checksum", lambda runs: runs_checksum(runs) ^ 1)
    with (
        caplog.at_level(logging.WARNING, logger="splitserve.transfer.tcp"),
        pytest.raises(KVTransferError, match="frame 0 checksum mismatch") as caught,
    ):
        await send(receiver, "corrupt", cache(4, 4, 500, 32))
    assert caught.value.code == ErrorCode.CHECKSUM
    assert (await sink.wait_ended("corrupt")).aborted == "frame 0 checksum mismatch"
    receive_logs = [r for r in caplog.records if "kv receive failed" in r.getMessage()]
    assert len(receive_logs) == 1 and "request_id=corrupt" in receive_logs[0].getMessage()
    monkeypatch.undo()
    await assert_still_serves(receiver, sink)


async def test_rejection_reaches_the_sender(receiver: TcpKVReceiver, sink: Sink) -> None:
    sink.reject = "unknown request id"
    with pytest.raises(KVTransferError, match="unknown request id") as caught:
        await send(receiver, "nobody", cache(2, 1, 3, 4))
    assert caught.value.code == ErrorCode.REJECTED and caught.value.reason == "unknown request id"
    sink.reject = None
    await assert_still_serves(receiver, sink)


async def test_over_the_limit_is_refused_before_the_sink(receiver: TcpKVReceiver, sink: Sink) -> None:
    with pytest.raises(KVTransferError, match="65 layers exceed the limit of 64") as caught:
        await send(receiver, "too-big", cache(65, 1, 4, 2))
    assert caught.value.code == ErrorCode.LIMIT and sink.opens == 0
    await assert_still_serves(receiver, sink)


# Hand-made streams: what a broken or hostile sender could write.


@dataclass
class Reply:
    type: FrameType
    code: ErrorCode | None = None
    reason: str = ""


async def read_replies(reader: asyncio.StreamReader) -> list[Reply]:
    """The receiver's replies, up to its last word (OK or ERROR) or until it closes."""
    replies = []
    while prefix_bytes := await reader.read(PREFIX.size):
        prefix_bytes += await reader.readexactly(PREFIX.size - len(prefix_bytes))
        prefix = decode_prefix(prefix_bytes)
        payload = await reader.readexactly(prefix.length)
        reply = Reply(prefix.type)
        if prefix.type == FrameType.ERROR:
            reply.code, reply.reason = decode_error(payload)
        replies.append(reply)
        if prefix.type in (FrameType.OK, FrameType.ERROR):
            break
    return replies


async def raw_session(receiver: TcpKVReceiver, *parts: bytes, close_early: bool = False) -> list[Reply]:
    """Write `parts` on a fresh connection and return the receiver's replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    try:
        writer.write(b"".join(parts))
        await writer.drain()
        return [] if close_early else await read_replies(reader)
    finally:
        writer.close()


HEADER = KVHeader("raw", 5, 10, 2, torch.float16, 2, 8, 16, 1)  # a frame per layer, 640 bytes each


def blocks_frame(index: int, payload: bytes, crc: int | None = None) -> bytes:
    return encode_blocks_prefix(index, len(payload), checksum(payload) if crc is None else crc) + payload


def begin_payload_with(dtype: int | None = None, head_dim: int | None = None) -> bytes:
    """HEADER's BEGIN frame with one of its raw fields overwritten (offsets of the fixed struct)."""
    payload = bytearray(encode_header(HEADER)[PREFIX.size :])
    if dtype is not None:
        payload[2] = dtype
    if head_dim is not None:
        payload[24:28] = head_dim.to_bytes(4, "little")
    return encode_frame(FrameType.BEGIN, bytes(payload))


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


async def test_idle_sender_times_out(sink: Sink) -> None:
    receiver = TcpKVReceiver("127.0.0.1", 0, sink, LIMITS, idle_timeout=0.3)
    await receiver.start()
    try:
        replies = await raw_session(receiver, encode_header(HEADER), blocks_frame(0, bytes(640)))
        assert [r.type for r in replies] == [FrameType.ACCEPT, FrameType.ERROR]
        assert replies[1].code == ErrorCode.TIMEOUT
        assert (await sink.wait_ended("raw")).aborted == "no data from the sender for 0.3 s"
        await assert_still_serves(receiver, sink)
    finally:
        await receiver.close()


async def test_a_stuck_transfer_does_not_block_others(receiver: TcpKVReceiver, sink: Sink) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    writer.write(encode_header(HEADER) + blocks_frame(0, bytes(640))[:100])
    await writer.drain()
    await assert_still_serves(receiver, sink)
    writer.close()
    assert (await sink.wait_ended("raw")).aborted is not None


async def test_failing_destination_is_contained(receiver: TcpKVReceiver, sink: Sink) -> None:
    def explode(index: int) -> None:
        if index == 1:
            raise RuntimeError("cache slot vanished")

    sink.on_runs = explode
    with pytest.raises(KVTransferError, match="RuntimeError: cache slot vanished") as caught:
        await send(receiver, "boom", cache(3, 2, 30, 8))
    assert caught.value.code == ErrorCode.INTERNAL
    assert (await sink.wait_ended("boom")).aborted == "RuntimeError: cache slot vanished"
    sink.on_runs = None
    await assert_still_serves(receiver, sink)


# Cancellation, back-pressure, shutdown.


async def test_sender_cancelled_mid_stream_aborts(receiver: TcpKVReceiver, sink: Sink) -> None:
    first_frame = asyncio.Event()
    sink.on_runs = lambda layer: first_frame.set()
    task = asyncio.create_task(send(receiver, "gone", cache(8, 8, 4000, 32)))  # 66 MB
    await first_frame.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    destination = await sink.wait_ended("gone")
    assert not destination.committed
    assert destination.aborted == "the sender closed the connection mid-transfer"
    sink.on_runs = None
    await assert_still_serves(receiver, sink)


async def test_back_pressure_waits_and_cancelling_it_cancels_the_open(
    receiver: TcpKVReceiver, sink: Sink
) -> None:
    sink.gate = asyncio.Event()
    waiting = asyncio.create_task(send(receiver, "waits", cache(2, 2, 10, 8)))
    await asyncio.sleep(0.2)
    assert not waiting.done() and sink.opens == 1
    sink.gate.set()
    stats = await waiting
    assert stats.accept_seconds >= 0.2 and sink.destinations["waits"].committed

    sink.gate = asyncio.Event()
    cancelled = asyncio.create_task(send(receiver, "gives-up", cache(2, 2, 10, 8)))
    await asyncio.sleep(0.2)
    cancelled.cancel()
    await asyncio.wait_for(sink.open_cancelled.wait(), 5)
    assert "gives-up" not in sink.destinations
    sink.gate = None
    await assert_still_serves(receiver, sink)


async def test_close_aborts_transfers_in_flight(sink: Sink) -> None:
    receiver = TcpKVReceiver("127.0.0.1", 0, sink, LIMITS)
    await receiver.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    writer.write(encode_header(HEADER))
    await writer.drain()
    await sink.wait_opened("raw")
    await receiver.close()
    assert sink.destinations["raw"].aborted == "receiver closing"
    assert await read_replies(reader) == [
        Reply(FrameType.ACCEPT),
        Reply(FrameType.ERROR, ErrorCode.SHUTDOWN, "receiver closing"),
    ]
    writer.close()


async def test_sender_errors_without_a_receiver() -> None:
    silent: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: silent.append(w), "127.0.0.1", 0)  # never answers
    port = server.sockets[0].getsockname()[1]
    kv = cache(1, 1, 2, 2)
    header = header_for("lonely", kv)
    with pytest.raises(KVTransferError) as caught:
        await TcpKVSender(idle_timeout=0.3).send(f"127.0.0.1:{port}", header, kv)
    assert caught.value.code == ErrorCode.TIMEOUT
    for writer in silent:
        writer.close()
    server.close()
    await server.wait_closed()
    with pytest.raises(KVTransferError) as caught:
        await TcpKVSender().send(f"127.0.0.1:{port}", header, kv)
    assert caught.value.code == ErrorCode.UNAVAILABLE
    with pytest.raises(ValueError, match="not host:port"):
        await TcpKVSender().send("nowhere", header, kv)
    with pytest.raises(ValueError, match=r"tokens 0\.\.16 are not in the 16 slots held"):
        await TcpKVSender().send(f"127.0.0.1:{port}", header_for("more", cache(1, 1, 17, 2)), kv)


async def test_a_receiver_that_says_ok_too_early_is_not_believed() -> None:
    done, handled = asyncio.Event(), asyncio.Event()

    async def premature(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(PREFIX.size)
        writer.write(encode_frame(FrameType.ACCEPT) + encode_frame(FrameType.OK))  # and reads no frame
        await writer.drain()
        await done.wait()
        writer.close()
        handled.set()

    server = await asyncio.start_server(premature, "127.0.0.1", 0)
    kv = sequence(KVLayout(2, 32, 32, torch.float32), 4000, 16)  # 66 MB: more than the socket buffers hold
    kv.length = 4000
    header = header_for("raw", kv)
    try:
        with pytest.raises(KVTransferError, match="OK reply where ERROR was expected") as caught:
            await TcpKVSender().send(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", header, kv)
        assert caught.value.code == ErrorCode.PROTOCOL
    finally:
        done.set()
        await handled.wait()
        server.close()
        await server.wait_closed()
