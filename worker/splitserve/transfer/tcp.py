"""The TCP KV transport: `KVSender` and `KVReceiver` (transfer/base.py) over one socket per transfer.

Prefill side: `await TcpKVSender().send("host:port", header, source)` sends each frame straight from the
source's blocks (one scatter-gather `sendmsg` per frame). Decode side: `TcpKVReceiver(host, port, sink)`
hands each arriving transfer to `sink.open(header)`, which takes blocks for it, and receives every frame
straight into them.

One TCP connection per transfer: a broken or hostile stream fails only its own transfer, and a closed
connection is the cancellation signal in both directions. The wire format lives in `frames`, the
socket I/O (zero-copy landing, scatter-gather sends) in `tcp_io`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from splitserve.transfer.base import (
    KVDestination,
    KVReceiver,
    KVRejected,
    KVSender,
    KVSink,
    KVTransferError,
    TransferStats,
)
from splitserve.transfer.frame_decoder import Begin, End, Event, TransferDecoder
from splitserve.transfer.frames import (
    PREFIX,
    BlockRuns,
    ErrorCode,
    FrameType,
    KVHeader,
    KVLimits,
    KVProtocolError,
    check_payload,
    check_reply_prefix,
    decode_error,
    decode_prefix,
    encode_blocks_prefix,
    encode_error,
    encode_frame,
    encode_header,
    frame_runs,
    runs_checksum,
)
from splitserve.transfer.tcp_io import PeerClosedError, ReceiveConnection, recv_exactly, sendmsg_all

logger = logging.getLogger(__name__)

PAUSE_QUANTUM = 1e-3  # the event loop's timers are as fine as epoll's, a millisecond


def _abort_when_opened(task: asyncio.Task[KVDestination], reason: str) -> None:
    """Cancel an open(); if it already produced a destination, abort that one."""

    def done(finished: asyncio.Task[KVDestination]) -> None:
        if not finished.cancelled() and finished.exception() is None:
            finished.result().abort(reason)

    task.cancel()
    task.add_done_callback(done)


class TcpKVReceiver(KVReceiver):
    """Serves KV transfers on host:port for the decode worker; runs on the worker's event loop.

    Per piece of payload (a run of one head's slots, at most CHUNK_BYTES) the loop does one recv straight
    into the destination's blocks and one crc32, so the decode thread and other connections keep running.
    `landing_share` bounds the share of this thread's CPU time that landing may take while it runs: after
    each piece the transfer pauses for what receiving and checksumming it cost (this thread's CPU time
    in those calls) times (1 / share - 1). The decode worker
    runs its engine on the same core, so a 16 MB cache landing flat out would stretch the few decode
    steps it overlaps (bench/kv_landing.py); paced, it costs each step a bounded slice and the new
    request's first token waits a few milliseconds longer.
    `idle_timeout` bounds the wait for each frame prefix and each chunk of payload.
    """

    def __init__(
        self,
        host: str,
        port: int,
        sink: KVSink,
        limits: KVLimits | None = None,
        *,
        idle_timeout: float = 30.0,
        linger_seconds: float = 5.0,
        landing_share: float = 1.0,
    ) -> None:
        if not 0 < landing_share <= 1:
            raise ValueError(f"landing_share must be in (0, 1], got {landing_share}")
        self._host, self._port = host, port
        self._sink = sink
        self._limits = limits or KVLimits()
        self._idle_timeout = idle_timeout
        self._linger_seconds = linger_seconds
        self._pause_per_busy_second = 1 / landing_share - 1
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ReceiveConnection(self._serve), self._host, self._port
        )
        self._port = self._server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        return self._port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _next(self, conn: ReceiveConnection, decoder: TransferDecoder) -> Event:
        debt = 0.0  # seconds of pause owed for the landing work done so far (paid once over 1 ms)
        while True:
            view = decoder.want()
            reading = conn.reading_seconds
            async with asyncio.timeout(self._idle_timeout):
                await conn.readinto(view)
            checking = time.thread_time()
            event = decoder.filled()
            if event is not None:
                return event
            busy = conn.reading_seconds - reading + time.thread_time() - checking  # recv + crc32
            debt += busy * self._pause_per_busy_second
            if debt >= PAUSE_QUANTUM:
                paused = time.perf_counter()
                await asyncio.sleep(debt)
                debt -= time.perf_counter() - paused

    async def _open(self, conn: ReceiveConnection, header: KVHeader) -> KVDestination:
        """sink.open(), given up when the sender goes away while it waits."""
        opening = asyncio.ensure_future(self._sink.open(header))
        try:
            either: list[asyncio.Future[Any]] = [opening, conn.closed]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            _abort_when_opened(opening, "receiver closing")
            raise
        if opening.done():
            return opening.result()
        _abort_when_opened(opening, "the sender went away")
        raise PeerClosedError("the sender went away while the sink was opening")

    async def _serve(self, conn: ReceiveConnection) -> None:
        task = cast("asyncio.Task[None]", asyncio.current_task())
        self._tasks.add(task)
        decoder = TransferDecoder(self._limits)
        destination: KVDestination | None = None
        request_id = "?"
        try:
            begin = await self._next(conn, decoder)
            assert isinstance(begin, Begin)  # the decoder's first event
            request_id = begin.header.request_id
            destination = await self._open(conn, begin.header)
            decoder.land_into(destination)
            conn.send(encode_frame(FrameType.ACCEPT))
            end = await self._next(conn, decoder)
            assert isinstance(end, End)  # the decoder's only event after Begin
            destination.commit()
            destination = None
            conn.send(encode_frame(FrameType.OK))
        except KVProtocolError as exc:
            await self._fail(conn, destination, request_id, exc.code, str(exc))
        except KVRejected as exc:
            await self._fail(conn, destination, request_id, ErrorCode.REJECTED, exc.reason)
        except TimeoutError:
            await self._fail(
                conn,
                destination,
                request_id,
                ErrorCode.TIMEOUT,
                f"no data from the sender for {self._idle_timeout} s",
            )
        except PeerClosedError as exc:
            await self._fail(conn, destination, request_id, ErrorCode.UNAVAILABLE, str(exc))
        except asyncio.CancelledError:
            await self._fail(conn, destination, request_id, ErrorCode.SHUTDOWN, "receiver closing")
            raise
        except Exception as exc:  # the sink or destination failed: this transfer only
            logger.debug("kv destination failed", exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
            await self._fail(conn, destination, request_id, ErrorCode.INTERNAL, reason)
        finally:
            self._tasks.discard(task)
            conn.transport.close()

    async def _fail(
        self,
        conn: ReceiveConnection,
        destination: KVDestination | None,
        request_id: str,
        code: ErrorCode,
        reason: str,
    ) -> None:
        logger.warning(
            "kv receive failed request_id=%s peer=%s code=%s reason=%s",
            request_id,
            conn.peer,
            code.name.lower(),
            reason,
        )
        if destination is not None:
            try:
                destination.abort(reason)
            except Exception:
                logger.exception("kv destination abort failed request_id=%s", request_id)
        if conn.closed.done() or conn.transport.is_closing():
            return
        conn.send(encode_error(code, reason))
        if code != ErrorCode.SHUTDOWN:
            await conn.linger(self._linger_seconds)


def parse_target(target: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port)."""
    host, _, port = target.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"KV target {target!r} is not host:port")
    return host, int(port)


@dataclass(frozen=True)
class _Reply:
    type: FrameType
    code: ErrorCode = ErrorCode.PROTOCOL
    reason: str = ""


class TcpKVSender(KVSender):
    """Sends one transfer per connection, each frame straight from the source's blocks (no copy): its
    prefix and its runs go out in one scatter-gather `sendmsg`.

    A reply that arrives mid-stream (the receiver's ERROR) stops the stream at once. `idle_timeout`
    bounds every wait on the receiver (each frame sent, each reply, the admission wait included), so
    make it longer than the decode worker's admission wait; None waits forever.
    """

    def __init__(self, *, connect_timeout: float = 10.0, idle_timeout: float | None = 120.0) -> None:
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    async def send(self, target: str, header: KVHeader, source: BlockRuns) -> TransferStats:
        payloads = [frame_runs(header, source, index) for index in range(header.num_frames)]
        host, port = parse_target(target)
        start = time.perf_counter()
        try:
            sock = await self._connect(host, port)
            try:
                accept_seconds = await self._transfer(sock, header, payloads, start)
            finally:
                sock.close()
        except KVTransferError as exc:
            error = exc
        except KVProtocolError as exc:
            error = KVTransferError(header.request_id, exc.code, f"bad reply from {target}: {exc}")
        except TimeoutError:
            error = KVTransferError(header.request_id, ErrorCode.TIMEOUT, f"{target} stopped responding")
        except OSError as exc:
            error = KVTransferError(header.request_id, ErrorCode.UNAVAILABLE, f"{target}: {exc}")
        else:
            return TransferStats(header.total_nbytes, time.perf_counter() - start, accept_seconds)
        logger.warning(
            "kv send failed request_id=%s target=%s code=%s reason=%s",
            header.request_id,
            target,
            error.code.name.lower(),
            error.reason,
        )
        raise error

    async def _connect(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            try:  # an IP literal needs no resolver thread (a millisecond on the 16 MB path)
                family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
                addresses: Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]
                addresses = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
            except ValueError:
                addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            error: OSError = OSError(f"no address for {host}")
            for family, kind, proto, _, address in addresses:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    sock.close()
                    error = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise error

    async def _transfer(
        self, sock: socket.socket, header: KVHeader, payloads: list[list[memoryview]], start: float
    ) -> float:
        """BEGIN, wait for ACCEPT, stream the frames and END, wait for OK; seconds until ACCEPT."""
        await self._send(sock, encode_header(header))
        async with asyncio.timeout(self._idle_timeout):
            self._expect(header, await self._reply(sock), FrameType.ACCEPT)
        accept_seconds = time.perf_counter() - start
        replying = asyncio.ensure_future(self._reply(sock))
        streaming = asyncio.ensure_future(self._stream(sock, payloads))
        try:
            await asyncio.wait([replying, streaming], return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done():  # the receiver spoke before END: only an ERROR may do that
                self._expect(header, replying.result(), FrameType.ERROR)
            try:
                streaming.result()
            except OSError:  # the receiver hung up: its ERROR may still be readable
                await asyncio.wait([replying], timeout=1.0)
                if not replying.done():
                    raise
            async with asyncio.timeout(self._idle_timeout):
                reply = await replying
        finally:
            for task in (replying, streaming):
                task.cancel()
            await asyncio.gather(replying, streaming, return_exceptions=True)  # off the socket before close
        self._expect(header, reply, FrameType.OK)
        return accept_seconds

    @staticmethod
    def _expect(header: KVHeader, reply: _Reply, wanted: FrameType) -> None:
        if reply.type == FrameType.ERROR:
            raise KVTransferError(header.request_id, reply.code, reply.reason)
        if reply.type != wanted:
            raise KVProtocolError(f"{reply.type.name} reply where {wanted.name} was expected")

    async def _send(self, sock: socket.socket, data: bytes | memoryview) -> None:
        async with asyncio.timeout(self._idle_timeout):
            await asyncio.get_running_loop().sock_sendall(sock, data)

    async def _stream(self, sock: socket.socket, payloads: list[list[memoryview]]) -> None:
        for index, runs in enumerate(payloads):
            prefix = encode_blocks_prefix(index, sum(len(run) for run in runs), runs_checksum(runs))
            async with asyncio.timeout(self._idle_timeout):
                await sendmsg_all(sock, [memoryview(prefix), *runs])
        await self._send(sock, encode_frame(FrameType.END))

    async def _reply(self, sock: socket.socket) -> _Reply:
        prefix = decode_prefix(await recv_exactly(sock, PREFIX.size))
        check_reply_prefix(prefix)
        payload = await recv_exactly(sock, prefix.length)
        check_payload(prefix, payload)
        if prefix.type != FrameType.ERROR:
            return _Reply(prefix.type)
        code, reason = decode_error(payload)
        return _Reply(prefix.type, code, reason)
