"""Disruption: PodDisruptionBudgets per role, and decode pods' deletion cost before a scale-down.

The real kopf operator against the emulated apiserver; the decode "pods" are objects in it whose IP
and `http` port lead to real /metrics endpoints on loopback, reporting unequal running sequences.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from splitserve_operator.autoscaling.signals import PoolSignals, WorkerSignals
from splitserve_operator.deletion_cost import DELETION_COST, cost_patches, metrics_url, running_sequences
from splitserve_operator.handlers import Controller

from .apiserver import eventually
from .autoscaling.conftest import MetricsEndpoint
from .autoscaling.test_evaluator import FakeSource
from .conftest import NAMESPACE, TINY_SPEC, Cluster, path_of

PDBS = "policy/v1/poddisruptionbudgets"
PODS = "v1/pods"
FIXED: dict[str, Any] = copy.deepcopy(TINY_SPEC) | {"autoscaling": {"enabled": False}}
FIXED["decode"]["replicas"] = {"min": 1, "max": 2, "initial": 2}
AUTOSCALED: dict[str, Any] = FIXED | {
    "autoscaling": {
        "intervalSeconds": 1,
        "predictive": False,
        "scaleDown": {"stabilizationWindowSeconds": 0, "maxStep": 1},
    }
}


def test_cost_is_the_running_and_waiting_sequences_written_only_when_it_changes() -> None:
    endpoint = MetricsEndpoint("p", "decode")
    endpoint.metrics.requests_running.set(3)
    endpoint.metrics.requests_waiting.set(1)
    assert running_sequences(endpoint.metrics.exposition()[0].decode()) == 4.0
    assert running_sequences("# nothing\n") is None
    pods = [
        {"metadata": {"name": "a", "annotations": {DELETION_COST: "4"}}},
        {"metadata": {"name": "b"}},
        {"metadata": {"name": "c"}},
    ]
    assert cost_patches(pods, {"a": 4.0, "b": 0.0, "c": None}) == {
        "b": {"metadata": {"annotations": {DELETION_COST: "0"}}}
    }
    pod = {
        "status": {"podIP": "10.0.0.7"},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8000}]}]},
    }
    assert metrics_url(pod) == "http://10.0.0.7:8000/metrics"
    assert metrics_url({"spec": pod["spec"]}) is None


def decode_pod(pool: str, name: str, endpoint: MetricsEndpoint) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"splitserve.io/pool": pool, "splitserve.io/role": "decode"},
        },
        "spec": {
            "containers": [{"name": "decode", "ports": [{"name": "http", "containerPort": endpoint.port}]}]
        },
        "status": {"podIP": "127.0.0.1", "phase": "Running"},
    }


@pytest.fixture
async def busy_and_idle() -> AsyncIterator[dict[str, MetricsEndpoint]]:
    """Two decode workers' /metrics: one running three streams, one running one."""
    served = {"busy": MetricsEndpoint("fixed", "decode"), "idle": MetricsEndpoint("fixed", "decode")}
    served["busy"].metrics.requests_running.set(3)
    served["idle"].metrics.requests_running.set(1)
    for endpoint in served.values():
        await endpoint.start()
    yield served
    for endpoint in served.values():
        await endpoint.stop()


async def decode_pods_scaled_down(cluster: Cluster, endpoints: dict[str, MetricsEndpoint]) -> int:
    """Pool "fixed" (2 decode replicas, autoscaling off) with one decode pod per endpoint, scaled to 1;
    returns the apiserver's request count just before the scale-down."""
    for name, endpoint in endpoints.items():
        pod = decode_pod("fixed", f"fixed-decode-{name}", endpoint)
        await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod, "application/json")
    await cluster.create_pool("fixed", FIXED)
    await eventually(lambda: cluster.get("apps/v1/deployments", "fixed-decode"), what="decode Deployment")
    return await scale_decode(cluster, 1)


async def scale_decode(cluster: Cluster, initial: int) -> int:
    """Set pool "fixed"'s decode replicas; returns the request count before the change."""
    mark = cluster.server.count()
    patch = {"spec": {"decode": {"replicas": {"initial": initial}}}}
    await cluster.patch(path_of("inferencepools", "fixed"), patch)
    await eventually(
        lambda: cluster.get("apps/v1/deployments", "fixed-decode")["spec"]["replicas"] == initial,
        what=f"decode at {initial}",
    )
    return mark


async def test_decode_pods_are_costed_by_their_streams_before_replicas_drop(
    cluster: Cluster, operator: Controller, busy_and_idle: dict[str, MetricsEndpoint]
) -> None:
    mark = await decode_pods_scaled_down(cluster, busy_and_idle)
    costs = {
        name: cluster.get(PODS, f"fixed-decode-{name}")["metadata"]["annotations"][DELETION_COST]
        for name in busy_and_idle
    }
    assert costs == {"busy": "3", "idle": "1"}  # the ReplicaSet controller removes the idle pod
    writes = [str(r.url.path) for r in cluster.server.writes(mark)]
    deployment = path_of("deployments", "fixed-decode")
    pod_patches = [i for i, path in enumerate(writes) if "/pods/" in path]
    assert len(pod_patches) == 2 and max(pod_patches) < writes.index(deployment)  # costs first

    # Back up and down again with the same load: the costs are right already, so no pod is written.
    await scale_decode(cluster, 2)
    mark = await scale_decode(cluster, 1)
    assert [str(r.url.path) for r in cluster.server.writes(mark) if "/pods/" in str(r.url.path)] == []


async def test_the_autoscalers_scale_down_costs_the_pods_first_writing_only_changed_costs(
    cluster: Cluster, operator: Controller, busy_and_idle: dict[str, MetricsEndpoint]
) -> None:
    # The autoscaler sees an idle pool (the signals a Prometheus would give) and takes decode 2 -> 1;
    # the pods' own /metrics say which one is busy. The busy pod's cost is right already.
    idle = WorkerSignals(replicas=2, running=0.0, waiting=0.0, kv_usage=0.0, busy=0.0, steps=0.0, tokens=0.0)
    operator.autoscaler.source = FakeSource(
        PoolSignals(request_rate=0.0, prompt_token_rate=0.0, generation_token_rate=0.0, decode=idle)
    )
    for name, endpoint in busy_and_idle.items():
        pod = decode_pod("fixed", f"fixed-decode-{name}", endpoint)
        if name == "busy":
            pod["metadata"]["annotations"] = {DELETION_COST: "3"}
        await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod, "application/json")
    mark = cluster.server.count()
    await cluster.create_pool("fixed", AUTOSCALED)
    await eventually(
        lambda: cluster.get("apps/v1/deployments", "fixed-decode")["spec"]["replicas"] == 1,
        limit=20,
        what="the autoscaler's scale-down",
    )
    await eventually(lambda: "Autoscaled" in {e["reason"] for e in cluster.events("fixed")}, what="event")
    costs = {
        name: cluster.get(PODS, f"fixed-decode-{name}")["metadata"]["annotations"][DELETION_COST]
        for name in busy_and_idle
    }
    assert costs == {"busy": "3", "idle": "1"}
    writes = [f"{r.method.value} {r.url.path}" for r in cluster.server.writes(mark)]
    deployment = "PATCH " + path_of("deployments", "fixed-decode")
    assert [w for w in writes if "/pods/" in w] == ["PATCH " + path_of("pods", "fixed-decode-idle")]
    assert writes.index("PATCH " + path_of("pods", "fixed-decode-idle")) < writes.index(deployment)


async def test_disruption_budgets_are_owned_and_removed_when_turned_off(
    cluster: Cluster, operator: Controller
) -> None:
    created = await cluster.create_pool("tiny")
    names = [f"tiny-{role}" for role in ("prefill", "decode", "router")]
    budgets = await eventually(
        lambda: all(cluster.get(PDBS, n) for n in names) and [cluster.get(PDBS, n) for n in names],
        what="budgets",
    )
    for budget in budgets:
        assert budget["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert budget["spec"]["maxUnavailable"] == 1
    await cluster.patch(
        path_of("inferencepools", "tiny"),
        {
            "spec": {
                "router": {"disruptionBudget": {"enabled": False}},
                "decode": {"disruptionBudget": {"maxUnavailable": 2}},
            }
        },
    )
    await eventually(lambda: cluster.get(PDBS, "tiny-router") is None, what="router budget deleted")
    await eventually(
        lambda: cluster.get(PDBS, "tiny-decode")["spec"]["maxUnavailable"] == 2, what="decode budget updated"
    )
    await eventually(
        lambda: any(e["reason"] == "Deleted" for e in cluster.events("tiny")), what="Deleted event"
    )
