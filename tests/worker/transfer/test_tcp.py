"""KV transfer over real sockets on 127.0.0.1: round trips, failures that stay contained, cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import torch

import splitserve.transfer.tcp as kv_transfer
from splitserve.transfer.base import KVDestination, KVRejected, KVTransferError, TransferStats
from splitserve.transfer.frames import (
    PREFIX,
    ErrorCode,
    FrameType,
    KVHeader,
    KVLimits,
    checksum,
    decode_error,
    decode_prefix,
    encode_frame,
    encode_header,
    encode_layer_prefix,
)
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender

pytestmark = pytest.mark.timeout(60)

LIMITS = KVLimits(max_transfer_bytes=256 << 20, max_frame_bytes=64 << 20, max_layers=64)


def make_layers(
    num_layers: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(num_layers)]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@dataclass
class Destination:
    header: KVHeader
    on_layer: Callable[[int], None] | None = None
    layers: list[torch.Tensor] = field(default_factory=list)
    committed: bool = False
    aborted: str | None = None

    def write_layer(self, index: int, kv: torch.Tensor) -> None:
        assert index == len(self.layers)
        if self.on_layer is not None:
            self.on_layer(index)
        self.layers.append(kv.clone())  # borrowed: copy

    def commit(self) -> None:
        self.committed = True

    def abort(self, reason: str) -> None:
        self.aborted = reason


class Sink:
    """Records every destination; `gate` (when set) makes open() wait, `reject` refuses."""

    def __init__(self) -> None:
        self.destinations: dict[str, Destination] = {}
        self.opens = 0
        self.gate: asyncio.Event | None = None
        self.open_cancelled = asyncio.Event()
        self.reject: str | None = None
        self.on_layer: Callable[[int], None] | None = None

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
        destination = Destination(header, self.on_layer)
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
def sink() -> Sink:
    return Sink()


@pytest.fixture
async def receiver(sink: Sink) -> AsyncIterator[TcpKVReceiver]:
    server = TcpKVReceiver("127.0.0.1", 0, sink, LIMITS, idle_timeout=5.0, linger_seconds=2.0)
    await server.start()
    yield server
    await server.close()


def target(receiver: TcpKVReceiver) -> str:
    return f"127.0.0.1:{receiver.port}"


async def send(
    receiver: TcpKVReceiver, request_id: str, layers: list[torch.Tensor], sender: TcpKVSender | None = None
) -> TransferStats:
    header = KVHeader.describe(request_id, 11, layers)
    return await (sender or TcpKVSender()).send(target(receiver), header, layers)


async def assert_still_serves(receiver: TcpKVReceiver, sink: Sink) -> None:
    layers = make_layers(2, (2, 2, 9, 8), seed=99)
    request_id = f"after-{len(sink.destinations)}"
    await send(receiver, request_id, layers)
    destination = sink.destinations[request_id]
    assert destination.committed and destination.aborted is None
    assert all(torch.equal(a, b) for a, b in zip(layers, destination.layers, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("num_layers", "shape"), [(4, (2, 4, 4000, 32)), (1, (2, 1, 1, 1)), (3, (2, 3, 77, 5))]
)
async def test_round_trip_is_bit_exact(
    receiver: TcpKVReceiver, sink: Sink, dtype: torch.dtype, num_layers: int, shape: tuple[int, ...]
) -> None:
    layers = make_layers(num_layers, shape, dtype)
    stats = await send(receiver, "req-1", layers)
    destination = await sink.wait_ended("req-1")
    assert destination.committed and destination.aborted is None
    assert destination.header == KVHeader("req-1", 11, shape[2], num_layers, dtype, shape)
    for sent, got in zip(layers, destination.layers, strict=True):
        assert torch.equal(bits(sent), bits(got))
    assert stats.bytes == num_layers * layers[0].numel() * layers[0].element_size()
    assert stats.seconds >= stats.accept_seconds > 0


async def test_many_concurrent_transfers(receiver: TcpKVReceiver, sink: Sink) -> None:
    transfers = {f"req-{i}": make_layers(4, (2, 4, 50 + 37 * i, 32), seed=i) for i in range(16)}
    sender = TcpKVSender()
    await asyncio.gather(*(send(receiver, rid, layers, sender) for rid, layers in transfers.items()))
    for rid, layers in transfers.items():
        destination = sink.destinations[rid]
        assert destination.committed
        assert all(torch.equal(a, b) for a, b in zip(layers, destination.layers, strict=True))


async def test_checksum_corruption_aborts_and_tells_the_sender(
    receiver: TcpKVReceiver, sink: Sink, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kv_transfer, "layer_checksum", lambda data, value=0: checksum(data, value) ^ 1)
    with (
        caplog.at_level(logging.WARNING, logger="splitserve.transfer.tcp"),
        pytest.raises(KVTransferError, match="layer 0 checksum mismatch") as caught,
    ):
        await send(receiver, "corrupt", make_layers(4, (2, 4, 500, 32)))
    assert caught.value.code == ErrorCode.CHECKSUM
    assert (await sink.wait_ended("corrupt")).aborted == "layer 0 checksum mismatch"
    receive_logs = [r for r in caplog.records if "kv receive failed" in r.getMessage()]
    assert len(receive_logs) == 1 and "request_id=corrupt" in receive_logs[0].getMessage()
    monkeypatch.undo()
    await assert_still_serves(receiver, sink)


async def test_rejection_reaches_the_sender(receiver: TcpKVReceiver, sink: Sink) -> None:
    sink.reject = "unknown request id"
    with pytest.raises(KVTransferError, match="unknown request id") as caught:
        await send(receiver, "nobody", make_layers(2, (2, 1, 3, 4)))
    assert caught.value.code == ErrorCode.REJECTED and caught.value.reason == "unknown request id"
    sink.reject = None
    await assert_still_serves(receiver, sink)


async def test_over_the_limit_is_refused_before_the_sink(receiver: TcpKVReceiver, sink: Sink) -> None:
    layers = [torch.zeros(2, 8, 64, 1024)] * 65  # 65 layers > max_layers
    with pytest.raises(KVTransferError, match="65 layers exceed the limit of 64") as caught:
        await send(receiver, "too-big", layers)
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


HEADER = KVHeader("raw", 5, 10, 2, torch.float16, (2, 2, 10, 8))  # 640-byte layers


def layer_frame(index: int, payload: bytes, crc: int | None = None) -> bytes:
    return encode_layer_prefix(index, len(payload), checksum(payload) if crc is None else crc) + payload


def begin_payload_with(**fields: int) -> bytes:
    """HEADER's BEGIN frame with some of its raw fields overwritten (offsets of the fixed struct)."""
    offsets = {"dtype": 2, "ndim": 3}
    payload = bytearray(encode_header(HEADER)[PREFIX.size :])
    for name, value in fields.items():
        payload[offsets[name]] = value
    return encode_frame(FrameType.BEGIN, bytes(payload))


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic", id="bad-magic"),
        pytest.param(b"SSKV\x02" + bytes(19), "protocol version 2", id="wrong-version"),
        pytest.param(
            PREFIX.pack(b"SSKV", 1, FrameType.BEGIN, 0, 0, 0, 1 << 62),
            "BEGIN frame of 4611686018427387904 bytes",
            id="oversized-header",
        ),
        pytest.param(begin_payload_with(dtype=200), "unknown dtype code 200", id="unknown-dtype"),
        pytest.param(begin_payload_with(ndim=200), "200 dims exceed the limit of 8", id="too-many-dims"),
        pytest.param(encode_header(HEADER)[:-8] + b"\x00" * 8, "checksum mismatch", id="header-checksum"),
        pytest.param(
            encode_frame(
                FrameType.BEGIN,
                encode_header(HEADER)[PREFIX.size : -16]
                + (11).to_bytes(8, "little")
                + (8).to_bytes(8, "little"),
            ),
            "is not [2, H_kv, T=10, D]",
            id="shape-vs-num-tokens",
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


async def test_oversized_layer_length_is_rejected_without_allocating(
    receiver: TcpKVReceiver, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocations: list[int] = []
    empty = torch.empty

    def recording_empty(*size: int, **kwargs: object) -> torch.Tensor:
        allocations.append(size[0])
        return empty(*size, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(torch, "empty", recording_empty)
    forged = PREFIX.pack(b"SSKV", 1, FrameType.LAYER, 0, 0, 0, 1 << 50)
    replies = await raw_session(receiver, encode_header(HEADER), forged)
    assert [r.type for r in replies] == [FrameType.ACCEPT, FrameType.ERROR]
    assert "layer 0 of 1125899906842624 bytes, the header says 640" in replies[1].reason
    assert allocations == []
    assert (await sink.wait_ended("raw")).aborted is not None
    monkeypatch.undo()
    await assert_still_serves(receiver, sink)


@pytest.mark.parametrize(
    ("frames", "reason", "code"),
    [
        pytest.param(
            [layer_frame(0, bytes(640), crc=1)],
            "layer 0 checksum mismatch",
            ErrorCode.CHECKSUM,
            id="checksum",
        ),
        pytest.param(
            [layer_frame(1, bytes(640))],
            "layer 1 where layer 0 was expected",
            ErrorCode.PROTOCOL,
            id="out-of-order",
        ),
        pytest.param(
            [layer_frame(0, bytes(640)), encode_frame(FrameType.END)],
            "END after 1 of 2 layers",
            ErrorCode.PROTOCOL,
            id="early-end",
        ),
        pytest.param(
            [layer_frame(0, bytes(64))], "layer 0 of 64 bytes", ErrorCode.PROTOCOL, id="short-layer"
        ),
    ],
)
async def test_bad_layer_frames_abort_the_destination(
    receiver: TcpKVReceiver, sink: Sink, frames: list[bytes], reason: str, code: ErrorCode
) -> None:
    replies = await raw_session(receiver, encode_header(HEADER), *frames)
    assert [r.type for r in replies] == [FrameType.ACCEPT, FrameType.ERROR]
    assert replies[1].code == code and reason in replies[1].reason
    destination = await sink.wait_ended("raw")
    assert not destination.committed and destination.aborted is not None and reason in destination.aborted
    await assert_still_serves(receiver, sink)


async def test_truncated_stream_aborts(receiver: TcpKVReceiver, sink: Sink) -> None:
    half_layer = layer_frame(0, bytes(640))[: PREFIX.size + 300]
    await raw_session(receiver, encode_header(HEADER), half_layer, close_early=True)
    destination = await sink.wait_ended("raw")
    assert destination.aborted == "the sender closed the connection mid-transfer"
    await assert_still_serves(receiver, sink)


async def test_idle_sender_times_out(sink: Sink) -> None:
    receiver = TcpKVReceiver("127.0.0.1", 0, sink, LIMITS, idle_timeout=0.3)
    await receiver.start()
    try:
        replies = await raw_session(receiver, encode_header(HEADER), layer_frame(0, bytes(640)))
        assert [r.type for r in replies] == [FrameType.ACCEPT, FrameType.ERROR]
        assert replies[1].code == ErrorCode.TIMEOUT
        assert (await sink.wait_ended("raw")).aborted == "no data from the sender for 0.3 s"
        await assert_still_serves(receiver, sink)
    finally:
        await receiver.close()


async def test_a_stuck_transfer_does_not_block_others(receiver: TcpKVReceiver, sink: Sink) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    writer.write(encode_header(HEADER) + layer_frame(0, bytes(640))[:100])
    await writer.drain()
    await assert_still_serves(receiver, sink)
    writer.close()
    assert (await sink.wait_ended("raw")).aborted is not None


async def test_failing_destination_is_contained(receiver: TcpKVReceiver, sink: Sink) -> None:
    def explode(index: int) -> None:
        if index == 1:
            raise RuntimeError("cache slot vanished")

    sink.on_layer = explode
    with pytest.raises(KVTransferError, match="RuntimeError: cache slot vanished") as caught:
        await send(receiver, "boom", make_layers(3, (2, 2, 30, 8)))
    assert caught.value.code == ErrorCode.INTERNAL
    assert (await sink.wait_ended("boom")).aborted == "RuntimeError: cache slot vanished"
    sink.on_layer = None
    await assert_still_serves(receiver, sink)


# Cancellation, back-pressure, shutdown.


async def test_sender_cancelled_mid_stream_aborts(receiver: TcpKVReceiver, sink: Sink) -> None:
    first_layer = asyncio.Event()
    sink.on_layer = lambda index: first_layer.set()
    task = asyncio.create_task(send(receiver, "gone", make_layers(32, (2, 8, 4000, 32))))  # 128 MB
    await first_layer.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    destination = await sink.wait_ended("gone")
    assert not destination.committed
    assert destination.aborted == "the sender closed the connection mid-transfer"
    sink.on_layer = None
    await assert_still_serves(receiver, sink)


async def test_back_pressure_waits_and_cancelling_it_cancels_the_open(
    receiver: TcpKVReceiver, sink: Sink
) -> None:
    sink.gate = asyncio.Event()
    waiting = asyncio.create_task(send(receiver, "waits", make_layers(2, (2, 2, 10, 8))))
    await asyncio.sleep(0.2)
    assert not waiting.done() and sink.opens == 1
    sink.gate.set()
    stats = await waiting
    assert stats.accept_seconds >= 0.2 and sink.destinations["waits"].committed

    sink.gate = asyncio.Event()
    cancelled = asyncio.create_task(send(receiver, "gives-up", make_layers(2, (2, 2, 10, 8))))
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
    layers = make_layers(1, (2, 1, 2, 2))
    header = KVHeader.describe("lonely", 0, layers)
    with pytest.raises(KVTransferError) as caught:
        await TcpKVSender(idle_timeout=0.3).send(f"127.0.0.1:{port}", header, layers)
    assert caught.value.code == ErrorCode.TIMEOUT
    for writer in silent:
        writer.close()
    server.close()
    await server.wait_closed()
    with pytest.raises(KVTransferError) as caught:
        await TcpKVSender().send(f"127.0.0.1:{port}", header, layers)
    assert caught.value.code == ErrorCode.UNAVAILABLE
    with pytest.raises(ValueError, match="not host:port"):
        await TcpKVSender().send("nowhere", header, layers)
    with pytest.raises(ValueError, match="the header says"):
        await TcpKVSender().send(f"127.0.0.1:{port}", header, layers * 2)


async def test_a_receiver_that_says_ok_too_early_is_not_believed() -> None:
    done, handled = asyncio.Event(), asyncio.Event()

    async def premature(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(PREFIX.size)
        writer.write(encode_frame(FrameType.ACCEPT) + encode_frame(FrameType.OK))  # and reads no layer
        await writer.drain()
        await done.wait()
        writer.close()
        handled.set()

    server = await asyncio.start_server(premature, "127.0.0.1", 0)
    layers = [torch.zeros(2, 64, 4000, 32)] * 2  # 64 MB: more than the socket buffers hold
    header = KVHeader.describe("raw", 5, layers)
    try:
        with pytest.raises(KVTransferError, match="OK reply where ERROR was expected") as caught:
            await TcpKVSender().send(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", header, layers)
        assert caught.value.code == ErrorCode.PROTOCOL
    finally:
        done.set()
        await handled.wait()
        server.close()
        await server.wait_closed()
