"""The real-socket KV transfer tests' harness: caches to send, a recording sink, raw wire sessions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from splitserve.engine.kv_cache import KVLayout, SequenceKV
from splitserve.transfer.base import KVDestination, KVRejected, TransferStats
from splitserve.transfer.frames import (
    PREFIX,
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
)
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender
from tests.worker.transfer.caches import filled, header_for, layout_of, sequence, wire_bytes

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
