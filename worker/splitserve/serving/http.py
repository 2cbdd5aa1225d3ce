"""Running an aiohttp app the way every splitserve server needs it.

`handler_cancellation=True` is the point: when a client disconnects, aiohttp cancels its handler, so
the generation behind it is aborted and its KV cache freed instead of running to the end for nobody.
Shutdown is graceful: stop accepting, let in-flight requests finish for a bounded time, then cancel.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from splitserve.serving.drain import DRAIN_KEY

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0


@dataclass
class RunningApp:
    runner: web.AppRunner
    host: str
    port: int
    closed: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening, drain in-flight requests (bounded), run the app's cleanup hooks. Idempotent."""
        if not self.closed:
            self.closed = True
            await self.runner.cleanup()


async def start_app(
    app: web.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
) -> RunningApp:
    """Start serving `app`; port 0 picks a free port (see `RunningApp.port`)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return RunningApp(runner, host, bound_port)


async def serve_app(
    app: web.Application, *, host: str, port: int, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
) -> None:
    """Serve until SIGTERM or SIGINT (Kubernetes stops pods with SIGTERM), then drain the app's open
    requests (its `Drain`, if it has one: serving/drain.py) and shut down."""
    running = await start_app(app, host=host, port=port, shutdown_timeout=shutdown_timeout)
    drain = app.get(DRAIN_KEY)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    log.info("serving", extra={"url": running.url})
    try:
        await stop.wait()
        log.info("shutting down", extra={"url": running.url})
        if drain is not None:
            await drain.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await running.close()
