"""The autoscaler's decisions as Prometheus series: desired vs ready replicas, the last scale's reason.

Status says the same per pool (`kubectl get inferencepool -o wide`); as series they reach the dashboard,
next to the latency the decisions answer. `PoolAutoscaler.evaluate` records every evaluation here, so
the operator (on --metrics-port) and `splitserve up` export the same thing. The names and labels are
the contract's (splitserve.contract.names.AUTOSCALER_*).

The last scale is an info-style series: one per pool and role, its value the Unix time of the last
change of replicas and its `reason` label the autoscaler's explanation. A new scale replaces the old
series, so however many decisions a pool sees, it keeps one series per role.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server

from splitserve.contract import names
from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator.autoscaling.policy import Decision

LabelValues = tuple[str, str, str]  # pool_namespace, pool, role


class AutoscalerMetrics:
    """The autoscaler's series of every pool it evaluates, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = names.AUTOSCALER_LABELS
        self.desired = Gauge(
            names.AUTOSCALER_DESIRED_REPLICAS,
            "Replicas the autoscaler wants for the worker pool",
            labels,
            registry=self.registry,
        )
        self.ready = Gauge(
            names.AUTOSCALER_READY_REPLICAS,
            "Replicas of the worker pool the autoscaler counted serving (exporting metrics)",
            labels,
            registry=self.registry,
        )
        self.last_scale = Gauge(
            names.AUTOSCALER_LAST_SCALE,
            "Unix time of the autoscaler's last change of the worker pool's replicas; `reason` says why",
            (*labels, "reason"),
            registry=self.registry,
        )
        self._reasons: dict[LabelValues, str] = {}

    def record(
        self,
        namespace: str | None,
        pool: str,
        decisions: Mapping[WorkerRole, Decision],
        ready: Mapping[WorkerRole, float | None],
        now: float,
    ) -> None:
        """One evaluation's outcome; `ready` is what the signals counted (None: unknown, left as was)."""
        for role, decision in decisions.items():
            key = (namespace or "", pool, role)
            self.desired.labels(*key).set(decision.desired)
            if (count := ready.get(role)) is not None:
                self.ready.labels(*key).set(count)
            if decision.desired != decision.current:
                if (previous := self._reasons.get(key)) is not None:
                    self.last_scale.remove(*key, previous)
                self._reasons[key] = decision.reason
                self.last_scale.labels(*key, decision.reason).set(now)

    def forget(self, namespace: str | None, pool: str) -> None:
        """Drop a pool's series: it was deleted, or its autoscaling turned off."""
        for role in WORKER_ROLES:
            key = (namespace or "", pool, role)
            self.desired.remove(*key)
            self.ready.remove(*key)
            if (previous := self._reasons.pop(key, None)) is not None:
                self.last_scale.remove(*key, previous)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
        """/metrics on `port` from a daemon thread (prometheus_client's server); port 0 picks a free one."""
        return start_http_server(port, host, registry=self.registry)
