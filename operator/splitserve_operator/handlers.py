"""kopf wiring: indexes of children, InferencePool handlers and the resync timer. Thin on purpose.

Children are watched (one stream per kind, filtered by the pool label) into in-memory indexes, so a
reconcile reads nothing from the apiserver. A child event marks its pool dirty; the pool's timer
picks that up within `poll_seconds` (hand edits and deletions are undone, readiness shows in status)
and otherwise runs a full reconcile every `resync_seconds`. Status goes through kopf's `patch`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator import naming
from splitserve_operator.api_base import API_GROUP, API_VERSION, PLURAL
from splitserve_operator.apply import TransientError
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler, signal_query
from splitserve_operator.autoscaling.exporter import AutoscalerMetrics
from splitserve_operator.autoscaling.signals import (
    PrometheusSource,
    SignalsUnavailableError,
    UnconfiguredSource,
)
from splitserve_operator.conditions import now_rfc3339
from splitserve_operator.deletion_cost import before_decode_scale_down
from splitserve_operator.kube import KINDS, Credentials, KubeClient
from splitserve_operator.kv_status import (
    KvFigures,
    kv_queries,
    recorded_problem,
    status_patch,
    transfer_problem,
)
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.reconcile import Object, Reconciler
from splitserve_operator.remote_monitor import delete_recorded
from splitserve_operator.settings import OperatorSettings
from splitserve_operator.status import Problem
from splitserve_operator.status_models import InferencePoolStatus

logger = logging.getLogger("splitserve.operator")

POOLS = (API_GROUP, API_VERSION, PLURAL)
CHILD_LABELS = {naming.POOL_LABEL: kopf.PRESENT}
# Kinds the operator creates, and the index each one lives in.
CHILD_INDEXES = {
    kind: f"children_{KINDS[kind].plural}"
    for kind in (
        "ConfigMap",
        "PersistentVolumeClaim",
        "Service",
        "Deployment",
        "PodMonitor",
        "PodDisruptionBudget",
    )
}


class ChildView:
    """Children as the watch streams last saw them, from kopf's indexes."""

    def __init__(self, indexes: Mapping[str, Any]) -> None:
        self._indexes = {kind: indexes[index_id] for kind, index_id in CHILD_INDEXES.items()}

    def get(self, kind: str, namespace: str, name: str) -> Object | None:
        store = self._indexes[kind].get((namespace, name))
        return next(iter(store), None) if store is not None else None


@dataclass
class Controller:
    """The operator's per-process state and what its handlers do: reconcile a pool, run its autoscaler."""

    settings: OperatorSettings
    credentials: Credentials
    client: KubeClient = field(init=False)
    reconciler: Reconciler = field(init=False)
    autoscaler: PoolAutoscaler = field(init=False)
    dirty: set[tuple[str, str]] = field(default_factory=set)
    last_full: dict[tuple[str, str], float] = field(default_factory=dict)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # The autoscaler's latest MetricsAvailable per pool; the reconciler writes it with the other conditions.
    metrics_conditions: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # The latest verdict on each pool's KV transfers (kv_status.py); the reconciler writes it as Degraded.
    kv_problems: dict[tuple[str, str], Problem | None] = field(default_factory=dict)
    prometheus: PrometheusSource | None = field(init=False)
    # Completed reconciles per pool: progress for logs, probes, tests and the bench.
    reconciled: Counter[tuple[str, str]] = field(default_factory=Counter)
    # The autoscaler's decisions as series (served by main on --metrics-port).
    metrics: AutoscalerMetrics = field(default_factory=AutoscalerMetrics)
    _pod_monitors: tuple[float, bool] | None = None

    def __post_init__(self) -> None:
        self.client = KubeClient(self.credentials)
        self.reconciler = Reconciler(self.client, self.settings)
        url = self.settings.prometheus_url
        self.prometheus = PrometheusSource(url) if url else None
        self.autoscaler = PoolAutoscaler(self.prometheus or UnconfiguredSource(), self.metrics)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """One reconcile (or autoscaler step) at a time per pool."""
        return self.locks.setdefault((namespace, name), asyncio.Lock())

    def mark_dirty(self, namespace: str, pool: str) -> None:
        if (namespace, pool) in self.last_full:  # only pools this process manages
            self.dirty.add((namespace, pool))

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self.dirty.discard(key)
        self.last_full.pop(key, None)
        self.locks.pop(key, None)
        self.reconciled.pop(key, None)
        self.metrics_conditions.pop(key, None)
        self.kv_problems.pop(key, None)
        self.reconciler.forget(namespace, name)
        self.metrics.forget(namespace, name)

    def due(self, namespace: str, name: str) -> bool:
        key = (namespace, name)
        last = self.last_full.get(key)
        return key in self.dirty or last is None or time.monotonic() - last >= self.settings.resync_seconds

    async def pod_monitors(self) -> bool:
        """Whether the Prometheus Operator's PodMonitor CRD is installed (re-asked after a TTL)."""
        now = time.monotonic()
        if self._pod_monitors is None or now - self._pod_monitors[0] > self.settings.discovery_ttl_seconds:
            kind = KINDS["PodMonitor"]
            served = await self.client.has_resource(kind.api_version, kind.plural)
            self._pod_monitors = (now, served)
        return self._pod_monitors[1]

    async def reconcile(
        self, body: kopf.Body, patch: kopf.Patch, indexes: Mapping[str, Any], *, recheck: bool
    ) -> None:
        """Reconcile one pool and hand its status changes to kopf's patch; events go out via kopf."""
        namespace, name = body.metadata.namespace or "", body.metadata.name or ""
        async with self.lock(namespace, name):
            key = (namespace, name)
            self.dirty.discard(key)
            self.last_full[key] = time.monotonic()
            try:
                outcome = await self.reconciler.reconcile(
                    body,
                    ChildView(indexes),
                    pod_monitor=await self.pod_monitors(),
                    recheck=recheck,
                    now=now_rfc3339(),
                    metrics_available=self.metrics_conditions.get(key),
                    kv_problem=self._kv_problem(key, body.status or {}),
                )
            except TransientError as exc:
                self.dirty.add(key)
                raise kopf.TemporaryError(str(exc), delay=5) from exc
            self.reconciled[key] += 1
        for key_, value in outcome.status_patch.items():
            patch.status[key_] = value
        for key_, annotation in outcome.annotations.items():
            patch.metadata.annotations[key_] = annotation
        for event in outcome.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
            logger.info("%s/%s %s: %s", namespace, name, event.reason, event.message)

    def _kv_problem(self, key: tuple[str, str], status: Mapping[str, Any]) -> Problem | None:
        """The KV verdict to write: the latest reading's, else what status records (after a restart)."""
        return self.kv_problems[key] if key in self.kv_problems else recorded_problem(status)

    async def observe_kv(
        self, body: kopf.Body, patch: kopf.Patch, spec: InferencePoolSpec, memo: kopf.Memo
    ) -> None:
        """Once per evaluation interval, autoscaled or not: the pool's KV-sharing figures into status and
        the verdict on its transfers to the reconciler (kv_status.py). While Prometheus cannot answer,
        both keep what they were (MetricsAvailable says why on autoscaled pools)."""
        if self.prometheus is None:
            return
        now = time.monotonic()
        last: float | None = memo.get("kv_observed")
        if last is not None and now - last < spec.autoscaling.interval_seconds:
            return
        memo["kv_observed"] = now
        namespace, name = body.metadata.namespace or "", body.metadata.name or ""
        query = signal_query(namespace, name, spec)
        try:
            vectors = await self.prometheus.vectors(kv_queries(query))
        except SignalsUnavailableError:
            return
        figures = KvFigures.from_vectors(vectors, query.window_seconds)
        for key_, value in status_patch(body.status or {}, figures).items():
            patch.status[key_] = value
        key, problem = (namespace, name), transfer_problem(figures)
        if self._kv_problem(key, body.status or {}) != problem:
            self.dirty.add(key)  # the reconciler writes conditions, within poll_seconds
        self.kv_problems[key] = problem

    async def autoscale(
        self, body: kopf.Body, patch: kopf.Patch, indexes: Mapping[str, Any], memo: kopf.Memo
    ) -> None:
        """One autoscaler step for the pool (autoscaling/evaluator.py decides and scales); this writes
        its status fields, hands MetricsAvailable to the reconciler and posts the events. The KV
        figures are read on the same timer, also for pools without autoscaling."""
        namespace, name = body.metadata.namespace or "", body.metadata.name or ""
        spec = _validated_spec(body, memo)
        if spec is None:
            return  # the reconciler reports invalid specs
        await self.observe_kv(body, patch, spec, memo)
        if not spec.autoscaling.enabled:
            if memo.pop("autoscaler", None) is not None:
                self.metrics.forget(namespace, name)
            return
        state: AutoscalerState | None = memo.get("autoscaler")
        if state is None:  # first sight since this operator started: carry on from status
            recorded = InferencePoolStatus.model_validate(body.status or {})
            state = memo["autoscaler"] = AutoscalerState.resume(recorded)
        children = ChildView(indexes)
        replicas = {
            role: _replicas(children.get("Deployment", namespace, naming.child_name(name, role)))
            for role in WORKER_ROLES
        }

        async def scale(role: WorkerRole, count: int) -> None:
            if role == "decode" and count < (replicas[role] or 0):
                await before_decode_scale_down(self.client, namespace, name)
            body_ = {"spec": {"replicas": count}}
            await self.client.merge_patch("Deployment", namespace, naming.child_name(name, role), body_)

        async with self.lock(namespace, name):
            applied = await self.autoscaler.step(
                namespace, name, spec, state, replicas, body.status or {}, time.time(), scale
            )
        if applied is None:
            return
        for pool_role, fields in applied.status_patch.items():
            patch.status[pool_role] = fields  # merged: the reconciler owns the other PoolStatus fields
        if self.metrics_conditions.get((namespace, name)) != applied.condition:
            self.metrics_conditions[(namespace, name)] = applied.condition
            self.dirty.add((namespace, name))  # the reconciler writes conditions, within poll_seconds
        for event in applied.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _replicas(deployment: Object | None) -> int | None:
    return None if deployment is None else int(deployment.get("spec", {}).get("replicas", 0))


def _validated_spec(body: kopf.Body, memo: kopf.Memo) -> InferencePoolSpec | None:
    """The pool's spec, validated once per generation: the autoscale timer ticks every second."""
    generation = body.metadata.get("generation")
    cached: tuple[Any, InferencePoolSpec | None] | None = memo.get("spec")
    if cached is None or cached[0] != generation:
        try:
            cached = (generation, InferencePoolSpec.model_validate(body.spec))
        except ValidationError:
            cached = (generation, None)
        memo["spec"] = cached
    return cached[1]


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    """The child as stored in an index, without managedFields (often the biggest part of an object)."""
    data = dict(body)
    data["metadata"] = {k: v for k, v in body.metadata.items() if k != "managedFields"}
    return data


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Register every handler of the operator on `registry`, bound to `controller`."""
    settings = controller.settings

    for kind, index_id in CHILD_INDEXES.items():
        resource = KINDS[kind]
        group, _, version = resource.api_version.rpartition("/")
        selector = (group, version, resource.plural) if group else (version, resource.plural)

        @kopf.index(*selector, labels=CHILD_LABELS, id=index_id, registry=registry)
        def index_child(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
            return {(namespace, name): _snapshot(body)}

        @kopf.on.event(*selector, labels=CHILD_LABELS, id=f"watch_{resource.plural}", registry=registry)
        def child_changed(
            namespace: str | None, name: str, labels: kopf.Labels, kind: str = kind, **_: Any
        ) -> None:
            controller.reconciler.seen(kind, namespace or "", name)
            controller.mark_dirty(namespace or "", labels[naming.POOL_LABEL])

    @kopf.on.resume(*POOLS, registry=registry)
    @kopf.on.create(*POOLS, registry=registry)
    @kopf.on.update(*POOLS, registry=registry)
    async def reconcile_pool(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        await controller.reconcile(body, patch, kwargs, recheck=True)

    poll = settings.poll_seconds

    @kopf.timer(*POOLS, interval=poll, initial_delay=poll, registry=registry)
    async def resync_pool(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        if controller.due(body.metadata.namespace or "", body.metadata.name or ""):
            await controller.reconcile(body, patch, kwargs, recheck=False)

    # kopf timers have a fixed interval; each pool's own intervalSeconds is checked inside.
    @kopf.timer(*POOLS, interval=1.0, initial_delay=poll, registry=registry)
    async def autoscale_pool(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kwargs: Any) -> None:
        await controller.autoscale(body, patch, kwargs, memo)

    @kopf.on.event(*POOLS, registry=registry)
    def pool_event(type: str, namespace: str | None, name: str, **_: Any) -> None:
        if type == "DELETED":
            controller.forget(namespace or "", name)

    # Pools that record a PodMonitor in another namespace: no ownerReference deletes that one.
    @kopf.on.delete(*POOLS, annotations={naming.POD_MONITOR_ANNOTATION: kopf.PRESENT}, registry=registry)
    async def delete_remote_monitor(annotations: kopf.Annotations, **_: Any) -> None:
        await delete_recorded(controller.client, annotations[naming.POD_MONITOR_ANNOTATION])

    @kopf.on.cleanup(registry=registry)
    async def close_client(**_: Any) -> None:
        await controller.client.close()
