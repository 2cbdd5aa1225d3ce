"""A pool whose situation does not change gets no write: Prometheus down, or a child in ChildConflict.

The real kopf operator against the emulated apiserver, with `--prometheus-url` pointing at a closed
port. Once every pool has converged (MetricsAvailable=False, Ready=False/ChildConflict), a quiet window
of evaluations and resyncs must bring zero writes (no status PATCH, no child POST, no event), for pool
names and Prometheus URLs short and long. SPLITSERVE_QUIET_SECONDS sets the window (30 s by default).
"""

from __future__ import annotations

import asyncio
import copy
import os
from typing import Any

import pytest

from splitserve_operator.autoscaling.signals import PoolSignals, SignalQuery, SignalSource
from splitserve_operator.handlers import Controller
from splitserve_operator.naming import MAX_POOL_NAME
from splitserve_operator.settings import OperatorSettings

from .apiserver import ApiServer, eventually, running_operator
from .autoscaling.conftest import free_port
from .conftest import NAMESPACE, TINY_SPEC, Cluster

QUIET_SECONDS = float(os.environ.get("SPLITSERVE_QUIET_SECONDS", "30"))
AUTOSCALED: dict[str, Any] = copy.deepcopy(TINY_SPEC) | {
    "autoscaling": {"intervalSeconds": 1, "windowSeconds": 10},
}
SHORT, LONG = "q", "q" + "x" * (MAX_POOL_NAME - 1)
CONFLICTED = "taken"


class CountingSource:
    """The operator's real PrometheusSource, counting reads: proof that the window saw evaluations."""

    def __init__(self, source: SignalSource) -> None:
        self.source = source
        self.reads = 0

    async def read(self, query: SignalQuery) -> PoolSignals:
        self.reads += 1
        return await self.source.read(query)


def converged(cluster: Cluster) -> bool:
    for pool in (SHORT, LONG):
        metrics = cluster.condition(pool, "MetricsAvailable")
        if metrics is None or metrics["reason"] != "PrometheusUnreachable":
            return False
        if "holding" not in cluster.pool(pool)["status"]["decode"].get("reason", ""):
            return False
    ready = cluster.condition(CONFLICTED, "Ready")
    return ready is not None and ready["reason"] == "ChildConflict"


@pytest.mark.parametrize("url_path", ["", "/" + "p" * 400], ids=["short-url", "long-url"])
async def test_no_writes_while_prometheus_is_down_or_a_child_conflicts(
    apiserver: ApiServer, cluster: Cluster, url_path: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}{url_path}"  # nothing listens: connection refused
    settings = OperatorSettings(
        worker_image="splitserve/worker:test", poll_seconds=0.1, resync_seconds=0.5, prometheus_url=url
    )
    # Another controller's Service holds the name the pool's decode Service needs.
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "name": "other",
        "uid": "0000",
        "controller": True,
    }
    taken = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{CONFLICTED}-decode", "namespace": NAMESPACE, "ownerReferences": [foreign]},
        "spec": {"ports": [{"port": 80}]},
    }
    await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/services", taken, "application/json")
    runtime: Controller
    async with running_operator(apiserver, settings) as runtime:
        counting = CountingSource(runtime.autoscaler.source)
        runtime.autoscaler.source = counting
        for pool in (SHORT, LONG):
            await cluster.create_pool(pool, AUTOSCALED)
        await cluster.create_pool(CONFLICTED)
        await eventually(lambda: converged(cluster), limit=30, what="every pool to converge")
        message = cluster.condition(LONG, "MetricsAvailable")["message"]  # type: ignore[index]
        assert message == f"Prometheus at {url} unreachable: connection refused"
        # One more full round of evaluations and resyncs, then the window.
        reads, reconciles = counting.reads + 3, sum(runtime.reconciled.values()) + 6
        await eventually(lambda: counting.reads >= reads, what="evaluations")
        await eventually(lambda: sum(runtime.reconciled.values()) >= reconciles, what="resyncs")

        mark, reads, reconciles = cluster.server.count(), counting.reads, sum(runtime.reconciled.values())
        await asyncio.sleep(QUIET_SECONDS)  # the window itself is what is measured
        writes = [f"{r.method} {r.url}" for r in cluster.server.writes(mark)]
        assert writes == []
        conflict_calls = [
            str(r.url) for r in cluster.server.log[mark:] if f"{CONFLICTED}-decode" in str(r.url)
        ]
        assert conflict_calls == []  # neither POSTed again (409) nor read back
        # The window did see work: evaluations of both pools, and resyncs of all three.
        assert counting.reads - reads >= 2 * int(QUIET_SECONDS * 0.5)
        assert sum(runtime.reconciled.values()) - reconciles >= 3 * int(QUIET_SECONDS)
