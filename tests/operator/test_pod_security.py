"""Every pod splitserve renders passes the `restricted` Pod Security Standard (tests/operator/pss.py):
the router and worker Deployments for each model source, and the chart's operator Deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from splitserve_operator import naming
from splitserve_operator.diff import strip_nones
from splitserve_operator.render import build_children

from .apiserver import ApiServer
from .pss import violations
from .test_chart import helm_install, objects
from .test_render import pool

SOURCES = {
    "hub-default": {},
    "hub-token": {"hub": {"tokenSecretRef": {"name": "hf"}}},
    "pvc": {"pvc": {"claimName": "weights"}},
}


def pods(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each Deployment's pod template (as created: markers stripped), by name."""
    children = build_children(pool(spec), pod_monitor=True)
    return {
        child["metadata"]["name"]: strip_nones(child["spec"]["template"])
        for child in children
        if child["kind"] == "Deployment"
    }


@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_router_and_worker_pods_are_restricted(source: dict[str, Any]) -> None:
    templates = pods({"model": {"name": "meta-llama/Llama-3.1-8B", "source": source}})
    assert set(templates) == {naming.child_name("llama", role) for role in naming.COMPONENT_ROLES}
    for name, template in templates.items():
        assert violations(template["spec"], template["metadata"].get("annotations")) == [], name


def test_the_checker_refuses_what_restricted_namespaces_refuse() -> None:
    """The rules can fail: a node hostPath cache, root, and an Unconfined seccomp override."""
    host_path = pods({"model": {"name": "m", "source": {"hostPath": {"path": "/var/hf"}}}})
    assert violations(host_path["llama-decode"]["spec"]) == [
        "HostPath volumes: hf-cache",
        "volume types: hf-cache is ['hostPath']",
    ]
    root = pods({"model": {"name": "m"}, "podSecurityContext": {"runAsUser": 0}})
    assert violations(root["llama-router"]["spec"]) == ["running as non-root user: pod runAsUser 0"]
    unconfined = {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}}
    problems = violations(pods({"model": {"name": "m"}, **unconfined})["llama-prefill"]["spec"])
    assert problems[0] == "seccomp: pod Unconfined"


def test_pod_security_context_override_and_pull_secrets() -> None:
    spec = {
        "model": {"name": "m"},
        "podSecurityContext": {"runAsUser": 2000, "runAsGroup": 2000, "fsGroup": 2000},
        "imagePullSecrets": [{"name": "registry"}],
    }
    template = pods(spec)["llama-prefill"]["spec"]
    assert template["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "runAsGroup": 2000,
        "fsGroup": 2000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert template["imagePullSecrets"] == [{"name": "registry"}]
    assert violations(template) == []
    plain = build_children(pool(), pod_monitor=False)
    deployment = next(child for child in plain if child["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] is None, "absent, removed on patch"


@pytest.fixture()
def apiserver_options() -> dict[str, bool]:
    return {"pod_monitors": True, "peering": True}


async def test_the_operator_pod_of_the_chart_is_restricted(apiserver: ApiServer, tmp_path: Path) -> None:
    result = await helm_install(apiserver, {"imagePullSecrets": [{"name": "registry"}]}, tmp_path)
    assert result["error"] is None
    (deployment,) = objects(apiserver, "Deployment")
    template = deployment["spec"]["template"]
    assert violations(template["spec"], template["metadata"].get("annotations")) == []
    assert template["spec"]["imagePullSecrets"] == [{"name": "registry"}]
