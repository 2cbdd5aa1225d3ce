"""The autoscaler's decisions as series: what one evaluation exports, how a new scale replaces the last
one's reason, and what a deleted pool leaves (nothing); then the real operator serving them over HTTP."""

from __future__ import annotations

import copy
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.contract import names
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler
from splitserve_operator.autoscaling.exporter import AutoscalerMetrics
from splitserve_operator.autoscaling.signals import PoolSignals, WorkerSignals
from splitserve_operator.handlers import Controller
from splitserve_operator.main import main
from tests.operator.apiserver import eventually
from tests.operator.autoscaling.test_evaluator import BUSY, SPEC, FakeSource
from tests.operator.conftest import NAMESPACE, TINY_SPEC, Cluster

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def series(exposition: bytes | str) -> Series:
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(role: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"pool_namespace": "team-a", "pool": "chat", "role": role, **extra}.items()))


async def test_desired_ready_and_the_last_scale_with_its_reason() -> None:
    metrics = AutoscalerMetrics()
    source = FakeSource(BUSY)  # TTFT 3x the target on 2 prefill replicas
    autoscaler, state = PoolAutoscaler(source, metrics), AutoscalerState()
    outcome = await autoscaler.evaluate("team-a", "chat", SPEC, {"prefill": 2, "decode": 1}, state, 1000.0)
    reason = outcome.decisions["prefill"].reason
    exported = series(metrics.exposition())
    assert exported[(names.AUTOSCALER_DESIRED_REPLICAS, labels("prefill"))] == 6
    assert exported[(names.AUTOSCALER_READY_REPLICAS, labels("prefill"))] == 2
    assert exported[(names.AUTOSCALER_DESIRED_REPLICAS, labels("decode"))] == 1
    last = {key: value for key, value in exported.items() if key[0] == names.AUTOSCALER_LAST_SCALE}
    assert last == {(names.AUTOSCALER_LAST_SCALE, labels("prefill", reason=reason)): 1000.0}  # decode held

    # Later, idle: a scale-down with another reason replaces the series; ready unknown keeps its value.
    source.answer = PoolSignals(request_rate=0.0, prompt_token_rate=0.0, generation_token_rate=0.0)
    for now in (1400.0, 1700.0):
        outcome = await autoscaler.evaluate("team-a", "chat", SPEC, {"prefill": 6, "decode": 1}, state, now)
    assert outcome.decisions["prefill"].desired < 6
    exported = series(metrics.exposition())
    last = {key: value for key, value in exported.items() if key[0] == names.AUTOSCALER_LAST_SCALE}
    (only,) = last
    assert only[1] == labels("prefill", reason=outcome.decisions["prefill"].reason) and last[only] == 1700.0
    assert exported[(names.AUTOSCALER_READY_REPLICAS, labels("prefill"))] == 2

    metrics.forget("team-a", "chat")
    assert not [key for key in series(metrics.exposition()) if key[0].startswith("splitserve_autoscaler")]


SCALED: dict[str, Any] = copy.deepcopy(TINY_SPEC) | {
    "autoscaling": {"intervalSeconds": 1, "predictive": False, "scaleDown": {"stabilizationWindowSeconds": 0}}
}


async def test_the_operator_serves_its_decisions_and_drops_a_deleted_pools(
    cluster: Cluster, operator: Controller
) -> None:
    idle = WorkerSignals(replicas=1, running=0.0, waiting=0.0, busy=0.0, steps=0.0, tokens=0.0)
    operator.autoscaler.source = FakeSource(
        PoolSignals(
            request_rate=0.0, prompt_token_rate=0.0, generation_token_rate=0.0, prefill=idle, decode=idle
        )
    )
    desired = (
        names.AUTOSCALER_DESIRED_REPLICAS,
        tuple(sorted({"pool_namespace": NAMESPACE, "pool": "tiny", "role": "decode"}.items())),
    )
    server, thread = operator.metrics.serve(0, "127.0.0.1")
    try:
        await cluster.create_pool("tiny", SCALED)
        await eventually(lambda: desired in series(operator.metrics.exposition()), what="the pool's series")
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as reply:
            assert reply.status == 200
            assert series(await reply.text())[desired] == 1  # idle at its minimum
        await cluster.request(
            "DELETE", f"/apis/splitserve.io/v1alpha1/namespaces/{NAMESPACE}/inferencepools/tiny"
        )
        await eventually(
            lambda: (
                not [k for k in series(operator.metrics.exposition()) if dict(k[1]).get("pool") == "tiny"]
            ),
            what="the deleted pool's series dropped",
        )
    finally:
        server.shutdown()
        thread.join(5)


def test_a_bad_metrics_port_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--metrics-port", "70000"]) == 2
    message = "splitserve operator: --metrics-port takes a port number, or 0 for none\n"
    assert capsys.readouterr().err == message
