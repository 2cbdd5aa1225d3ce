"""The whole loop: the real kopf operator, reading a real Prometheus that scrapes real /metrics,
scales the emulated cluster's Deployments, explains itself in status, and holds when Prometheus dies."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

from splitserve_operator.settings import OperatorSettings
from tests.operator.apiserver import ApiServer, eventually, running_operator
from tests.operator.autoscaling.test_prometheus import NAMESPACE, Endpoints, Prometheus, Traffic
from tests.operator.conftest import TINY_SPEC, Cluster

DEPLOYMENTS = "apps/v1/deployments"
SPEC: dict[str, Any] = copy.deepcopy(TINY_SPEC) | {
    "autoscaling": {
        "intervalSeconds": 1,
        "windowSeconds": 10,
        "predictive": False,
        "scaleDown": {"stabilizationWindowSeconds": 0, "maxStep": 1},
    },
}
SPEC["prefill"] = {"replicas": {"min": 1, "max": 6}, "slo": {"ttftSeconds": 1.0, "percentile": 0.9}}


def replicas(cluster: Cluster, role: str) -> int:
    deployment = cluster.get(DEPLOYMENTS, f"chat-{role}", NAMESPACE)
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def metrics_condition(cluster: Cluster) -> dict[str, Any] | None:
    conditions = (cluster.pool("chat", NAMESPACE).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "MetricsAvailable"), None)


async def test_operator_scales_on_what_prometheus_reports_and_holds_without_it(
    apiserver: ApiServer,
    cluster: Cluster,
    endpoints: Endpoints,
    prometheus_bin: str,
    tmp_path: Path,
) -> None:
    prometheus = Prometheus(prometheus_bin, tmp_path, [e.target for e in endpoints.values()])
    traffic = Traffic(endpoints)  # TTFT 3 s against the 1 s target, ITL within target
    settings = OperatorSettings(
        worker_image="splitserve/worker:test",
        poll_seconds=0.1,
        resync_seconds=0.5,
        prometheus_url=prometheus.url,
    )
    try:
        async with running_operator(apiserver, settings):
            await cluster.create_pool("chat", SPEC, namespace=NAMESPACE)
            await eventually(lambda: replicas(cluster, "prefill") > 1, limit=40, what="prefill scale-up")
            # kopf applies the timer's status patch once the handler returns, just after the scale.
            await eventually(
                lambda: cluster.pool("chat", NAMESPACE)["status"]["prefill"]["lastScaleTime"],
                what="the decision in status",
            )
            status = cluster.pool("chat", NAMESPACE)["status"]
            assert status["prefill"]["observedLatencySeconds"] > 2.0
            assert status["prefill"]["targetLatencySeconds"] == 1.0
            assert status["prefill"]["lastScaleTime"] and status["prefill"]["reason"]
            assert replicas(cluster, "decode") == 1
            await eventually(lambda: (c := metrics_condition(cluster)) and c["status"] == "True", what="True")
            # kopf posts events from a queue of its own, after the handler's status patch.
            await eventually(
                lambda: any(e["reason"] == "Autoscaled" for e in cluster.events("chat")), what="event"
            )

            prometheus.stop()
            down = await eventually(
                lambda: (c := metrics_condition(cluster)) and c["status"] == "False" and c,
                limit=20,
                what="MetricsAvailable=False",
            )
            assert down["reason"] == "PrometheusUnreachable" and prometheus.url in down["message"]
            held = replicas(cluster, "prefill")
            await asyncio.sleep(3)  # three more evaluations
            assert replicas(cluster, "prefill") == held and replicas(cluster, "decode") == 1
            assert any(
                e["reason"] == "MetricsUnavailable" and e["type"] == "Warning" for e in cluster.events("chat")
            )
    finally:
        traffic.stop()
        prometheus.stop()
