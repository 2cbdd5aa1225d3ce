"""One idempotent reconcile of one InferencePool: validate, apply children, compute status.

Called from every kopf entry point (create, update, resume, the resync timer), so it assumes nothing
about what ran before: children are looked up, created when missing, patched only when a field the
operator sets differs (hand edits included), and left alone otherwise. A run with nothing to change
makes no write call. Replica counts of autoscaled pools are written only at creation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from splitserve.contract.errors import one_line
from splitserve_operator import naming
from splitserve_operator.apply import ConflictError, apply_child, call_api, owned
from splitserve_operator.conditions import Event, get_condition
from splitserve_operator.deletion_cost import before_decode_scale_down
from splitserve_operator.diff import merge_diff
from splitserve_operator.kube import ApiError, KubeClient
from splitserve_operator.kv_status import kv_events
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.remote_monitor import RemoteMonitors
from splitserve_operator.render import Manifest, Pool, build_children, unwanted_children
from splitserve_operator.settings import OperatorSettings
from splitserve_operator.status import Problem, build_status

Object = Mapping[str, Any]
# How long a child we wrote stands in for its not-yet-indexed watch event.
WRITTEN_TTL_SECONDS = 30.0
# Ready=False reasons that deserve a Warning event (the others are ordinary progress).
WARNING_REASONS = frozenset({"InvalidSpec", "SecretNotFound", "ApplyFailed", "ChildConflict"})


class Children(Protocol):
    """The operator's view of existing children (kopf indexes in production)."""

    def get(self, kind: str, namespace: str, name: str) -> Object | None: ...


@dataclass
class Outcome:
    status_patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    annotations: dict[str, str | None] = field(default_factory=dict)  # the pool's, to set (None: remove)


def parse(body: Object, settings: OperatorSettings) -> tuple[Pool | None, Problem | None]:
    """The validated pool, or the reason it is invalid (what the CRD schema could not refuse)."""
    meta = body.get("metadata") or {}
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
    problem = naming.pool_name_problem(name)
    if problem:
        return None, Problem("InvalidSpec", f"metadata.{problem}")
    try:
        spec = InferencePoolSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        return None, Problem("InvalidSpec", one_line(exc, root="spec"))
    image = spec.image or settings.worker_image
    pool = Pool(
        name,
        namespace,
        spec,
        image,
        pod_monitor_labels=settings.pod_monitor_labels,
        pod_monitor_namespace=settings.pod_monitor_namespace,
    )
    return pool, None


async def check_secret(client: KubeClient, pool: Pool) -> Problem | None:
    """Whether the hub token Secret exists with its key (else pods hang in CreateContainerConfigError)."""
    hub = pool.spec.model.source.hub
    ref = hub.token_secret_ref if hub is not None else None
    if ref is None:
        return None
    secret = await call_api(client.get("Secret", pool.namespace, ref.name))
    if secret is None:
        where = "spec.model.source.hub.tokenSecretRef"
        return Problem("SecretNotFound", f"Secret {ref.name} ({where}) not found")
    if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
        return Problem("SecretNotFound", f"Secret {ref.name} has no key {ref.key!r}")
    return None


def _endpoint(pool: Pool, service: Object | None) -> str:
    """The router's base URL: the load balancer's address once it has one, else the cluster DNS name."""
    ingress = (((service or {}).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    if pool.spec.router.service.type == "LoadBalancer" and ingress:
        host = ingress[0].get("hostname") or ingress[0].get("ip")
        if host:
            return f"http://{host}:{pool.router_port}/v1"
    return pool.endpoint


def _lowers(desired: Manifest, actual: Object | None) -> bool:
    """Whether applying `desired` lowers the live Deployment's replicas."""
    live = ((actual or {}).get("spec") or {}).get("replicas")
    return live is not None and desired["spec"].get("replicas", live) < live


def _scale_event(desired: Manifest, before: Object) -> Event | None:
    if desired["kind"] != "Deployment":
        return None
    old = (before.get("spec") or {}).get("replicas")
    new = desired["spec"].get("replicas")
    if old is None or new is None or old == new:
        return None
    return Event("Normal", "Scaled", f"Scaled {desired['metadata']['name']} from {old} to {new} replicas")


def _transition_events(before: Object, after: list[dict[str, Any]]) -> list[Event]:
    """An event when Ready flips or changes its reason (not on every count change)."""
    old, new = get_condition(before.get("conditions") or [], naming.READY), get_condition(after, naming.READY)
    if new is None or (old is not None and (old["status"], old["reason"]) == (new["status"], new["reason"])):
        return []
    if new["status"] == "True":
        return [Event("Normal", "Ready", new["message"])]
    if new["reason"] in WARNING_REASONS:
        return [Event("Warning", new["reason"], new["message"])]
    return []


def _drop_children(memory: dict[tuple[str, str, str], Any], namespace: str, pool: str) -> None:
    """Remove the entries of `pool`'s children from a memory keyed by (kind, namespace, name)."""
    mine = {
        pool,
        naming.engine_config_name(pool),
        *(naming.child_name(pool, r) for r in naming.COMPONENT_ROLES),
    }
    for key in [k for k in memory if k[1] == namespace and k[2] in mine]:
        del memory[key]


class Reconciler:
    """Reconciles pools; remembers Secret checks so periodic resyncs do not re-read Secrets."""

    def __init__(self, client: KubeClient, settings: OperatorSettings) -> None:
        self.client = client
        self.settings = settings
        self._secret_checks: dict[tuple[str, str], tuple[float, Problem | None]] = {}
        # Children this process wrote whose watch event may not have reached the index yet.
        self._written: dict[tuple[str, str, str], tuple[float, Object]] = {}
        # Children found under another controller, so a resync does not POST them again (409) and GET.
        self._conflicts: dict[tuple[str, str, str], tuple[float, Object]] = {}
        self.remote_monitors = RemoteMonitors(client, settings)

    def seen(self, kind: str, namespace: str, name: str) -> None:
        """A watch event of this child arrived: from now on the index knows it better than we do."""
        self._written.pop((kind, namespace, name), None)

    def _current(self, children: Children, kind: str, namespace: str, name: str) -> Object | None:
        """The child as the index has it, or as we last wrote it if the index has not caught up.

        Saves a create that would answer 409 (and the read after it) when a reconcile follows
        the first one before the watch stream delivered its creations.
        """
        indexed = children.get(kind, namespace, name)
        if indexed is not None:
            return indexed
        now = time.monotonic()
        written = self._written.get((kind, namespace, name))
        if written is not None and now - written[0] < WRITTEN_TTL_SECONDS:
            return written[1]
        conflict = self._conflicts.get((kind, namespace, name))
        if conflict is not None and now - conflict[0] < self.settings.conflict_recheck_seconds:
            return conflict[1]
        return None

    def forget(self, namespace: str, name: str) -> None:
        self._secret_checks.pop((namespace, name), None)
        self.remote_monitors.forget(namespace, name)
        for memory in (self._written, self._conflicts):
            _drop_children(memory, namespace, name)

    async def _secret_problem(self, pool: Pool, recheck: bool) -> Problem | None:
        key = (pool.namespace, pool.name)
        checked = self._secret_checks.get(key)
        stale = checked is None or time.monotonic() - checked[0] > self.settings.resync_seconds
        if recheck or stale or (checked is not None and checked[1] is not None):
            checked = (time.monotonic(), await check_secret(self.client, pool))
            self._secret_checks[key] = checked
        assert checked is not None
        return checked[1]

    async def reconcile(
        self,
        body: Object,
        children: Children,
        *,
        pod_monitor: bool,
        recheck: bool,
        now: str,
        metrics_available: Mapping[str, Any] | None = None,
        kv_problem: Problem | None = None,
    ) -> Outcome:
        """`metrics_available`: the autoscaler's latest MetricsAvailable condition, if it has one;
        `kv_problem`: KV transfers failing (kv_status.py), which degrades the pool."""
        meta, current = body["metadata"], body.get("status") or {}
        generation = meta.get("generation")
        outcome = Outcome()
        if recheck:  # a spec change or a restart: look at conflicting children afresh
            _drop_children(self._conflicts, meta["namespace"], meta["name"])
        pool, invalid = parse(body, self.settings)
        deployments: dict[naming.ComponentRole, Object | None] = {
            role: children.get("Deployment", meta["namespace"], naming.child_name(meta["name"], role))
            for role in naming.COMPONENT_ROLES
        }
        problems: list[Problem] = []
        endpoint = None
        if pool is not None:
            try:
                desired_children = build_children(pool, pod_monitor=pod_monitor)
            except (ValidationError, ValueError) as exc:  # the worker's EngineConfig refused the mapping
                desired_children, invalid = [], Problem("InvalidSpec", f"engine settings: {exc}")
            if (secret := await self._secret_problem(pool, recheck)) is not None:
                problems.append(secret)
            endpoint = await self._apply_all(
                body, pool, desired_children, children, deployments, problems, outcome
            )
            annotations, problem = await call_api(
                self.remote_monitors.reconcile(meta, pool, pod_monitor=pod_monitor, recheck=recheck)
            )
            problems += [problem] if problem is not None else []
            outcome.annotations |= annotations
        # Keep the autoscaler's condition until it has a new one; drop it once autoscaling is off.
        carried: Mapping[str, Any] | bool = metrics_available if metrics_available is not None else True
        if pool is not None and not pool.spec.autoscaling.enabled:
            carried = False
        status = build_status(
            current,
            deployments,
            problems,
            invalid=invalid,
            generation=generation,
            endpoint=endpoint,
            now=now,
            metrics_available=carried,
            kv_problem=kv_problem,
        )
        outcome.status_patch = merge_diff(current, status)
        outcome.events += _transition_events(current, status["conditions"]) + kv_events(
            current, status["conditions"]
        )
        return outcome

    async def _remove_unwanted(self, body: Object, pool: Pool, children: Children) -> list[str]:
        """Delete our children the spec turned off (a disabled disruption budget); others' stay."""
        deleted = []
        for kind, name in unwanted_children(pool):
            live = self._current(children, kind, pool.namespace, name)
            if live is None or not owned(live, body):
                continue
            await call_api(self.client.delete(kind, pool.namespace, name))
            self._written.pop((kind, pool.namespace, name), None)
            deleted.append(f"{kind} {name}")
        return deleted

    async def _apply_all(
        self,
        body: Object,
        pool: Pool,
        desired_children: list[Manifest],
        children: Children,
        deployments: dict[naming.ComponentRole, Object | None],
        problems: list[Problem],
        outcome: Outcome,
    ) -> str:
        """Apply every child; record live Deployments, problems and events; return the endpoint."""
        endpoint = pool.endpoint
        created: list[str] = []
        updated: list[str] = []
        for desired in desired_children:
            kind, name = desired["kind"], desired["metadata"]["name"]
            actual = self._current(children, kind, pool.namespace, name)
            role = desired["metadata"]["labels"].get(naming.ROLE_LABEL)
            autoscaled = kind == "Deployment" and role != "router" and pool.spec.autoscaling.enabled
            if kind == "Deployment" and role == "decode" and not autoscaled and _lowers(desired, actual):
                await before_decode_scale_down(self.client, pool.namespace, pool.name)
            try:
                result, live = await apply_child(self.client, desired, actual, body, autoscaled=autoscaled)
            except ConflictError as exc:
                self._conflicts[kind, pool.namespace, name] = (time.monotonic(), exc.live)
                problems.append(Problem(exc.reason, f"{kind} {name}: {exc.message}"))
                continue
            except ApiError as exc:
                problems.append(Problem("ApplyFailed", f"{kind} {name}: {exc.message}"))
                continue
            if result != "unchanged":
                self._written[kind, pool.namespace, name] = (time.monotonic(), live)
            if result == "created":
                created.append(f"{kind} {name}")
            elif result == "updated" and actual is not None:
                scaled = None if autoscaled else _scale_event(desired, actual)
                if scaled is not None:
                    outcome.events.append(scaled)
                updated.append(f"{kind} {name}")
            if kind == "Deployment":
                deployments[role] = live
            elif kind == "Service" and role == "router":
                endpoint = _endpoint(pool, live)
        deleted = await self._remove_unwanted(body, pool, children)
        # One event per kind of change, not per child: events are writes too.
        if deleted:
            outcome.events.append(Event("Normal", "Deleted", "Deleted " + ", ".join(deleted)))
        if created:
            outcome.events.append(Event("Normal", "Created", "Created " + ", ".join(created)))
        if updated:
            outcome.events.append(Event("Normal", "Updated", "Updated " + ", ".join(updated)))
        return endpoint
