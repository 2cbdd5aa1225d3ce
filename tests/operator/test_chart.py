"""The Helm chart, linted and installed by the real Helm library into the emulated apiserver.

Then the operator runs against that same apiserver with the peering object the chart created, and
every request it sends must be allowed by the RBAC rules the chart rendered (cluster-wide and
namespaced mode): least privilege that still covers every call.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import kmock
import pytest
from kmock._internal import enums

from splitserve_operator.settings import OperatorSettings

from .apiserver import ApiServer, eventually, running_operator
from .autoscaling.conftest import MetricsEndpoint
from .conftest import NAMESPACE, TINY_SPEC, Cluster, path_of
from .test_disruption import PDBS, decode_pods_scaled_down

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "splitserve"
RELEASE, RELEASE_NAMESPACE = "splitserve", "splitserve-system"
VERBS = {
    enums.action.LIST: "list",
    enums.action.WATCH: "watch",
    enums.action.FETCH: "get",
    enums.action.CREATE: "create",
    enums.action.DELETE: "delete",
}


# `get` of a child after a create answered 409 (the watch had not shown it yet): rare, but needed;
# and patches this scenario does not provoke.
CONFLICT_PATH = {
    ("", "configmaps", "get"),
    ("", "services", "get"),
    ("", "persistentvolumeclaims", "get"),
    ("apps", "deployments", "get"),
    ("monitoring.coreos.com", "podmonitors", "get"),
    # A claim is patched only when its pool's cache grows (spec.model.source.hub.cache.size).
    ("", "persistentvolumeclaims", "patch"),
    ("policy", "poddisruptionbudgets", "get"),
    # A pool's own PodMonitor is deleted when podMonitor.namespace moves it (test_remote_monitor.py).
    ("monitoring.coreos.com", "podmonitors", "delete"),
}
MONITORING = "monitoring"


def helm_python() -> str:
    """The interpreter of a Python >= 3.12 venv with helm-sdkpy (see docs/operator.md, "Tests")."""
    configured = os.environ.get("SPLITSERVE_HELM_PYTHON") or str(
        ROOT / "build" / "helm-venv" / "bin" / "python"
    )
    if not Path(configured).exists():
        reason = f"no Helm venv at {configured}: `make helm-venv`, or set SPLITSERVE_HELM_PYTHON"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)  # CI must lint and render the chart, never skip it
        pytest.skip(reason)
    return configured


async def helm_install(server: ApiServer, values: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Lint the chart and `helm install` it into `server`; returns the helper's JSON answer."""
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "emulator",
                "clusters": [{"name": "emulator", "cluster": {"server": str(server.url)}}],
                "users": [{"name": "test", "user": {"token": "test"}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
            }
        )
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp),
        "HELM_DRIVER": "memory",
        "HELM_CACHE_HOME": str(tmp / "cache"),
        "HELM_CONFIG_HOME": str(tmp / "config"),
    }
    process = await asyncio.create_subprocess_exec(
        helm_python(),
        str(Path(__file__).with_name("helm_chart.py")),
        str(CHART),
        str(kubeconfig),
        RELEASE_NAMESPACE,
        RELEASE,
        json.dumps(values),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return dict(json.loads(stdout))


def objects(server: ApiServer, kind: str) -> list[dict[str, Any]]:
    return [obj.raw for obj in server.objects.values() if not obj.deleted and obj.raw.get("kind") == kind]


@pytest.fixture()
def apiserver_options() -> dict[str, bool]:
    return {"pod_monitors": True, "peering": True}


async def test_lint_and_default_install(apiserver: ApiServer, tmp_path: Path) -> None:
    result = await helm_install(apiserver, {}, tmp_path)
    assert result["error"] is None
    assert not result["lint"]["Errors"]
    assert all(message["Severity"] <= 1 for message in result["lint"]["Messages"]), result["lint"]
    crds = {crd["metadata"]["name"] for crd in objects(apiserver, "CustomResourceDefinition")}
    assert crds == {"inferencepools.splitserve.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    (deployment,) = objects(apiserver, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/splitserve/operator:0.1.0"
    assert "--all-namespaces" in container["args"] and f"--peering={RELEASE}" in container["args"]
    assert "--worker-image=ghcr.io/splitserve/worker:0.1.0" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    # The autoscaler's series, where a plain Prometheus's kubernetes-pods job finds them.
    assert "--metrics-port=8081" in container["args"]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8081"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert [p["metadata"]["name"] for p in objects(apiserver, "ClusterKopfPeering")] == [RELEASE]
    assert len(objects(apiserver, "ClusterRole")) == 1 and objects(apiserver, "Role") == []
    assert "Serve a model" in result["release"]["info"].get("notes", "Serve a model")


async def test_namespaced_install(apiserver: ApiServer, tmp_path: Path) -> None:
    values = {
        "watchNamespaces": ["team-a", "team-b"],
        "replicaCount": 2,
        "prometheusUrl": "http://prom:9090",
        "metricsPort": 0,
    }
    result = await helm_install(apiserver, values, tmp_path)
    assert result["error"] is None
    assert objects(apiserver, "ClusterRole") == []
    assert sorted(r["metadata"]["namespace"] for r in objects(apiserver, "Role")) == ["team-a", "team-b"]
    assert sorted(p["metadata"]["namespace"] for p in objects(apiserver, "KopfPeering")) == [
        "team-a",
        "team-b",
    ]
    args = objects(apiserver, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--namespace=team-a", "--namespace=team-b", "--prometheus-url=http://prom:9090"} <= set(args)
    assert "--metrics-port=0" in args  # no /metrics, so no scrape annotations either
    template = objects(apiserver, "Deployment")[0]["spec"]["template"]
    assert "prometheus.io/scrape" not in (template["metadata"].get("annotations") or {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"replicaCount": 2, "leaderElection": {"enabled": False}}, "needs leaderElection.enabled"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"logFormat": "xml"}, "logFormat"),
        ({"podMonitor": {"namespace": "Monitoring"}}, "podMonitor"),
        ({"metricsPort": 70000}, "metricsPort"),
    ],
)
async def test_bad_values_are_refused(
    apiserver: ApiServer, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    result = await helm_install(apiserver, values, tmp_path)
    assert result["error"] is not None and message in result["error"]
    assert objects(apiserver, "Deployment") == []


def allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.get("apiGroups", [])
        and resource in rule.get("resources", [])
        and verb in rule.get("verbs", [])
        for rule in rules
    )


def operator_calls(requests: list[Any]) -> set[tuple[str, str, str, str | None]]:
    """(group, resource[/subresource], verb, namespace) of every API call the operator made."""
    calls = set()
    for request in requests:
        agent = request.headers.get("User-Agent", "")
        if not agent.startswith(("kopf/", "splitserve-operator")):
            continue  # Helm's and the test's own requests
        if request.resource is None or request.resource.plural is None:
            continue  # discovery: allowed to every authenticated user
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        verb = VERBS.get(request.action) or ("patch" if request.method == kmock.method.PATCH else "update")
        calls.add((request.resource.group or "", resource, verb, request.namespace))
    return calls


async def exercise(cluster: Cluster) -> None:
    """A pool that uses every feature: token Secret, PodMonitor, status, events, spec update, drift."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf", "namespace": NAMESPACE},
        "data": {"token": "aGY="},
    }
    await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", secret, "application/json")
    spec = {**TINY_SPEC, "model": {"name": "org/m", "source": {"hub": {"tokenSecretRef": {"name": "hf"}}}}}
    await cluster.create_pool("rbac", spec)
    await eventually(lambda: cluster.get("monitoring.coreos.com/v1/podmonitors", "rbac"), what="PodMonitor")
    await eventually(lambda: cluster.condition("rbac", "Ready"), what="status")
    await cluster.patch(path_of("inferencepools", "rbac"), {"spec": {"model": {"maxModelLen": 128}}})
    await cluster.patch(
        path_of("deployments", "rbac-router"), {"spec": {"template": {"spec": {"containers": []}}}}
    )
    await eventually(
        lambda: cluster.get("apps/v1/deployments", "rbac-router")["spec"]["template"]["spec"]["containers"],
        what="drift corrected",
    )
    await cluster.patch(path_of("services", "rbac-router"), {"spec": {"selector": {"app": "other"}}})
    await cluster.patch(path_of("podmonitors", "rbac"), {"spec": {"selector": {"matchLabels": {"app": "x"}}}})

    def restored() -> bool:
        service = cluster.get("v1/services", "rbac-router")
        monitor = cluster.get("monitoring.coreos.com/v1/podmonitors", "rbac")
        return (
            "app" not in service["spec"]["selector"]
            and "app" not in monitor["spec"]["selector"]["matchLabels"]
        )

    await eventually(restored, what="service and monitor restored")
    await eventually(lambda: any(e["reason"] == "Updated" for e in cluster.events("rbac")), what="events")
    await exercise_disruption(cluster)


async def exercise_remote_monitor(cluster: Cluster) -> None:
    """A pool whose PodMonitor lives in the monitoring namespace: created, corrected, deleted with it."""
    await cluster.create_pool("remote")
    place = (f"{NAMESPACE}.remote", MONITORING)
    await eventually(lambda: cluster.get("monitoring.coreos.com/v1/podmonitors", *place), what="PodMonitor")
    edit = {"spec": {"selector": {"matchLabels": {"app": "x"}}}}
    await cluster.patch(path_of("podmonitors", *place), edit)
    await eventually(
        lambda: (
            "app"
            not in cluster.get("monitoring.coreos.com/v1/podmonitors", *place)["spec"]["selector"][
                "matchLabels"
            ]
        ),
        what="PodMonitor restored",
    )
    await cluster.request("DELETE", path_of("inferencepools", "remote"))
    await eventually(
        lambda: cluster.get("monitoring.coreos.com/v1/podmonitors", *place) is None, what="deleted"
    )


async def exercise_disruption(cluster: Cluster) -> None:
    """Budgets changed and turned off (deleted); a decode scale-down that costs the pods (list, patch)."""
    budgets = {
        "router": {"disruptionBudget": {"enabled": False}},
        "decode": {"disruptionBudget": {"maxUnavailable": 2}},
    }
    await cluster.patch(path_of("inferencepools", "rbac"), {"spec": budgets})
    await eventually(lambda: cluster.get(PDBS, "rbac-router") is None, what="router budget deleted")
    await eventually(lambda: cluster.get(PDBS, "rbac-decode")["spec"]["maxUnavailable"] == 2, what="patched")
    endpoint = MetricsEndpoint("fixed", "decode")
    await endpoint.start()
    try:
        await decode_pods_scaled_down(cluster, {"only": endpoint})
    finally:
        await endpoint.stop()


@pytest.mark.parametrize(
    ("namespaced", "monitors"),
    [(False, None), (True, None), (True, MONITORING)],
    ids=["cluster-wide", "namespaced", "namespaced-pod-monitor-namespace"],
)
async def test_rbac_covers_every_call_the_operator_makes(
    apiserver: ApiServer, tmp_path: Path, namespaced: bool, monitors: str | None
) -> None:
    values: dict[str, Any] = {"watchNamespaces": [NAMESPACE]} if namespaced else {}
    if monitors is not None:
        values["podMonitor"] = {"namespace": monitors}
    assert (await helm_install(apiserver, values, tmp_path))["error"] is None
    cluster_rules = [rule for role in objects(apiserver, "ClusterRole") for rule in role["rules"]]
    namespace_rules = {
        namespace: [
            rule
            for role in objects(apiserver, "Role")
            if role["metadata"]["namespace"] == namespace
            for rule in role["rules"]
        ]
        for namespace in (NAMESPACE, MONITORING)
    }
    settings = OperatorSettings(
        poll_seconds=0.1,
        resync_seconds=0.5,
        namespaces=(NAMESPACE,) if namespaced else (),
        pod_monitor_namespace=monitors,
    )
    mark = apiserver.count()
    async with running_operator(apiserver, settings, peering=RELEASE):
        if monitors is None:
            await exercise(Cluster(apiserver))
        else:
            await exercise_remote_monitor(Cluster(apiserver))
    calls = operator_calls(apiserver.log[mark:])
    if monitors is None:
        assert ("", "secrets", "get", NAMESPACE) in calls and ("", "events", "create", NAMESPACE) in calls
    assert any(resource.endswith("kopfpeerings") for _, resource, _, _ in calls), "peering was exercised"
    denied = sorted(
        call
        for call in calls
        if not allowed(cluster_rules, *call[:3])
        and not allowed(namespace_rules.get(call[3] or "", []), *call[:3])
    )
    assert denied == [], f"calls the chart's RBAC does not allow: {denied}"
    if namespaced:
        where = {NAMESPACE, monitors}
        assert cluster_rules == [] and all(call[3] in where for call in calls), sorted(calls)
    if monitors is not None:
        # There: exactly the PodMonitor verbs this scenario used (the full one checks the others).
        used_there = {call[:3] for call in calls if call[3] == monitors}
        assert granted(namespace_rules[monitors]) == used_there
        assert {verb for _, _, verb in used_there} == {"get", "create", "patch", "delete"}
        return
    # And nothing more: every granted permission was used, or serves a path this scenario does not take.
    used = {call[:3] for call in calls} | CONFLICT_PATH
    unused = granted(cluster_rules + namespace_rules[NAMESPACE]) - used
    assert not unused, f"granted but never used: {sorted(unused)}"


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every permission the rules grant."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("enabled", [False, True], ids=["default", "enabled"])
async def test_grafana_dashboard_config_map_for_the_sidecar(
    apiserver: ApiServer, tmp_path: Path, enabled: bool
) -> None:
    values = {"grafanaDashboard": {"enabled": True, "folder": "LLM serving"}} if enabled else {}
    result = await helm_install(apiserver, values, tmp_path)
    assert result["error"] is None and not result["lint"]["Errors"]
    dashboards = [c for c in objects(apiserver, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    if not enabled:
        assert dashboards == []  # off by default
        return
    (dashboard,) = dashboards
    assert dashboard["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"]["grafana_folder"] == "LLM serving"
    shipped = json.loads((CHART / "dashboards" / "splitserve.json").read_text())
    assert json.loads(dashboard["data"]["splitserve.json"]) == shipped
