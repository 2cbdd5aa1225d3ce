"""The real kopf operator against the emulated apiserver: children, status, events, drift, no-ops."""

from __future__ import annotations

import json
from typing import Any

import pytest

from splitserve.contract.config import EngineConfig
from splitserve_operator.handlers import Controller

from .apiserver import eventually
from .conftest import NAMESPACE, TINY_SPEC, Cluster, path_of

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
CONFIGMAPS = "v1/configmaps"
ROLES = ("prefill", "decode", "router")


def children_exist(cluster: Cluster, pool: str) -> bool:
    return (
        all(
            cluster.get(DEPLOYMENTS, f"{pool}-{role}") and cluster.get(SERVICES, f"{pool}-{role}")
            for role in ROLES
        )
        and cluster.get(CONFIGMAPS, f"{pool}-engine") is not None
    )


async def mark_ready(cluster: Cluster, pool: str, roles: tuple[str, ...] = ROLES) -> None:
    """Play the Deployment controller: every desired replica is up to date and ready."""
    for role in roles:
        deployment = cluster.get(DEPLOYMENTS, f"{pool}-{role}")
        assert deployment is not None
        n = deployment["spec"]["replicas"]
        status = {
            "replicas": n,
            "readyReplicas": n,
            "updatedReplicas": n,
            "availableReplicas": n,
            "observedGeneration": deployment["metadata"]["generation"],
        }
        await cluster.patch(path_of("deployments", f"{pool}-{role}", status=True), {"status": status})


async def settled(runtime: Controller, pool: str, passes: int = 3) -> None:
    """Wait until the operator has run `passes` more reconciles of `pool`."""
    key = (NAMESPACE, pool)
    target = runtime.reconciled[key] + passes
    await eventually(lambda: runtime.reconciled[key] >= target, what=f"{passes} reconciles of {pool}")


async def test_children_owner_references_and_initial_status(cluster: Cluster, operator: Controller) -> None:
    created = await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    uid = created["metadata"]["uid"]
    for resource, name in [(CONFIGMAPS, "tiny-engine")] + [
        (r, f"tiny-{role}") for r in (DEPLOYMENTS, SERVICES) for role in ROLES
    ]:
        child = cluster.get(resource, name)
        assert child is not None
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "splitserve.io/v1alpha1",
            "kind": "InferencePool",
            "name": "tiny",
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert child["metadata"]["labels"]["splitserve.io/pool"] == "tiny"

    engine = EngineConfig.model_validate_json(cluster.get(CONFIGMAPS, "tiny-engine")["data"]["engine.json"])
    assert (engine.model, engine.max_model_len, engine.kv_cache_bytes) == (
        "/opt/splitserve/models/tiny",
        256,
        64 << 20,
    )
    router = cluster.get(DEPLOYMENTS, "tiny-router")["spec"]["template"]["spec"]["containers"][0]
    assert router["image"] == "splitserve/worker:test"
    assert router["args"][router["args"].index("--prefill") + 1] == "http://tiny-prefill.serving.svc:8000"
    assert cluster.get(SERVICES, "tiny-decode")["spec"]["clusterIP"] == "None"

    ready = await eventually(lambda: cluster.condition("tiny", "Ready"), what="Ready condition")
    assert (ready["status"], ready["reason"]) == ("False", "NotReady")
    status = cluster.pool("tiny")["status"]
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://tiny-router.serving.svc:8000/v1"
    # The reconciler's fields (the autoscaler's timer may add its own, e.g. `reason`, at any moment).
    reconciled = {
        key: status["prefill"].get(key) for key in ("replicas", "readyReplicas", "desiredReplicas", "ready")
    }
    assert reconciled == {"replicas": 0, "readyReplicas": 0, "desiredReplicas": 1, "ready": "0/1"}
    assert cluster.condition("tiny", "Progressing")["reason"] == "RollingOut"
    await eventually(lambda: any(e["reason"] == "Created" for e in cluster.events("tiny")), what="event")


async def test_ready_once_every_role_serves(cluster: Cluster, operator: Controller) -> None:
    await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    await mark_ready(cluster, "tiny", ("prefill", "decode"))
    await settled(operator, "tiny")
    assert cluster.condition("tiny", "Ready")["status"] == "False"
    assert "router" in cluster.condition("tiny", "Ready")["message"]
    await mark_ready(cluster, "tiny", ("router",))
    ready = await eventually(
        lambda: (c := cluster.condition("tiny", "Ready")) and c["status"] == "True" and c, what="Ready=True"
    )
    assert ready["message"] == "prefill 1/1, decode 1/1, router 1/1 ready"
    status = cluster.pool("tiny")["status"]
    assert status["decode"]["ready"] == "1/1" and status["router"] == {"replicas": 1, "readyReplicas": 1}
    assert cluster.condition("tiny", "Progressing")["reason"] == "Stable"
    assert cluster.condition("tiny", "Degraded")["status"] == "False"
    await eventually(lambda: any(e["reason"] == "Ready" for e in cluster.events("tiny")), what="Ready event")


async def test_no_op_resync_makes_no_write(cluster: Cluster, operator: Controller) -> None:
    await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    await mark_ready(cluster, "tiny")
    await eventually(lambda: cluster.condition("tiny", "Ready")["status"] == "True", what="Ready")
    await settled(operator, "tiny", passes=2)
    mark = cluster.server.count()
    await settled(operator, "tiny", passes=4)  # full resyncs: resync_seconds is short in tests
    assert cluster.server.writes(mark) == []


async def test_drift_is_corrected_but_autoscaled_replicas_are_kept(
    cluster: Cluster, operator: Controller
) -> None:
    await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    path = path_of("deployments", "tiny-decode")
    original = cluster.get(DEPLOYMENTS, "tiny-decode")["spec"]["template"]["spec"]["containers"]
    hacked = [{**original[0], "image": "evil:latest"}]
    # The autoscaler (or a person) scales; someone else edits the image by hand.
    await cluster.patch(path, {"spec": {"replicas": 2, "template": {"spec": {"containers": hacked}}}})
    await eventually(
        lambda: cluster.get(DEPLOYMENTS, "tiny-decode")["spec"]["template"]["spec"]["containers"] == original,
        what="image restored",
    )
    assert cluster.get(DEPLOYMENTS, "tiny-decode")["spec"]["replicas"] == 2
    await cluster.request("DELETE", path_of("services", "tiny-prefill"))
    await eventually(lambda: cluster.get(SERVICES, "tiny-prefill"), what="service recreated")
    await settled(operator, "tiny")
    assert cluster.get(DEPLOYMENTS, "tiny-decode")["spec"]["replicas"] == 2


async def test_replicas_follow_spec_without_autoscaling(cluster: Cluster, operator: Controller) -> None:
    spec: dict[str, Any] = {
        **TINY_SPEC,
        "autoscaling": {"enabled": False},
        "prefill": {"replicas": {"min": 1, "max": 4, "initial": 2}},
    }
    await cluster.create_pool("fixed", spec)
    await eventually(lambda: children_exist(cluster, "fixed"), what="children")
    assert cluster.get(DEPLOYMENTS, "fixed-prefill")["spec"]["replicas"] == 2
    await cluster.patch(path_of("deployments", "fixed-prefill"), {"spec": {"replicas": 5}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "fixed-prefill")["spec"]["replicas"] == 2, what="reset")
    await cluster.patch(
        path_of("inferencepools", "fixed"), {"spec": {"prefill": {"replicas": {"initial": 3}}}}
    )
    await eventually(
        lambda: cluster.get(DEPLOYMENTS, "fixed-prefill")["spec"]["replicas"] == 3, what="scaled"
    )
    await eventually(
        lambda: any(
            e["reason"] == "Scaled" and "from 2 to 3" in e["message"] for e in cluster.events("fixed")
        ),
        what="Scaled event",
    )
    await eventually(
        lambda: cluster.pool("fixed")["status"]["prefill"]["desiredReplicas"] == 3, what="desired"
    )


async def test_spec_change_rolls_out(cluster: Cluster, operator: Controller) -> None:
    await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    await eventually(
        lambda: cluster.pool("tiny").get("status", {}).get("observedGeneration") == 1, what="gen 1"
    )

    def config_hash() -> str:
        template = cluster.get(DEPLOYMENTS, "tiny-prefill")["spec"]["template"]
        return str(template["metadata"]["annotations"]["splitserve.io/engine-config-hash"])

    before = config_hash()
    await cluster.patch(path_of("inferencepools", "tiny"), {"spec": {"model": {"maxModelLen": 512}}})
    await eventually(
        lambda: (
            json.loads(cluster.get(CONFIGMAPS, "tiny-engine")["data"]["engine.json"])["max_model_len"] == 512
        ),
        what="engine config",
    )
    await eventually(lambda: config_hash() != before, what="pods rolled by the config hash")
    await eventually(lambda: cluster.pool("tiny")["status"]["observedGeneration"] == 2, what="gen 2")


async def test_invalid_spec_is_reported_and_other_pools_are_served(
    cluster: Cluster, operator: Controller
) -> None:
    bad = {
        **TINY_SPEC,
        "prefill": {"replicas": {"min": 3, "max": 2}},
        "model": {"name": "m", "dtype": "int3"},
    }
    await cluster.create_pool("broken", bad)
    await cluster.create_pool("fine")
    await eventually(lambda: children_exist(cluster, "fine"), what="the valid pool's children")
    ready = await eventually(lambda: cluster.condition("broken", "Ready"), what="Ready on the broken pool")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.prefill.replicas: replicas.min (3) must be <= replicas.max (2)" in ready["message"]
    assert "spec.model.dtype" in ready["message"]
    assert cluster.condition("broken", "Degraded")["status"] == "True"
    assert cluster.get(DEPLOYMENTS, "broken-prefill") is None
    await eventually(
        lambda: any(
            e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in cluster.events("broken")
        ),
        what="Warning event",
    )
    # Fixing the spec brings the pool up.
    await cluster.patch(
        path_of("inferencepools", "broken"),
        {"spec": {"prefill": {"replicas": {"min": 1}}, "model": {"dtype": "auto"}}},
    )
    await eventually(lambda: children_exist(cluster, "broken"), what="children after the fix")
    await eventually(lambda: cluster.condition("broken", "Ready")["reason"] == "NotReady", what="reason")


async def test_child_the_apiserver_rejects_is_reported(cluster: Cluster, operator: Controller) -> None:
    await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    rejection = {"kind": "Status", "reason": "Invalid", "message": "ConfigMap is invalid: too large"}
    cluster.server["post", "/api/v1/namespaces/serving/configmaps"] << 422 << rejection
    await cluster.request("DELETE", path_of("configmaps", "tiny-engine"))
    ready = await eventually(
        lambda: (c := cluster.condition("tiny", "Ready")) and c["reason"] == "ApplyFailed" and c,
        what="ApplyFailed",
    )
    assert ready["message"] == "ConfigMap tiny-engine: ConfigMap is invalid: too large"


@pytest.mark.parametrize("apiserver_options", [{"pod_monitors": True}])
async def test_pod_monitor_when_the_crd_is_installed(cluster: Cluster, operator: Controller) -> None:
    await cluster.create_pool("tiny")
    monitor = await eventually(
        lambda: cluster.get("monitoring.coreos.com/v1/podmonitors", "tiny"), what="PodMonitor"
    )
    assert monitor["spec"]["selector"] == {"matchLabels": {"splitserve.io/pool": "tiny"}}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"


async def test_no_pod_monitor_without_the_crd(cluster: Cluster, operator: Controller) -> None:
    await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    template = cluster.get(DEPLOYMENTS, "tiny-decode")["spec"]["template"]["metadata"]["annotations"]
    assert template["prometheus.io/scrape"] == "true" and template["prometheus.io/port"] == "8000"
    assert not [r for r in cluster.server.writes() if "podmonitors" in str(r.url)]


async def test_missing_token_secret(cluster: Cluster, operator: Controller) -> None:
    spec = {
        **TINY_SPEC,
        "model": {"name": "org/gated", "source": {"hub": {"tokenSecretRef": {"name": "hf"}}}},
    }
    await cluster.create_pool("gated", spec)
    ready = await eventually(
        lambda: (c := cluster.condition("gated", "Ready")) and c["reason"] == "SecretNotFound" and c,
        what="SecretNotFound",
    )
    assert "Secret hf" in ready["message"]
    assert children_exist(cluster, "gated"), "workloads are created anyway; they start once the Secret exists"
    decode = cluster.get(DEPLOYMENTS, "gated-decode")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in decode[
        "env"
    ]
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf", "namespace": NAMESPACE},
        "data": {"token": "aGY="},
    }
    await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", secret, "application/json")
    await eventually(lambda: cluster.condition("gated", "Ready")["reason"] == "NotReady", what="secret found")


async def test_deleted_pool_takes_its_children_along(cluster: Cluster, operator: Controller) -> None:
    await cluster.create_pool("tiny")
    await eventually(lambda: children_exist(cluster, "tiny"), what="children")
    await cluster.request("DELETE", path_of("inferencepools", "tiny"))
    await eventually(
        lambda: cluster.get("splitserve.io/v1alpha1/inferencepools", "tiny") is None,
        what="finalizer released",
    )
    await eventually(lambda: cluster.get(DEPLOYMENTS, "tiny-decode") is None, what="garbage collected")
    mark = cluster.server.count()
    await cluster.create_pool("other")  # the operator keeps working, and does not resurrect "tiny"
    await eventually(lambda: children_exist(cluster, "other"), what="other pool")
    await settled(operator, "other")
    resurrected = [
        r
        for r in cluster.server.writes(mark)
        if isinstance(r.data, dict) and r.data.get("metadata", {}).get("name", "").startswith("tiny-")
    ]
    assert resurrected == []
    assert cluster.get(DEPLOYMENTS, "tiny-decode") is None
