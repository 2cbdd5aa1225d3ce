"""Pure spec -> manifest functions: the children of one InferencePool.

Every function returns plain dicts, the same for the same input, with no I/O. Optional fields the
operator owns are rendered as `None` when unset ("must be absent"): a merge patch then removes a
value that a previous spec set, and diff.strip_nones() drops the markers before a create.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve_operator import model_cache, naming, pod_security
from splitserve_operator.diff import strip_nones
from splitserve_operator.engine_configmap import build_engine_config_map
from splitserve_operator.models import InferencePoolSpec, Scheduling, WorkerPoolSpec
from splitserve_operator.quantity import cpu_threads

Manifest = dict[str, Any]

HF_CACHE = "/cache/huggingface"
# Model loading (a hub download of a large model included) may take this long before /health is 200.
STARTUP_BUDGET_SECONDS = 3600
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/path": "/metrics",
}


@dataclass(frozen=True)
class Pool:
    """What rendering needs to know about one InferencePool: its identity and a validated spec."""

    name: str
    namespace: str
    spec: InferencePoolSpec
    image: str  # spec.image, else the operator's default
    pod_monitor_labels: Mapping[str, str] = field(default_factory=dict)  # the operator's setting
    pod_monitor_namespace: str | None = None  # the operator's setting; None: the pool's namespace

    @property
    def router_port(self) -> int:
        return self.spec.router.service.port

    def service_url(self, role: naming.ComponentRole, port: int = naming.HTTP_PORT) -> str:
        return f"http://{naming.child_name(self.name, role)}.{self.namespace}.svc:{port}"

    @property
    def endpoint(self) -> str:
        """The router's OpenAI-compatible base URL inside the cluster."""
        return self.service_url("router", self.router_port) + "/v1"


def content_hash(text: str) -> str:
    """16 hex digits of SHA-256: annotations that change exactly when the content does."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_hash(manifest: Manifest) -> str:
    return content_hash(json.dumps(manifest, sort_keys=True))


def _meta(pool: Pool, name: str, role: naming.ComponentRole | None) -> Manifest:
    return {"name": name, "namespace": pool.namespace, "labels": naming.common_labels(pool.name, role)}


def _model_source(pool: Pool) -> tuple[list[Manifest], list[Manifest], list[Manifest]]:
    """Volumes, volume mounts and env vars that bring the weights (or the hub) to a container."""
    source = pool.spec.model.source
    if source.pvc is not None:
        mount: Manifest = {"name": "model", "mountPath": source.pvc.mount_path, "readOnly": True}
        if source.pvc.sub_path:
            mount["subPath"] = source.pvc.sub_path
        claim = {"claimName": source.pvc.claim_name, "readOnly": True}
        return [{"name": "model", "persistentVolumeClaim": claim}], [mount], []
    if source.host_path is not None:
        cache = source.host_path
        volume = {"name": "hf-cache", "hostPath": {"path": cache.path, "type": "DirectoryOrCreate"}}
        env: list[Manifest] = [{"name": "HF_HOME", "value": cache.mount_path}]
        return [volume], [{"name": "hf-cache", "mountPath": cache.mount_path}], env
    # The hub (also the default): download into the pool's model cache, else a pod-local one.
    env = [{"name": "HF_HOME", "value": HF_CACHE}]
    hub = source.hub
    if hub is not None and hub.token_secret_ref is not None:
        ref = hub.token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if hub is not None and hub.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hub.endpoint})
    cache_claim = model_cache.claim_name(pool)
    storage: Manifest = (
        {"persistentVolumeClaim": {"claimName": cache_claim}} if cache_claim else {"emptyDir": {}}
    )
    return [{"name": "hf-cache", **storage}], [{"name": "hf-cache", "mountPath": HF_CACHE}], env


def _probes(port: str) -> Manifest:
    """Startup covers model loading (/health is 503 until then); readiness gates traffic after.

    Liveness asks /health?live=1, which stays 200 while the process drains after SIGTERM (readiness
    turns 503 at once): a drain longer than liveness's minute must not end in a restart.
    """
    health = {"httpGet": {"path": "/health", "port": port}}
    live = {"httpGet": {"path": "/health?live=1", "port": port}}
    return {
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": STARTUP_BUDGET_SECONDS // 10},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**live, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
    }


def _resources(scheduling: Scheduling) -> Manifest | None:
    resources = {key: value for key, value in scheduling.resources.model_dump().items() if value}
    return resources or None


def _worker_args(pool: Pool, role: naming.ComponentRole, spec: WorkerPoolSpec) -> list[str]:
    args = [
        "worker",
        "--role",
        role,
        "--config",
        f"{naming.ENGINE_CONFIG_DIR}/{naming.ENGINE_CONFIG_KEY}",
        "--host",
        "0.0.0.0",
        "--port",
        str(naming.HTTP_PORT),
        "--pool",
        pool.name,
    ]
    if role == "decode":
        args += ["--kv-port", str(pool.spec.kv_transfer.port)]
    cpu = spec.resources.requests.get("cpu")
    threads = spec.threads if spec.threads is not None else (cpu_threads(cpu) if cpu else None)
    if threads is not None:
        args += ["--threads", str(threads)]
    return args + spec.args


def _router_args(pool: Pool) -> list[str]:
    return [
        "router",
        "--config",
        f"{naming.ENGINE_CONFIG_DIR}/{naming.ENGINE_CONFIG_KEY}",
        "--host",
        "0.0.0.0",
        "--port",
        str(pool.router_port),
        "--pool",
        pool.name,
        "--prefill",
        pool.service_url("prefill"),
        "--decode",
        pool.service_url("decode"),
    ]


def _ports(pool: Pool, role: naming.ComponentRole) -> list[Manifest]:
    http_port = pool.router_port if role == "router" else naming.HTTP_PORT
    ports = [{"name": "http", "containerPort": http_port, "protocol": "TCP"}]
    if role == "decode":
        ports.append({"name": "kv", "containerPort": pool.spec.kv_transfer.port, "protocol": "TCP"})
    return ports


def build_deployment(pool: Pool, role: naming.ComponentRole, config_hash: str) -> Manifest:
    """The Deployment of one role; `config_hash` rolls its pods when the engine settings change."""
    spec = pool.spec
    scheduling = scheduling_of(pool, role)
    replicas = spec.router.replicas if role == "router" else getattr(spec, role).replicas.start
    args = _router_args(pool) if role == "router" else _worker_args(pool, role, getattr(spec, role))
    args[1:1] = ["--drain-seconds", str(scheduling.drain_seconds)]  # after the subcommand
    volumes, mounts, env = _model_source(pool)
    disk = spec.kv_cache.disk
    if disk is not None and role != "router":  # the KV cache's disk tier
        volumes.append({"name": "kv-cache", **disk.volume})
        mounts.append({"name": "kv-cache", "mountPath": disk.mount_path})
    config_volume = {"name": "engine-config", "configMap": {"name": naming.engine_config_name(pool.name)}}
    config_mount = {"name": "engine-config", "mountPath": naming.ENGINE_CONFIG_DIR, "readOnly": True}
    http_port = pool.router_port if role == "router" else naming.HTTP_PORT
    container: Manifest = {
        "name": role,
        "image": pool.image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": args,
        "ports": _ports(pool, role),
        "env": [
            *env,
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *scheduling.env,
        ],
        "resources": _resources(scheduling),
        "volumeMounts": [config_mount, *mounts],
        "securityContext": pod_security.container_security_context(),
        **_probes("http"),
    }
    template_annotations = {
        **SCRAPE_ANNOTATIONS,
        "prometheus.io/port": str(http_port),
        naming.CONFIG_HASH_ANNOTATION: config_hash,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(pool, naming.child_name(pool.name, role), role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": naming.selector_labels(pool.name, role)},
            # Worker pods may spend the whole startup budget loading a model before they are ready.
            "progressDeadlineSeconds": 600 if role == "router" else STARTUP_BUDGET_SECONDS + 300,
            "template": {
                "metadata": {
                    "labels": naming.common_labels(pool.name, role),
                    "annotations": template_annotations,
                },
                "spec": {
                    # Inside a list a null is not "absent" to a merge patch: containers carry no markers.
                    "containers": [strip_nones(container)],
                    "volumes": [config_volume, *volumes],
                    "enableServiceLinks": False,
                    "securityContext": pod_security.pod_security_context(spec),
                    "imagePullSecrets": pod_security.image_pull_secrets(spec),
                    "terminationGracePeriodSeconds": scheduling.drain_seconds
                    + naming.DRAIN_EXIT_MARGIN_SECONDS,
                    "nodeSelector": scheduling.node_selector or None,
                    "tolerations": scheduling.tolerations or None,
                    "affinity": scheduling.affinity or None,
                    "priorityClassName": scheduling.priority_class_name,
                },
            },
        },
    }


def build_service(pool: Pool, role: naming.ComponentRole) -> Manifest:
    """Headless for workers (the router resolves one A record per ready pod); a plain one for the router."""
    spec: Manifest
    if role == "router":
        service = pool.spec.router.service
        port = {"name": "http", "port": service.port, "targetPort": "http", "protocol": "TCP"}
        spec = {"type": service.type, "ports": [port]}
    else:
        ports = [{"name": "http", "port": naming.HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]
        if role == "decode":
            kv = pool.spec.kv_transfer.port
            ports.append({"name": "kv", "port": kv, "targetPort": "kv", "protocol": "TCP"})
        spec = {"type": "ClusterIP", "clusterIP": "None", "ports": ports}
    spec["selector"] = naming.selector_labels(pool.name, role)
    metadata = _meta(pool, naming.child_name(pool.name, role), role)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def build_pod_monitor(pool: Pool) -> Manifest:
    """One PodMonitor for all roles: every splitserve container names its metrics port `http`."""
    interval = max(5, min(30, pool.spec.autoscaling.interval_seconds))
    metadata = _meta(pool, pool.name, None)
    # The operator's extra labels first: the pool's own (which its watches select on) always win.
    metadata["labels"] = {**pool.pod_monitor_labels, **metadata["labels"]}
    spec: Manifest = {
        "selector": {"matchLabels": {naming.POOL_LABEL: pool.name}},
        "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": f"{interval}s"}],
    }
    if pool.pod_monitor_namespace is not None:  # in the monitoring namespace, selecting the pool's pods
        metadata["name"] = naming.remote_monitor_name(pool.namespace, pool.name)
        metadata["namespace"] = pool.pod_monitor_namespace
        metadata["labels"][naming.POOL_NAMESPACE_LABEL] = pool.namespace
        spec["namespaceSelector"] = {"matchNames": [pool.namespace]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": spec,
    }


def scheduling_of(pool: Pool, role: naming.ComponentRole) -> Scheduling:
    return pool.spec.router if role == "router" else getattr(pool.spec, role)


def build_disruption_budget(pool: Pool, role: naming.ComponentRole) -> Manifest | None:
    """The role's PodDisruptionBudget: evictions (node drains) take at most maxUnavailable pods at a
    time, each of which then drains its streams within its grace period. None when disabled."""
    budget = scheduling_of(pool, role).disruption_budget
    if not budget.enabled:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(pool, naming.child_name(pool.name, role), role),
        "spec": {
            "maxUnavailable": budget.max_unavailable,
            "selector": {"matchLabels": naming.selector_labels(pool.name, role)},
        },
    }


def unwanted_children(pool: Pool) -> list[tuple[str, str]]:
    """(kind, name) of children the spec no longer wants: the budgets of roles that disabled theirs,
    and the PodMonitor in the pool's namespace once the operator puts it in another one."""
    unwanted = [
        ("PodDisruptionBudget", naming.child_name(pool.name, role))
        for role in naming.COMPONENT_ROLES
        if not scheduling_of(pool, role).disruption_budget.enabled
    ]
    if pool.pod_monitor_namespace is not None:
        unwanted.append(("PodMonitor", pool.name))
    return unwanted


def build_children(pool: Pool, *, pod_monitor: bool) -> list[Manifest]:
    """Every child of the pool, in creation order, each stamped with the hash of its rendering."""
    config_map = build_engine_config_map(pool.name, pool.namespace, pool.spec)
    config_hash = content_hash(config_map["data"][naming.ENGINE_CONFIG_KEY])
    children = [config_map]
    if (cache_claim := model_cache.build_model_cache_claim(pool)) is not None:
        children.append(cache_claim)
    for role in naming.COMPONENT_ROLES:
        children += [build_service(pool, role), build_deployment(pool, role, config_hash)]
        if (budget := build_disruption_budget(pool, role)) is not None:
            children.append(budget)
    if pod_monitor and pool.pod_monitor_namespace is None:  # else build_remote_pod_monitor's
        children.append(build_pod_monitor(pool))
    return [_stamped(child) for child in children]


def build_remote_pod_monitor(pool: Pool, *, pod_monitor: bool) -> Manifest | None:
    """The pool's PodMonitor when the operator puts it in another namespace (remote_monitor.py applies
    it, without an owner); None when it lives with the pool's other children or the CRD is absent."""
    if not pod_monitor or pool.pod_monitor_namespace is None:
        return None
    return _stamped(build_pod_monitor(pool))


def _stamped(child: Manifest) -> Manifest:
    """The child with the hash of its rendering as an annotation."""
    child["metadata"]["annotations"] = {naming.SPEC_HASH_ANNOTATION: spec_hash(child)}
    return child
