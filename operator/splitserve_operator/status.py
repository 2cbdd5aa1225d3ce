"""Pure status computation: children's states and known problems -> InferencePool status fields.

Only the fields the reconciler owns are produced; the autoscaler's (observedLatencySeconds,
predictedReplicas, reason, MetricsAvailable, ...) are never touched, since diff.merge_diff() patches
only the keys present here and conditions.set_condition() keeps other writers' conditions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitserve_operator import naming
from splitserve_operator.conditions import set_condition

Object = Mapping[str, Any]
Conditions = list[dict[str, Any]]


@dataclass(frozen=True)
class Problem:
    """Something that keeps the pool from being Ready, with a CamelCase reason and a readable message."""

    reason: str
    message: str


@dataclass(frozen=True)
class Rollout:
    """What a Deployment says about itself, as `kubectl rollout status` reads it."""

    role: naming.ComponentRole
    desired: int
    replicas: int
    ready: int
    updated: int
    done: bool
    stalled: str | None  # why the Deployment controller gave up, if it did

    @classmethod
    def of(cls, role: naming.ComponentRole, deployment: Object | None) -> Rollout:
        if deployment is None:
            return cls(role, 0, 0, 0, 0, done=False, stalled=None)
        spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
        desired = int(spec.get("replicas", 1))
        replicas, ready = int(status.get("replicas", 0)), int(status.get("readyReplicas", 0))
        updated = int(status.get("updatedReplicas", 0))
        generation = (deployment.get("metadata") or {}).get("generation")
        observed = status.get("observedGeneration")
        seen = generation is None or (observed is not None and observed >= generation)
        done = seen and updated >= desired and replicas == updated and ready >= desired
        return cls(role, desired, replicas, ready, updated, done=done, stalled=_stalled(status))

    @property
    def summary(self) -> str:
        return f"{self.role} {self.ready}/{self.desired}"


def _stalled(status: Object) -> str | None:
    for condition in status.get("conditions") or []:
        kind, state, reason = condition.get("type"), condition.get("status"), condition.get("reason")
        if kind == "Progressing" and state == "False" and reason == "ProgressDeadlineExceeded":
            return str(condition.get("message") or reason)
        if kind == "ReplicaFailure" and state == "True":
            return str(condition.get("message") or reason or kind)
    return None


def pool_fields(rollout: Rollout) -> dict[str, Any]:
    return {
        "replicas": rollout.replicas,
        "readyReplicas": rollout.ready,
        "desiredReplicas": rollout.desired,
        "ready": f"{rollout.ready}/{rollout.desired}",
    }


def build_conditions(
    current: Sequence[Object],
    rollouts: Sequence[Rollout],
    problems: Sequence[Problem],
    *,
    invalid: Problem | None,
    generation: int | None,
    now: str,
    kv: Problem | None = None,
) -> Conditions:
    """Ready, Progressing and Degraded from the rollouts and problems; other conditions are kept.

    Ready means the pool can serve: a ready router and decode pod, and nothing wrong. Prefill pods are
    not needed for that (with none ready, the decode workers prefill prompts themselves: conditional
    disaggregation), so a prefill pool at zero, starting, or stuck leaves the pool Ready; a stuck one
    shows in Progressing and Degraded. `kv` (KV
    transfers failing, kv_status.py) degrades a pool that still serves: Degraded, not un-Ready.
    """

    def put(conds: Conditions, type_: str, ok: bool, reason: str, message: str) -> Conditions:
        return set_condition(
            conds, type_, "True" if ok else "False", reason, message, now=now, observed_generation=generation
        )

    conds = [dict(c) for c in current]
    if invalid is not None:
        message = f"{invalid.message}; the last valid spec keeps running"
        conds = put(conds, naming.READY, False, invalid.reason, invalid.message)
        conds = put(conds, naming.PROGRESSING, False, invalid.reason, message)
        return put(conds, naming.DEGRADED, True, invalid.reason, message)

    summary = ", ".join(r.summary for r in rollouts) + " ready"
    stalled = [f"{r.role}: {r.stalled}" for r in rollouts if r.stalled]
    rolling = [r.role for r in rollouts if not r.done]
    unserved = [r.role for r in rollouts if r.ready < 1 and r.role != "prefill"]
    if not unserved and any(r.role == "prefill" and r.ready < 1 for r in rollouts):
        summary += " (no prefill pod ready: the decode workers prefill)"
    if problems:
        conds = put(conds, naming.READY, False, problems[0].reason, "; ".join(p.message for p in problems))
    elif unserved:
        conds = put(conds, naming.READY, False, "NotReady", f"no ready {', '.join(unserved)} pod; {summary}")
    else:
        conds = put(conds, naming.READY, True, "Ready", summary)

    if stalled:
        conds = put(conds, naming.PROGRESSING, False, "ProgressDeadlineExceeded", "; ".join(stalled))
    elif rolling:
        message = f"rolling out {', '.join(rolling)}; {summary}"
        conds = put(conds, naming.PROGRESSING, True, "RollingOut", message)
    else:
        conds = put(conds, naming.PROGRESSING, False, "Stable", summary)

    if problems or stalled:
        reason = problems[0].reason if problems else "ProgressDeadlineExceeded"
        message = "; ".join([p.message for p in problems] + stalled)
        return put(conds, naming.DEGRADED, True, reason, message)
    if kv is not None:
        return put(conds, naming.DEGRADED, True, kv.reason, kv.message)
    return put(conds, naming.DEGRADED, False, "AsExpected", summary)


def build_status(
    current: Object,
    deployments: Mapping[naming.ComponentRole, Object | None],
    problems: Sequence[Problem],
    *,
    invalid: Problem | None,
    generation: int | None,
    endpoint: str | None,
    now: str,
    metrics_available: Mapping[str, Any] | bool | None = True,
    kv_problem: Problem | None = None,
) -> dict[str, Any]:
    """The status fields the reconciler owns, computed from scratch on every reconcile.

    The reconciler is the only writer of `conditions` (a merge patch replaces lists whole, so two
    writers would clobber each other). `metrics_available` is the autoscaler's condition to carry:
    a condition to set, True to keep the current one, False to drop it (autoscaling disabled).
    `kv_problem` is the KV observer's verdict on transfers (Degraded while they keep failing).
    """
    current_conditions = [dict(c) for c in current.get("conditions") or []]
    if metrics_available is False:
        current_conditions = [c for c in current_conditions if c.get("type") != naming.METRICS_AVAILABLE]
    elif isinstance(metrics_available, Mapping):
        current_conditions = set_condition(
            current_conditions,
            naming.METRICS_AVAILABLE,
            metrics_available["status"],
            metrics_available["reason"],
            metrics_available["message"],
            now=now,
        )
    rollouts = [Rollout.of(role, deployments.get(role)) for role in naming.COMPONENT_ROLES]
    by_role = {r.role: r for r in rollouts}
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": build_conditions(
            current_conditions,
            rollouts,
            problems,
            invalid=invalid,
            generation=generation,
            now=now,
            kv=kv_problem,
        ),
    }
    # Counts stay truthful while a spec is invalid: the last valid one keeps running.
    status["prefill"] = pool_fields(by_role["prefill"])
    status["decode"] = pool_fields(by_role["decode"])
    status["router"] = {"replicas": by_role["router"].replicas, "readyReplicas": by_role["router"].ready}
    if endpoint is not None:
        status["endpoint"] = endpoint
    return status
