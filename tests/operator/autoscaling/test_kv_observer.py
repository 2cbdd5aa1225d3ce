"""The KV-sharing status through the whole loop: the real kopf operator reads a real Prometheus that
scrapes the contract's counters from a real /metrics endpoint, writes the ratios and failures into the
pool's status (autoscaling off: the figures do not depend on it) and turns Degraded while transfers keep
failing, back once they stop."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from splitserve.contract import names
from splitserve_operator.kv_status import KV_TRANSFERS_FAILING
from splitserve_operator.settings import OperatorSettings
from tests.operator.apiserver import ApiServer, eventually, running_operator
from tests.operator.autoscaling.conftest import free_port
from tests.operator.autoscaling.test_prometheus import NAMESPACE, Prometheus
from tests.operator.conftest import TINY_SPEC, Cluster

POOL = "chat"
SPEC: dict[str, Any] = copy.deepcopy(TINY_SPEC) | {
    "autoscaling": {"enabled": False, "intervalSeconds": 1, "windowSeconds": 10},
}
LIMIT = 40.0  # seconds: Prometheus' first scrapes plus a 10 s window to forget the failures


class KvCounters:
    """What the router (placements), a decode worker (prefix cache) and a prefill worker (failures) of
    the pool export about sharing KV, under the contract's names, on one /metrics port."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = list(names.METRIC_LABELS)

        def counter(name: str, *extra: str) -> Counter:
            return Counter(name, name, [*labels, *extra], registry=self.registry)

        self.prefills = counter(names.PREFILLS, "placement")
        self.queries = counter(names.PREFIX_CACHE_QUERIES)
        self.hits = counter(names.PREFIX_CACHE_HITS, names.PREFIX_CACHE_TIER_LABEL)
        self.failures = counter(names.KV_TRANSFER_FAILURES, "reason")
        self.failing = True
        self.port = free_port()
        self.step(0)  # every series exists before the first scrape, so increase() sees all of each

    def step(self, scale: int = 1) -> None:
        """Requests of one tick: 3 of 4 prompts prefilled remotely, 60% of prompt tokens cached."""
        self.prefills.labels(POOL, "router", "remote").inc(3 * scale)
        self.prefills.labels(POOL, "router", "local").inc(scale)
        self.queries.labels(POOL, "decode").inc(100 * scale)
        self.hits.labels(POOL, "decode", "device").inc(60 * scale)
        self.failures.labels(POOL, "prefill", "timeout").inc(scale if self.failing else 0)

    async def serve(self) -> AsyncIterator[None]:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield
        finally:
            await runner.cleanup()


@pytest.fixture
async def counters() -> AsyncIterator[KvCounters]:
    served = KvCounters()
    async for _ in served.serve():
        yield served


def status(cluster: Cluster) -> dict[str, Any]:
    return dict(cluster.pool(POOL, NAMESPACE).get("status") or {})


def degraded(cluster: Cluster) -> tuple[str, str] | None:
    found = [c for c in status(cluster).get("conditions") or [] if c["type"] == "Degraded"]
    return (found[0]["status"], found[0]["reason"]) if found else None


async def test_status_shows_kv_sharing_and_degrades_while_transfers_keep_failing(
    apiserver: ApiServer,
    settings: OperatorSettings,
    cluster: Cluster,
    counters: KvCounters,
    prometheus_bin: str,
    tmp_path: Path,
) -> None:
    prometheus = Prometheus(prometheus_bin, tmp_path, [f"127.0.0.1:{counters.port}"])

    async def traffic() -> None:
        while True:
            counters.step()
            await asyncio.sleep(0.2)

    ticking = asyncio.create_task(traffic())
    with_prometheus = dataclasses.replace(settings, prometheus_url=prometheus.url)
    try:
        async with running_operator(apiserver, with_prometheus):
            await cluster.create_pool(POOL, SPEC, namespace=NAMESPACE)
            await eventually(
                lambda: degraded(cluster) == ("True", KV_TRANSFERS_FAILING), limit=LIMIT, what="Degraded"
            )
            now = status(cluster)
            assert now["remotePrefillRatio"] == pytest.approx(0.75, abs=0.02)
            assert now["prefixHitRatio"] == pytest.approx(0.6, abs=0.02)
            assert set(now["kvTransferFailures"]) == {"timeout"} and now["kvTransferFailures"]["timeout"] > 0
            assert not any(c["type"] == "MetricsAvailable" for c in now["conditions"])  # not autoscaled
            await eventually(
                lambda: [
                    e
                    for e in cluster.events(POOL)
                    if (e["type"], e["reason"]) == ("Warning", KV_TRANSFERS_FAILING)
                ],
                what="a KVTransfersFailing event",
            )

            counters.failing = False
            await eventually(
                lambda: degraded(cluster) == ("False", "AsExpected"), limit=LIMIT, what="Degraded=False"
            )
            await eventually(lambda: not status(cluster).get("kvTransferFailures"), what="failures forgotten")
            assert status(cluster)["prefixHitRatio"] == pytest.approx(0.6, abs=0.02)
    finally:
        ticking.cancel()
        prometheus.stop()
