"""KV transfer over real sockets on 127.0.0.1: round trips, failures that stay contained, cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

import splitserve.transfer.tcp as kv_transfer
from splitserve.engine.kv_cache import KVLayout
from splitserve.transfer.base import KVTransferError
from splitserve.transfer.frames import (
    PREFIX,
    ErrorCode,
    FrameType,
    KVHeader,
    encode_frame,
    encode_header,
    runs_checksum,
)
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender
from tests.worker.transfer.caches import header_for, sequence, wire_bytes
from tests.worker.transfer.tcp_harness import (
    HEADER,
    LIMITS,
    Reply,
    Sink,
    assert_still_serves,
    blocks_frame,
    cache,
    raw_session,
    read_replies,
    send,
)

pytestmark = pytest.mark.timeout(60)


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
