"""The socket I/O under the TCP KV transport (tcp.py): how bytes move, not what they mean.

Apart from the protocol so that each side's transfer logic reads as the exchange of frames it is.
Receiving: `ReceiveConnection`, an asyncio buffered protocol that lands big reads straight in the
destination's blocks and pauses reading when its small staging buffer is full. Sending: scatter-gather
`sendmsg` on a non-blocking socket (asyncio has none), and exact reads of the receiver's replies.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

STAGING_BYTES = 64 << 10  # per connection: small frames land here; reading pauses when it is full
DIRECT_BYTES = 16 << 10  # reads at least this big land straight in the caller's buffer
IOV_BATCH = 512  # buffers per sendmsg call (Linux takes up to 1024)


class PeerClosedError(Exception):
    """The sender closed the connection before the transfer ended."""


class ReceiveConnection(asyncio.BufferedProtocol):
    """One accepted socket. A pending big read receives straight into the caller's buffer (no copy);
    other bytes land in a small staging buffer, and reading pauses while it is full, so an unread sender
    waits on TCP instead of filling the receiver's memory."""

    def __init__(self, serve: Callable[[ReceiveConnection], Coroutine[Any, Any, None]]) -> None:
        self._serve = serve
        self._staging = bytearray(STAGING_BYTES)
        self._staged = memoryview(self._staging)
        self._head = self._tail = 0
        self._target: memoryview | None = None
        self._target_got = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = self._discarding = False
        self._read_started = 0.0
        self.reading_seconds = 0.0  # this thread's CPU time in recv calls: what landing costs, and paces
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = str(transport.get_extra_info("peername"))
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.task = loop.create_task(self._serve(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        self._read_started = time.thread_time()  # the loop calls recv_into on what this returns
        if self._target is not None:
            return self._target[self._target_got :]
        if self._head == self._tail:
            self._head = self._tail = 0
        elif self._tail == len(self._staging):
            self._staging[: self._tail - self._head] = self._staging[self._head : self._tail]
            self._head, self._tail = 0, self._tail - self._head
        return self._staged[self._tail :]

    def buffer_updated(self, nbytes: int) -> None:
        self.reading_seconds += time.thread_time() - self._read_started
        if self._target is not None:
            self._target_got += nbytes
            if self._target_got == len(self._target):
                self._target = None
                self._wake()
            return
        if self._discarding:
            return
        self._tail += nbytes
        if self._tail - self._head == len(self._staging):
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take(self, view: memoryview) -> int:
        count = min(len(view), self._tail - self._head)
        view[:count] = self._staged[self._head : self._head + count]
        self._head += count
        return count

    async def readinto(self, view: memoryview) -> None:
        """Fill `view` completely; PeerClosedError if the stream ends first."""
        got = self._take(view)
        while got < len(view):
            if self.closed.done():
                raise PeerClosedError("the sender closed the connection mid-transfer")
            direct = len(view) - got >= DIRECT_BYTES  # staging is empty here: _take drained it
            if direct:
                self._target, self._target_got = view[got:], 0
            if self._paused and not self.transport.is_closing():
                self._paused = False
                self.transport.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                if direct:
                    got += self._target_got
                    self._target = None
            got += self._take(view[got:])

    def send(self, frame: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(frame)

    async def linger(self, seconds: float) -> None:
        """Drop whatever the sender still pushes until it closes (it will, on our ERROR), so that our
        close does not reset the connection before the sender has read the reason."""
        self._discarding = True
        self._head = self._tail = 0
        if self._paused and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()
        await asyncio.wait([self.closed], timeout=seconds)


async def sendmsg_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Send every buffer, in order, with scatter-gather `sendmsg` calls on the non-blocking socket
    (asyncio has no sendmsg of its own): a frame leaves from the blocks where it lives."""
    loop = asyncio.get_running_loop()
    pending = [buffer for buffer in buffers if len(buffer)]
    first = 0
    while first < len(pending):
        try:
            sent = sock.sendmsg(pending[first : first + IOV_BATCH])
        except (BlockingIOError, InterruptedError):
            await _writable(loop, sock)
            continue
        while sent and sent >= len(pending[first]):
            sent -= len(pending[first])
            first += 1
        if sent:
            pending[first] = pending[first][sent:]


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


async def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    """Exactly `size` bytes from the socket; ConnectionError if it closes first."""
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    loop = asyncio.get_running_loop()
    while got < size:
        count = await loop.sock_recv_into(sock, view[got:])
        if count == 0:
            raise ConnectionError("the receiver closed the connection without a reply")
        got += count
    return buffer
