"""PodMonitors in the monitoring namespace (--pod-monitor-namespace; the chart's podMonitor.namespace).

Rendering, then the real kopf operator against the emulated apiserver: the PodMonitor is created there
without an owner, recorded on the pool, moved when the setting changes (the old one deleted, the pool's
own namespace included), and deleted with its pool (kopf's on-delete handler, under its finalizer).
"""

from __future__ import annotations

from typing import Any

import pytest

from splitserve_operator import naming
from splitserve_operator.main import main
from splitserve_operator.reconcile import parse
from splitserve_operator.render import build_children, build_remote_pod_monitor, unwanted_children
from splitserve_operator.settings import OperatorSettings

from .apiserver import ApiServer, eventually, running_operator
from .conftest import NAMESPACE, TINY_SPEC, Cluster, path_of

MONITORS = "monitoring.coreos.com/v1/podmonitors"
FIXED = TINY_SPEC | {"autoscaling": {"enabled": False}}
BODY = {"metadata": {"name": "llama", "namespace": "ml"}, "spec": {"model": {"name": "m"}}}


def test_the_remote_pod_monitor_selects_the_pools_namespace_and_replaces_the_local_one() -> None:
    pool, _ = parse(BODY, OperatorSettings(pod_monitor_namespace="monitoring", pod_monitor_labels={"r": "k"}))
    assert pool is not None
    monitor = build_remote_pod_monitor(pool, pod_monitor=True)
    assert monitor is not None
    assert monitor["metadata"]["namespace"] == "monitoring" and monitor["metadata"]["name"] == "ml.llama"
    labels = monitor["metadata"]["labels"]
    assert labels[naming.POOL_LABEL] == "llama" and labels[naming.POOL_NAMESPACE_LABEL] == "ml"
    assert labels["r"] == "k" and naming.SPEC_HASH_ANNOTATION in monitor["metadata"]["annotations"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    assert monitor["spec"]["selector"] == {"matchLabels": {naming.POOL_LABEL: "llama"}}
    assert "PodMonitor" not in {child["kind"] for child in build_children(pool, pod_monitor=True)}
    assert ("PodMonitor", "llama") in unwanted_children(pool)
    assert build_remote_pod_monitor(pool, pod_monitor=False) is None  # no CRD, no PodMonitor

    local, _ = parse(BODY, OperatorSettings())
    assert local is not None and build_remote_pod_monitor(local, pod_monitor=True) is None
    assert ("PodMonitor", "llama") not in unwanted_children(local)


@pytest.mark.parametrize("namespace", ["Monitoring", "a.b", "-x", ""])
def test_a_bad_namespace_flag_is_one_line_and_exit_2(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([f"--pod-monitor-namespace={namespace}"]) == 2
    assert capsys.readouterr().err == "splitserve operator: --pod-monitor-namespace takes a namespace name\n"


def settings(namespace: str | None) -> OperatorSettings:
    return OperatorSettings(
        worker_image="splitserve/worker:test",
        poll_seconds=0.1,
        resync_seconds=0.5,
        pod_monitor_namespace=namespace,
    )


def recorded(cluster: Cluster) -> str | None:
    annotations: dict[str, str] = cluster.pool("tiny")["metadata"].get("annotations") or {}
    return annotations.get(naming.POD_MONITOR_ANNOTATION)


async def delete_pool(cluster: Cluster) -> None:
    """Delete pool "tiny" and wait until kopf released its finalizer (the on-delete handler ran).

    Generous: on a loaded machine kopf was seen taking over 15 s to release it, with or without
    an on-delete handler to run (it waits for the pool's timers to stop)."""
    await cluster.request("DELETE", path_of("inferencepools", "tiny"))
    pools = naming.GROUP + "/v1alpha1/inferencepools"
    await eventually(lambda: cluster.get(pools, "tiny") is None, limit=90, what="the pool gone")


async def moved_to(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """Wait until pool "tiny"'s PodMonitor lives in `namespace` and the pool records it there."""
    name = f"{NAMESPACE}.tiny"
    monitor: dict[str, Any] = await eventually(
        lambda: cluster.get(MONITORS, name, namespace), what=f"PodMonitor in {namespace}"
    )
    await eventually(lambda: recorded(cluster) == f"{namespace}/{name}", what="the place recorded")
    return monitor


@pytest.mark.parametrize("apiserver_options", [{"pod_monitors": True}])
async def test_created_moved_and_deleted_with_the_setting_and_the_pool(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    name = f"{NAMESPACE}.tiny"
    async with running_operator(apiserver, settings(None)):  # first where it always was
        await cluster.create_pool("tiny", FIXED)  # no autoscaler: the steady window below is the reconciler's
        await eventually(lambda: cluster.get(MONITORS, "tiny"), what="the pool's own PodMonitor")

    async with running_operator(apiserver, settings("monitoring")) as runtime:
        monitor = await moved_to(cluster, "monitoring")
        assert "ownerReferences" not in monitor["metadata"]  # none can point across namespaces
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        await eventually(lambda: cluster.get(MONITORS, "tiny") is None, what="the local one deleted")
        # A hand edit is undone within a resync (read back once per resync: in namespaced mode
        # nothing watches that namespace).
        edit = {"spec": {"selector": {"matchLabels": {"app": "x"}}}}
        await cluster.patch(path_of("podmonitors", name, "monitoring"), edit)
        await eventually(
            lambda: "app" not in cluster.get(MONITORS, name, "monitoring")["spec"]["selector"]["matchLabels"],
            what="the edit undone",
        )
        # Then steady: resyncs go on and write nothing.
        await eventually(lambda: sum(runtime.reconciled.values()) >= 4, what="resyncs")
        mark, reconciles = cluster.server.count(), sum(runtime.reconciled.values())
        await eventually(lambda: sum(runtime.reconciled.values()) >= reconciles + 4, what="more resyncs")
        assert [(f"{r.method.value} {r.url.path}", r.data) for r in cluster.server.writes(mark)] == []

    async with running_operator(apiserver, settings("metrics")):
        await moved_to(cluster, "metrics")
        await eventually(
            lambda: cluster.get(MONITORS, name, "monitoring") is None, what="the old one deleted"
        )

    async with running_operator(apiserver, settings(None)):  # back home: owned again
        monitor = await eventually(lambda: cluster.get(MONITORS, "tiny"), what="the local one again")
        assert monitor["metadata"]["ownerReferences"][0]["name"] == "tiny"
        await eventually(
            lambda: cluster.get(MONITORS, name, "metrics") is None, what="the remote one deleted"
        )
        await eventually(lambda: recorded(cluster) is None, what="record cleared")

    async with running_operator(apiserver, settings("monitoring")):
        await moved_to(cluster, "monitoring")
        await delete_pool(cluster)
        assert cluster.get(MONITORS, name, "monitoring") is None


@pytest.mark.parametrize("apiserver_options", [{"pod_monitors": True}])
async def test_someone_elses_pod_monitor_at_the_place_is_a_conflict_and_survives_the_pool(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    name = f"{NAMESPACE}.tiny"
    foreign = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": name, "namespace": "monitoring", "labels": {"team": "other"}},
        "spec": {"selector": {"matchLabels": {"app": "other"}}},
    }
    path = "/apis/monitoring.coreos.com/v1/namespaces/monitoring/podmonitors"
    await cluster.request("POST", path, foreign, "application/json")
    async with running_operator(apiserver, settings("monitoring")):
        await cluster.create_pool("tiny")
        ready = await eventually(
            lambda: (c := cluster.condition("tiny", "Ready")) and c["reason"] == "ChildConflict" and c,
            what="ChildConflict",
        )
        assert f"PodMonitor monitoring/{name} exists and is not this pool's" in ready["message"]
        assert recorded(cluster) is None  # not claimed, so never deleted as the pool's
        await delete_pool(cluster)
    assert cluster.get(MONITORS, name, "monitoring")["spec"] == foreign["spec"]  # type: ignore[index]


@pytest.mark.parametrize("apiserver_options", [{"pod_monitors": True}])
async def test_one_it_may_no_longer_delete_is_left_and_blocks_nothing(
    apiserver: ApiServer, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A chart upgrade that moves podMonitor.namespace takes the Role in the old namespace along."""
    name = f"{NAMESPACE}.tiny"
    async with running_operator(apiserver, settings("monitoring")):
        await cluster.create_pool("tiny")
        await moved_to(cluster, "monitoring")
    forbidden = {"kind": "Status", "reason": "Forbidden", "message": "podmonitors is forbidden"}
    cluster.server["delete", path_of("podmonitors", name, "monitoring")] << 403 << forbidden
    async with running_operator(apiserver, settings("metrics")):
        await moved_to(cluster, "metrics")  # the new one all the same
        await delete_pool(cluster)
        assert cluster.get(MONITORS, name, "metrics") is None
    # Left (the emulator applies a DELETE it answers 403 all the same, so the log is the evidence).
    warning = f"PodMonitor monitoring/{name} not deleted (podmonitors is forbidden): delete it by hand"
    assert warning in caplog.messages
