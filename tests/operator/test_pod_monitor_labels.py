"""The PodMonitor as kube-prometheus-stack selects it: extra labels from the chart's podMonitor.labels,
through the operator's --pod-monitor-label flags, onto every PodMonitor it renders; and the chart's
podMonitor.namespace, through --pod-monitor-namespace and a Role there (test_remote_monitor.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve_operator import naming
from splitserve_operator.main import main
from splitserve_operator.reconcile import parse
from splitserve_operator.render import build_pod_monitor
from splitserve_operator.settings import OperatorSettings

from .apiserver import ApiServer
from .test_chart import RELEASE_NAMESPACE, helm_install, objects

BODY = {"metadata": {"name": "llama", "namespace": "ml"}, "spec": {"model": {"name": "m"}}}


def test_extra_labels_reach_the_pod_monitor_and_never_replace_the_pools() -> None:
    settings = OperatorSettings(
        pod_monitor_labels={"release": "kube-prometheus-stack", naming.POOL_LABEL: "x"}
    )
    pool, problem = parse(BODY, settings)
    assert problem is None and pool is not None
    labels = build_pod_monitor(pool)["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels[naming.POOL_LABEL] == "llama", "the pool's own labels win: the operator's watches use them"
    plain, _ = parse(BODY, OperatorSettings())
    assert plain is not None and "release" not in build_pod_monitor(plain)["metadata"]["labels"]


@pytest.mark.parametrize("flag", ["release", "=x", "release="])
def test_a_malformed_label_flag_is_one_line_and_exit_2(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pod-monitor-label", flag]) == 2
    assert capsys.readouterr().err == "splitserve operator: --pod-monitor-label takes KEY=VALUE\n"


@pytest.fixture()
def apiserver_options() -> dict[str, bool]:
    return {"pod_monitors": True, "peering": True}


async def test_the_chart_passes_pod_monitor_labels_and_namespace(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    values = {"podMonitor": {"labels": {"release": "kube-prometheus-stack"}, "namespace": "monitoring"}}
    result = await helm_install(apiserver, values, tmp_path)
    assert result["error"] is None and not result["lint"]["Errors"]
    (deployment,) = objects(apiserver, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--pod-monitor-label=release=kube-prometheus-stack" in args
    assert "--pod-monitor-namespace=monitoring" in args
    (role,) = [r for r in objects(apiserver, "Role") if r["metadata"]["namespace"] == "monitoring"]
    (binding,) = [b for b in objects(apiserver, "RoleBinding") if b["metadata"]["namespace"] == "monitoring"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    # The operator's own /metrics (the autoscaler's decisions), found the same way as the pools'.
    (monitor,) = objects(apiserver, "PodMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics"}]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


async def test_no_pod_monitor_namespace_by_default(apiserver: ApiServer, tmp_path: Path) -> None:
    assert (await helm_install(apiserver, {}, tmp_path))["error"] is None
    (deployment,) = objects(apiserver, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [arg for arg in args if arg.startswith("--pod-monitor-namespace")]
    assert objects(apiserver, "Role") == []
    (monitor,) = objects(apiserver, "PodMonitor")  # the operator's, with the PodMonitor CRD served
    assert monitor["metadata"]["namespace"] == RELEASE_NAMESPACE


async def test_no_operator_pod_monitor_without_its_metrics(apiserver: ApiServer, tmp_path: Path) -> None:
    assert (await helm_install(apiserver, {"metricsPort": 0}, tmp_path))["error"] is None
    assert objects(apiserver, "PodMonitor") == []


@pytest.mark.parametrize("apiserver_options", [{"peering": True}])  # no Prometheus Operator CRDs
async def test_no_operator_pod_monitor_without_the_crd(apiserver: ApiServer, tmp_path: Path) -> None:
    assert (await helm_install(apiserver, {}, tmp_path))["error"] is None
    assert objects(apiserver, "PodMonitor") == []
    (deployment,) = objects(apiserver, "Deployment")  # the scrape annotations stand in
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8081"
