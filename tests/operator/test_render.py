"""Pure spec -> manifest tests: no I/O, no kopf."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from splitserve.contract.config import EngineConfig, RoutingConfig
from splitserve_operator import naming
from splitserve_operator.diff import strip_nones
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.render import (
    Pool,
    build_children,
    build_deployment,
    build_pod_monitor,
    build_service,
    unwanted_children,
)


def pool(spec: dict[str, Any] | None = None, image: str = "worker:1") -> Pool:
    full = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, **(spec or {})}
    return Pool(name="llama", namespace="ml", spec=InferencePoolSpec.model_validate(full), image=image)


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(manifest["spec"]["template"]["spec"]["containers"][0])


def by_kind(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def test_children_names_and_labels() -> None:
    children = by_kind(build_children(pool(), pod_monitor=False))
    assert set(children) == {
        ("ConfigMap", "llama-engine"),
        ("PersistentVolumeClaim", "llama-model-cache"),
        ("Service", "llama-prefill"),
        ("Deployment", "llama-prefill"),
        ("Service", "llama-decode"),
        ("Deployment", "llama-decode"),
        ("Service", "llama-router"),
        ("Deployment", "llama-router"),
        ("PodDisruptionBudget", "llama-prefill"),
        ("PodDisruptionBudget", "llama-decode"),
        ("PodDisruptionBudget", "llama-router"),
    }
    decode = children["Deployment", "llama-decode"]
    assert decode["spec"]["selector"]["matchLabels"] == {
        "splitserve.io/pool": "llama",
        "splitserve.io/role": "decode",
    }
    assert decode["spec"]["template"]["metadata"]["labels"]["splitserve.io/role"] == "decode"
    assert all(naming.SPEC_HASH_ANNOTATION in c["metadata"]["annotations"] for c in children.values())


def test_engine_config_map_validates_as_the_workers_config() -> None:
    spec = {
        "model": {
            "name": "m",
            "revision": "abc",
            "servedName": "chat",
            "dtype": "bfloat16",
            "maxModelLen": 8192,
        },
        "prefill": {"chunkSize": 1024},
        "decode": {"maxNumSeqs": 128, "kvCacheBytes": "40Gi"},
        "kvTransfer": {"timeoutSeconds": 30, "maxTransferBytes": "2G"},
    }
    config_map = by_kind(build_children(pool(spec), pod_monitor=False))["ConfigMap", "llama-engine"]
    engine = EngineConfig.model_validate(json.loads(config_map["data"]["engine.json"]))
    assert engine == EngineConfig(
        model="m",
        revision="abc",
        served_model_name="chat",
        dtype="bfloat16",
        max_model_len=8192,
        prefill_chunk_size=1024,
        max_num_seqs=128,
        kv_cache_bytes=40 << 30,
        kv_timeout_seconds=30,
        max_transfer_bytes=2_000_000_000,
    )


def test_kv_cache_tiers_reach_the_engine_config_and_the_disk_volume_is_mounted_in_workers() -> None:
    spec = {
        "kvCache": {
            "blockSize": 32,
            "dtype": "int8",
            "host": {"size": "16Gi", "ttlSeconds": 600},
            "disk": {"volume": {"persistentVolumeClaim": {"claimName": "kv"}}, "size": "100Gi"},
        }
    }
    p = pool(spec)
    config_map = by_kind(build_children(p, pod_monitor=False))["ConfigMap", "llama-engine"]
    engine = EngineConfig.model_validate(json.loads(config_map["data"]["engine.json"]))
    assert (engine.block_size, engine.kv_cache_dtype, engine.enable_prefix_caching) == (32, "int8", True)
    assert (engine.kv_host_bytes, engine.kv_host_ttl_seconds) == (16 << 30, 600)
    assert (engine.kv_disk_path, engine.kv_disk_bytes, engine.kv_disk_ttl_seconds) == (
        "/var/cache/splitserve/kv",
        100 << 30,
        None,
    )
    volume = {"name": "kv-cache", "persistentVolumeClaim": {"claimName": "kv"}}
    mount = {"name": "kv-cache", "mountPath": "/var/cache/splitserve/kv"}
    for role in naming.WORKER_ROLES:
        deployment = build_deployment(p, role, "h")
        assert volume in deployment["spec"]["template"]["spec"]["volumes"]
        assert mount in container(deployment)["volumeMounts"]
    router = build_deployment(p, "router", "h")
    assert volume not in router["spec"]["template"]["spec"]["volumes"]


def test_kv_cache_defaults_prefix_caching_on_and_no_tiers() -> None:
    config_map = by_kind(build_children(pool(), pod_monitor=False))["ConfigMap", "llama-engine"]
    engine = EngineConfig.model_validate(json.loads(config_map["data"]["engine.json"]))
    assert engine.enable_prefix_caching and engine.kv_host_bytes == 0 and engine.kv_disk_path is None
    assert engine.kv_cache_dtype == "auto"


def test_routing_block_reaches_the_engine_config_with_the_routers_own_defaults() -> None:
    config_map = by_kind(build_children(pool(), pod_monitor=False))["ConfigMap", "llama-engine"]
    assert EngineConfig.model_validate_json(config_map["data"]["engine.json"]).routing == RoutingConfig()

    routing = {"strategy": "least-loaded", "cacheWeight": 2, "indexTTLSeconds": 30, "migrationLimit": 0}
    config_map = by_kind(build_children(pool({"routing": routing}), pod_monitor=False))[
        "ConfigMap", "llama-engine"
    ]
    engine = EngineConfig.model_validate_json(config_map["data"]["engine.json"])
    assert engine.routing == RoutingConfig(
        strategy="least-loaded", cache_weight=2.0, index_ttl_seconds=30.0, migration_limit=0
    )


@pytest.mark.parametrize(
    "routing",
    [{"strategy": "random"}, {"loadWeight": -1}, {"indexTTLSeconds": 0}, {"indexTtlSeconds": 5}, {"x": 1}],
)
def test_routing_block_is_validated(routing: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="routing"):
        InferencePoolSpec.model_validate({"model": {"name": "m"}, "routing": routing})


def test_worker_and_router_commands() -> None:
    p = pool(
        {
            "prefill": {"args": ["--foo"], "resources": {"requests": {"cpu": "3500m"}}},
            "decode": {"threads": 2},
            "kvTransfer": {"port": 9001},
            "router": {"service": {"port": 80}},
        }
    )
    prefill = container(build_deployment(p, "prefill", "h"))
    assert prefill["args"] == [
        "worker",
        "--drain-seconds",
        "300",
        "--role",
        "prefill",
        "--config",
        "/etc/splitserve/engine.json",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--pool",
        "llama",
        "--threads",
        "3",
        "--foo",
    ]
    decode = container(build_deployment(p, "decode", "h"))
    assert decode["args"][-4:] == ["--kv-port", "9001", "--threads", "2"]
    assert {"name": "kv", "containerPort": 9001, "protocol": "TCP"} in decode["ports"]
    router = container(build_deployment(p, "router", "h"))
    assert router["args"] == [
        "router",
        "--drain-seconds",
        "300",
        "--config",
        "/etc/splitserve/engine.json",
        "--host",
        "0.0.0.0",
        "--port",
        "80",
        "--pool",
        "llama",
        "--prefill",
        "http://llama-prefill.ml.svc:8000",
        "--decode",
        "http://llama-decode.ml.svc:8000",
    ]
    assert router["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert router["ports"][0]["containerPort"] == 80
    assert p.endpoint == "http://llama-router.ml.svc:80/v1"


def test_replicas_scheduling_and_markers() -> None:
    spec = {
        "decode": {
            "replicas": {"min": 2, "max": 8, "initial": 3},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "priorityClassName": "inference",
            "env": [{"name": "X", "value": "1"}],
        }
    }
    deployment = build_deployment(pool(spec), "decode", "h")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "inference"
    assert container(deployment)["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert container(deployment)["env"][-1] == {"name": "X", "value": "1"}, "user env comes last, so it wins"
    plain = build_deployment(pool(), "prefill", "h")["spec"]["template"]["spec"]
    assert plain["affinity"] is None and plain["nodeSelector"] is None, "None marks fields to remove on patch"
    assert "affinity" not in strip_nones(plain)
    assert "resources" not in container(build_deployment(pool(), "prefill", "h"))
    at_zero = pool({"prefill": {"replicas": {"min": 0, "max": 2}}})
    assert build_deployment(at_zero, "prefill", "h")["spec"]["replicas"] == 0


@pytest.mark.parametrize(
    ("source", "volume", "env"),
    [
        (
            {"pvc": {"claimName": "weights", "mountPath": "/models", "subPath": "llama"}},
            {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            None,
        ),
        (
            {"hostPath": {"path": "/var/hf"}},
            {"name": "hf-cache", "hostPath": {"path": "/var/hf", "type": "DirectoryOrCreate"}},
            {"name": "HF_HOME", "value": "/cache/huggingface"},
        ),
        (
            {"hub": {"tokenSecretRef": {"name": "hf", "key": "tok"}, "endpoint": "https://mirror"}},
            {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "llama-model-cache"}},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}},
        ),
        (
            {"hub": {"cache": {"enabled": False}}},
            {"name": "hf-cache", "emptyDir": {}},
            {"name": "HF_HOME", "value": "/cache/huggingface"},
        ),
    ],
)
def test_model_sources(source: dict[str, Any], volume: dict[str, Any], env: dict[str, Any] | None) -> None:
    p = pool({"model": {"name": "meta-llama/Llama-3.1-8B", "source": source}})
    for role in naming.COMPONENT_ROLES:  # the router tokenizes, so it needs the weights' tokenizer too
        deployment = build_deployment(p, role, "h")
        assert volume in deployment["spec"]["template"]["spec"]["volumes"]
        if env is not None:
            assert env in container(deployment)["env"]
    if "pvc" in source:
        mount = {"name": "model", "mountPath": "/models", "readOnly": True, "subPath": "llama"}
        assert mount in container(build_deployment(p, "decode", "h"))["volumeMounts"]


def test_services() -> None:
    p = pool({"router": {"service": {"type": "LoadBalancer", "port": 443}}})
    decode = build_service(p, "decode")["spec"]
    assert decode["clusterIP"] == "None", "headless: one A record per ready decode pod"
    assert [port["name"] for port in decode["ports"]] == ["http", "kv"]
    router = build_service(p, "router")["spec"]
    assert (
        router["type"] == "LoadBalancer" and router["ports"][0]["port"] == 443 and "clusterIP" not in router
    )


def test_scrape_annotations_and_pod_monitor() -> None:
    annotations = build_deployment(pool(), "router", "h")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    monitor = build_pod_monitor(pool({"autoscaling": {"intervalSeconds": 10}}))
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "10s"}]
    assert ("PodMonitor", "llama") in by_kind(build_children(pool(), pod_monitor=True))


def test_rendering_is_deterministic_and_config_changes_roll_pods() -> None:
    assert build_children(pool(), pod_monitor=True) == build_children(pool(), pod_monitor=True)

    def template_hash(spec: dict[str, Any]) -> str:
        deployment = by_kind(build_children(pool(spec), pod_monitor=False))["Deployment", "llama-decode"]
        return str(deployment["spec"]["template"]["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION])

    assert template_hash({}) != template_hash({"decode": {"maxNumSeqs": 8}})


def test_disruption_budgets_per_role_configurable_and_removed_when_off() -> None:
    spec = {
        "decode": {"disruptionBudget": {"maxUnavailable": 2}},
        "router": {"disruptionBudget": {"enabled": False}},
    }
    rendered = pool(spec)
    children = by_kind(build_children(rendered, pod_monitor=False))
    assert ("PodDisruptionBudget", "llama-router") not in children
    assert unwanted_children(rendered) == [("PodDisruptionBudget", "llama-router")]
    assert unwanted_children(pool()) == []
    prefill, decode = (
        children["PodDisruptionBudget", "llama-prefill"],
        children["PodDisruptionBudget", "llama-decode"],
    )
    assert prefill["apiVersion"] == "policy/v1"
    assert (prefill["spec"]["maxUnavailable"], decode["spec"]["maxUnavailable"]) == (1, 2)
    # Selects exactly the role's pods: the Deployment's own selector.
    assert decode["spec"]["selector"] == children["Deployment", "llama-decode"]["spec"]["selector"]


def test_drain_seconds_become_the_grace_period_and_the_flag() -> None:
    rendered = by_kind(build_children(pool({"decode": {"drainSeconds": 900}}), pod_monitor=False))
    for role, drain in (("prefill", 300), ("decode", 900), ("router", 300)):
        deployment = rendered["Deployment", f"llama-{role}"]
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == drain + 15
        args = container(deployment)["args"]
        assert args[0] == ("router" if role == "router" else "worker")
        assert args[args.index("--drain-seconds") + 1] == str(drain)
