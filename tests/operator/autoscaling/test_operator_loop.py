"""The whole loop: the real kopf operator, reading a real Prometheus that scrapes real /metrics,
scales the emulated cluster's Deployments, explains itself in status, and holds when Prometheus dies."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
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
    settings: OperatorSettings,
    cluster: Cluster,
    endpoints: Endpoints,
    prometheus_bin: str,
    tmp_path: Path,
) -> None:
    prometheus = Prometheus(prometheus_bin, tmp_path, [e.target for e in endpoints.values()])
    traffic = Traffic(endpoints)  # TTFT 3 s against the 1 s target, ITL within target
    with_prometheus = dataclasses.replace(settings, prometheus_url=prometheus.url)
    try:
        async with running_operator(apiserver, with_prometheus):
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


async def test_prefill_pool_stops_when_ttft_allows_and_comes_back_when_it_misses(
    apiserver: ApiServer,
    settings: OperatorSettings,
    cluster: Cluster,
    endpoints: Endpoints,
    prometheus_bin: str,
    tmp_path: Path,
) -> None:
    """`prefill.replicas.min: 0`: an almost idle prefill replica under a TTFT well below target goes;
    with no prefill worker left (its /metrics gone) the router's TTFT still drives the pool, and a miss
    brings a replica back."""
    prometheus = Prometheus(prometheus_bin, tmp_path, [e.target for e in endpoints.values()])
    router, prefill, decode = (endpoints[role].metrics for role in ("router", "prefill", "decode"))
    ttft = [0.1]

    async def traffic() -> None:
        while True:  # 10 requests/s, ITL within target; the prefill worker busy 1 ms a second
            for _ in range(2):
                router.ttft.observe(ttft[0])
                router.itl.observe(0.03)
                router.prompt_tokens.inc(50)
                router.generation_tokens.inc(2)
                router.request_finished("success")
                decode.decode_step.observe(0.004)
                decode.decode_tokens.inc(2)
            prefill.prefill_step.observe(0.0002)
            decode.requests_running.set(2)
            await asyncio.sleep(0.2)

    ticking = asyncio.create_task(traffic())
    spec = copy.deepcopy(SPEC)
    spec["prefill"]["replicas"] |= {"min": 0, "initial": 1}  # without `initial` it would start at zero
    with_prometheus = dataclasses.replace(settings, prometheus_url=prometheus.url)
    try:
        async with running_operator(apiserver, with_prometheus):
            await cluster.create_pool("chat", spec, namespace=NAMESPACE)
            await eventually(lambda: replicas(cluster, "prefill") == 1, what="the prefill Deployment")
            await eventually(lambda: replicas(cluster, "prefill") == 0, limit=40, what="prefill to zero")
            await eventually(
                lambda: any(
                    "decode workers take its prompts" in e["message"] for e in cluster.events("chat")
                ),
                what="the Autoscaled event saying why",
            )

            await endpoints["prefill"].stop()  # the pod is gone: so are its series
            ttft[0] = 3.0
            await eventually(lambda: replicas(cluster, "prefill") >= 1, limit=40, what="prefill back")
            assert (c := metrics_condition(cluster)) is not None and c["status"] == "True", c
    finally:
        ticking.cancel()
        prometheus.stop()
