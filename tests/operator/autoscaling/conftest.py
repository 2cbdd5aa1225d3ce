"""Shared pieces: real HTTP endpoints serving splitserve metrics on loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from splitserve.local.prometheus import find_prometheus
from splitserve.serving.metrics import Metrics

# The emulated apiserver of the operator suite, for the whole-loop test.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MetricsEndpoint:
    """One process's /metrics: a `Metrics` registry served by aiohttp on 127.0.0.1."""

    def __init__(self, pool: str, role: str) -> None:
        self.metrics = Metrics(pool=pool, role=role)
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def endpoints() -> AsyncIterator[dict[str, MetricsEndpoint]]:
    """Router, prefill worker and decode worker of pool "chat", each on its own port."""
    served = {role: MetricsEndpoint("chat", role) for role in ("router", "prefill", "decode")}
    for endpoint in served.values():
        await endpoint.start()
    yield served
    for endpoint in served.values():
        await endpoint.stop()


def drive(endpoints: dict[str, MetricsEndpoint], *, ttft: float, itl: float, requests: int = 10) -> None:
    """Record `requests` finished requests as the router and the workers would."""
    router, prefill, decode = (endpoints[role].metrics for role in ("router", "prefill", "decode"))
    for _ in range(requests):
        router.ttft.observe(ttft)
        for _ in range(8):
            router.itl.observe(itl)
        router.prompt_tokens.inc(200)
        router.generation_tokens.inc(9)
        router.request_finished("success")
        prefill.prefill_step.observe(0.02)
        prefill.prefill_tokens.inc(200)
        decode.decode_step.observe(0.004)
        decode.decode_tokens.inc(4)
    prefill.requests_running.set(1)
    decode.requests_running.set(4)
    decode.kv_cache_usage.set(0.1)


def prometheus_binary() -> str:
    binary = find_prometheus()
    if binary:
        return binary
    if os.environ.get("SPLITSERVE_SKIP_PROMETHEUS") == "1":
        pytest.skip("prometheus binary not installed and SPLITSERVE_SKIP_PROMETHEUS=1")
    pytest.fail(
        "prometheus binary not found: `apt-get install -y prometheus` (or set PROMETHEUS_BIN); "
        "set SPLITSERVE_SKIP_PROMETHEUS=1 to skip these tests",
        pytrace=False,
    )


@pytest.fixture
def prometheus_bin() -> str:
    return prometheus_binary()
