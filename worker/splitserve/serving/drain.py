"""Draining a server on SIGTERM: refuse new work, let open requests finish, fail the rest out loud.

Kubernetes (and `splitserve up`) stops a process with SIGTERM and kills it a grace period later. A
scale-down must not take running streams with it, so on SIGTERM a server turns not-ready (/health
503 "draining": probes take it out of Service endpoints, the router stops picking it within one health
interval), answers new work with 503 (the router retries that elsewhere before the first token), and
waits for its open requests, KV transfers of registered requests included, to finish. Past
`--drain-seconds` each request still open gets an error (an SSE error event for a client, an error
line for the router), never a silently cut stream; then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from aiohttp import web

from splitserve.contract.names import DEFAULT_DRAIN_SECONDS
from splitserve.engine.params import GenerationError

log = logging.getLogger(__name__)

# After the drain, how long aiohttp waits for handlers to write their last bytes.
FLUSH_SECONDS = 5.0

# /health?live=1 is the liveness question: still 200 while draining (the process is fine, it is
# leaving), where plain /health, the readiness question, says 503 "draining".
LIVENESS_QUERY = "live"

Fail = Callable[[GenerationError], None]


class Drain:
    """The open requests of one server, and whether it is draining."""

    def __init__(self, seconds: float = float(DEFAULT_DRAIN_SECONDS)) -> None:
        self.seconds = seconds
        self.draining = False
        self._open: dict[int, Fail] = {}
        self._serial = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def open_requests(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def request(self, fail: Fail) -> Iterator[None]:
        """Hold one request open; `fail` ends it with an error if the drain runs out of time.

        Raises a 503 GenerationError once draining: the caller answers it like any refusal.
        """
        if self.draining:
            raise GenerationError(
                "this server is draining for shutdown", status=503, kind="service_unavailable"
            )
        self._serial += 1
        key = self._serial
        self._open[key] = fail
        self._idle.clear()
        try:
            yield
        finally:
            del self._open[key]
            if not self._open:
                self._idle.set()

    async def run(self) -> bool:
        """Turn not-ready and wait for the open requests; at the deadline fail those left.

        True when every request finished on its own.
        """
        self.draining = True
        log.info("draining", extra={"open_requests": self.open_requests, "drain_seconds": self.seconds})
        try:
            await asyncio.wait_for(self._idle.wait(), self.seconds)
        except TimeoutError:
            error = GenerationError(
                f"the server shut down after draining for {self.seconds:g}s; retry the request",
                status=503,
                kind="service_unavailable",
            )
            log.warning("drain deadline passed", extra={"failed_requests": self.open_requests})
            for fail in list(self._open.values()):
                fail(error)
            return False
        log.info("drained")
        return True


DRAIN_KEY = web.AppKey("drain", Drain)
