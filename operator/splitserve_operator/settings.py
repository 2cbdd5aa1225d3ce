"""Operator-wide settings: what `splitserve operator` flags configure, shared by every pool."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_WORKER_IMAGE = "ghcr.io/splitserve/worker:0.1.0"


@dataclass(frozen=True)
class OperatorSettings:
    worker_image: str = DEFAULT_WORKER_IMAGE
    # Namespaces to watch; empty means cluster-wide.
    namespaces: tuple[str, ...] = ()
    # Where the autoscaler reads TTFT/ITL; None leaves autoscaling without metrics.
    prometheus_url: str | None = None
    # How often each pool looks for changes of its children (cheap: in-memory only).
    poll_seconds: float = 2.0
    # How often each pool is fully reconciled even when nothing was seen to change.
    resync_seconds: float = 60.0
    # Extra labels of every PodMonitor, e.g. {"release": "kube-prometheus-stack"}: the Prometheus
    # Operator selects PodMonitors by label (kube-prometheus-stack: its release label by default).
    pod_monitor_labels: dict[str, str] = field(default_factory=dict)
    # Where every PodMonitor goes, e.g. "monitoring"; None: each pool's own namespace (remote_monitor.py).
    pod_monitor_namespace: str | None = None
    # How long the answer to "are the monitoring.coreos.com CRDs installed?" is trusted.
    discovery_ttl_seconds: float = 300.0
    # How long a child found under another controller (ChildConflict) is taken as still there without
    # asking again; a spec change or an operator restart asks at once. Such a child carries no pool
    # label, so no watch event says when it goes.
    conflict_recheck_seconds: float = 300.0

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces
