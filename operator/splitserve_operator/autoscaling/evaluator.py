"""One autoscaling evaluation of one InferencePool: spec + signals + remembered state -> Outcome.

Kopf-free on purpose: the operator's timer hands each pool to `PoolAutoscaler.step`, which evaluates
once per interval, scales the Deployments that need it and says what to write (the changed status
fields, the MetricsAvailable condition, the events); `splitserve up` calls `evaluate` with a
`ScrapeSource` and scales its processes itself.
See docs/autoscaling.md for the wiring.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator.autoscaling.budget import Budget, Claim, Split, split
from splitserve_operator.autoscaling.exporter import AutoscalerMetrics
from splitserve_operator.autoscaling.planner import Observation
from splitserve_operator.autoscaling.policy import Decision, PoolPolicy, PoolState, commit, propose
from splitserve_operator.autoscaling.signals import (
    PoolSignals,
    SignalQuery,
    SignalSource,
    SignalsUnavailableError,
)
from splitserve_operator.conditions import Event, rfc3339, set_condition
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.naming import METRICS_AVAILABLE
from splitserve_operator.status_models import BudgetStatus, Condition, InferencePoolStatus, PoolStatus

log = logging.getLogger(__name__)

# PoolStatus fields the autoscaler owns; the reconciler owns the rest (replicas, readyReplicas, ready).
STATUS_FIELDS = (
    "desired_replicas",
    "observed_latency_seconds",
    "target_latency_seconds",
    "predicted_replicas",
    "predicted_load",
    "reason",
    "last_scale_time",
    "startup_seconds",
)


def parse_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class AutoscalerState:
    """What one InferencePool's autoscaler remembers between evaluations (keep it in kopf's memo)."""

    pools: dict[WorkerRole, PoolState] = field(
        default_factory=lambda: {r: PoolState.new(r) for r in WORKER_ROLES}
    )
    condition: Condition | None = None
    last_evaluation: float | None = None
    budget_capped: tuple[WorkerRole, ...] = ()  # pools the budget capped at the last evaluation

    @classmethod
    def resume(cls, status: InferencePoolStatus | None) -> AutoscalerState:
        """A fresh state that carries on from what status already records (after an operator restart):
        last scale times and the MetricsAvailable condition with its transition time."""
        if status is None:
            return cls()
        pools = {
            role: PoolState.new(role, parse_rfc3339(getattr(status, role).last_scale_time))
            for role in WORKER_ROLES
        }
        for role, pool in pools.items():
            pool.startup = getattr(status, role).startup_seconds  # what was learned before the restart
        condition = next((c for c in status.conditions if c.type == METRICS_AVAILABLE), None)
        capped = tuple(r for r in WORKER_ROLES if status.budget is not None and r in status.budget.capped)
        return cls(pools=pools, condition=condition, budget_capped=capped)

    def due(self, now: float, interval: float) -> bool:
        return self.last_evaluation is None or now - self.last_evaluation >= interval


@dataclass(frozen=True)
class Outcome:
    """What to do after one evaluation: patch replicas where they changed, status, condition, events."""

    decisions: dict[WorkerRole, Decision]
    condition: Condition
    events: tuple[Event, ...]
    budget: dict[str, Any] | None = None  # BudgetStatus, camelCase; None without a budget

    @property
    def replicas(self) -> dict[WorkerRole, int]:
        return {role: decision.desired for role, decision in self.decisions.items()}

    @property
    def changed(self) -> dict[WorkerRole, int]:
        """Pools whose Deployment replicas must be patched."""
        return {role: d.desired for role, d in self.decisions.items() if d.desired != d.current}

    def status_patch(self) -> dict[str, Any]:
        """{"prefill": {...}, "decode": {...}, "budget": {...} or None}: the autoscaler's status fields,
        camelCase (budget None clears a budget that was removed from the spec)."""
        patch: dict[str, Any] = {role: pool_status(decision) for role, decision in self.decisions.items()}
        return patch | {"budget": self.budget}


def pool_status(decision: Decision) -> dict[str, Any]:
    last = decision.last_scale_time
    status = PoolStatus(
        desired_replicas=decision.desired,
        observed_latency_seconds=_round(decision.observed_latency),
        target_latency_seconds=decision.target,
        predicted_replicas=decision.predicted_replicas,
        predicted_load=_round(decision.predicted_load),
        reason=decision.reason,
        last_scale_time=rfc3339(last) if last is not None else None,
        startup_seconds=_round(decision.startup),
    )
    return status.model_dump(mode="json", by_alias=True, include=set(STATUS_FIELDS))


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def signal_query(namespace: str | None, name: str, spec: InferencePoolSpec) -> SignalQuery:
    """What one evaluation of the pool reads: its series, over its window, at its SLO percentiles."""
    return SignalQuery(
        pool=name,
        namespace=namespace,
        window_seconds=spec.autoscaling.window_seconds,
        ttft_percentile=spec.prefill.slo.percentile,
        itl_percentile=spec.decode.slo.percentile,
    )


def observation(signals: PoolSignals, role: WorkerRole) -> Observation:
    """The policy's view of one pool: its latency, the router's load, its workers' counters."""
    workers = signals.prefill if role == "prefill" else signals.decode
    return Observation(
        latency=signals.ttft if role == "prefill" else signals.itl,
        request_rate=signals.request_rate,
        demand=signals.prompt_token_rate if role == "prefill" else signals.generation_token_rate,
        ready=round(workers.replicas) if workers.replicas else None,
        running=workers.running,
        waiting=workers.waiting,
        kv_usage=workers.kv_usage,
        busy=workers.busy,
        steps=workers.steps,
        tokens=workers.tokens,
        startup=workers.startup,
        # Prompts queued at prefill reach decode as prefill catches up: decode drains them too.
        upstream=signals.prefill.waiting if role == "decode" else None,
    )


@dataclass(frozen=True)
class Applied:
    """What one `step` leaves for the operator to write: only what changed since the last status."""

    status_patch: dict[str, Any]  # {"prefill": {...}, "decode": {...}}, the autoscaler's fields only
    condition: dict[str, Any]  # MetricsAvailable as {status, reason, message}
    events: tuple[Event, ...]


Scale = Callable[[WorkerRole, int], Awaitable[None]]


class PoolAutoscaler:
    """Evaluates InferencePools against one signal source (Prometheus, or direct scraping)."""

    def __init__(self, source: SignalSource, metrics: AutoscalerMetrics | None = None) -> None:
        self.source = source
        self.metrics = metrics  # where each evaluation's decisions are exported, if anywhere

    async def step(
        self,
        namespace: str,
        name: str,
        spec: InferencePoolSpec,
        state: AutoscalerState,
        replicas: Mapping[WorkerRole, int | None],
        status: Mapping[str, Any],
        now: float,
        scale: Scale,
    ) -> Applied | None:
        """Evaluate when the pool's interval has passed and scale what changed; None when not due or
        a Deployment does not exist yet (the reconciler creates it first). `replicas` is each
        Deployment's spec.replicas, `status` the pool's current status, `scale` patches one Deployment."""
        if not state.due(now, spec.autoscaling.interval_seconds):
            return None
        current = {role: count for role, count in replicas.items() if count is not None}
        if len(current) != len(WORKER_ROLES):
            return None
        outcome = await self.evaluate(namespace, name, spec, current, state, now)
        for role, desired in outcome.changed.items():
            await scale(role, desired)
        status_patch = {
            part: fields
            for part, fields in outcome.status_patch().items()
            if _changed(status.get(part), fields)
        }
        condition = outcome.condition.model_dump(include={"status", "reason", "message"})
        return Applied(status_patch=status_patch, condition=condition, events=outcome.events)

    async def evaluate(
        self,
        namespace: str | None,
        name: str,
        spec: InferencePoolSpec,
        current: Mapping[WorkerRole, int],
        state: AutoscalerState,
        now: float,
    ) -> Outcome:
        """Decide both pools' replicas. `current` is each Deployment's spec.replicas; `now` epoch seconds.

        Never raises for signal trouble: an unreadable source holds the replicas and turns
        MetricsAvailable False (the reason says why), with a Warning event on the transition.
        """
        if not spec.autoscaling.enabled:
            raise ValueError(f"{name}: autoscaling is disabled; replicas come from the spec")
        state.last_evaluation = now
        signals: PoolSignals | None = None
        unavailable: SignalsUnavailableError | None = None
        try:
            signals = await self.source.read(signal_query(namespace, name, spec))
        except SignalsUnavailableError as error:
            unavailable = error
        policies = {role: PoolPolicy.from_spec(spec, role) for role in WORKER_ROLES}
        proposals = {
            role: propose(
                policies[role],
                state.pools[role],
                current[role],
                observation(signals, role) if signals is not None else None,
                now,
                unavailable.message if unavailable else None,
            )
            for role in WORKER_ROLES
        }
        budget = Budget.from_spec(spec)
        shared = split(budget, _claims(proposals, policies)) if budget is not None else None
        if shared is not None:
            proposals = {role: _capped(d, shared) for role, d in proposals.items()}
        decisions = {role: commit(state.pools[role], d, now) for role, d in proposals.items()}
        if self.metrics is not None:
            counted = {r: getattr(signals, r).replicas if signals is not None else None for r in WORKER_ROLES}
            self.metrics.record(namespace, name, decisions, counted, now)
        condition = _condition(decisions, unavailable)
        events = _events(decisions, state.condition, condition)
        if budget is not None and shared is not None:
            budget_events, state.budget_capped = _budget_events(budget, shared, state.budget_capped)
            events += budget_events
        before = [state.condition.model_dump(by_alias=True, exclude_none=True)] if state.condition else []
        stamped = set_condition(
            before, condition.type, condition.status, condition.reason, condition.message, now=rfc3339(now)
        )
        state.condition = Condition.model_validate(stamped[0])
        for event in events:
            log.info("%s/%s %s: %s", namespace or "-", name, event.reason, event.message)
        status = _budget_status(budget, shared) if budget is not None and shared is not None else None
        return Outcome(decisions=decisions, condition=state.condition, events=events, budget=status)


def _changed(recorded: Any, fields: dict[str, Any] | None) -> bool:
    """Whether status must be patched: some field differs from what status records."""
    if fields is None:
        return recorded is not None
    return {key: (recorded or {}).get(key) for key in fields} != fields


def _claims(
    proposals: Mapping[WorkerRole, Decision], policies: Mapping[WorkerRole, PoolPolicy]
) -> dict[WorkerRole, Claim]:
    return {
        role: Claim(
            asked=d.desired,
            minimum=policies[role].min_replicas,
            pressure=d.observed_latency / d.target if d.observed_latency is not None else 0.0,
            needed=d.needed,
            burst=d.burst,
            held=d.current,
            draining=d.draining,
        )
        for role, d in proposals.items()
    }


def _capped(decision: Decision, shared: Split) -> Decision:
    """The decision as the budget split it: capped, or (a budget that binds during bursts) kept at
    the last burst's size from budget the other pool leaves unused."""
    desired = shared.granted[decision.role]
    why = shared.capped.get(decision.role)
    if why is not None:
        reason = f"{decision.reason}; capped by the budget to {desired}: {why}"
    elif desired > decision.desired:
        reason = f"{decision.reason}; {desired} kept from the unused budget for the next burst"
    else:
        return decision
    return replace(decision, desired=desired, reason=reason)


def _budget_status(budget: Budget, shared: Split) -> dict[str, Any]:
    capped = list(shared.capped)
    reason = "; ".join(f"{role} {why}" for role, why in shared.capped.items()) or (
        f"within the budget of {budget.describe()}: both pools get what they asked for"
    )
    status = BudgetStatus(
        max_accelerators_total=budget.max_accelerators,
        max_replicas_total=budget.max_replicas,
        accelerators=budget.accelerators(shared.granted),
        replicas=sum(shared.granted.values()),
        binding=shared.binding,
        capped=capped,
        reason=reason,
    )
    return status.model_dump(mode="json", by_alias=True)


def _budget_events(
    budget: Budget, shared: Split, before: tuple[WorkerRole, ...]
) -> tuple[tuple[Event, ...], tuple[WorkerRole, ...]]:
    """(events, pools to remember as capped): a Warning when the budget starts to bind or caps another
    pool; a Normal one when it has room again. A full budget that caps no one this time (a pool waits
    for its last scale-up to show) is no release: it would only flap."""
    if shared.capped:
        capped = tuple(shared.capped)
        if capped == before:
            return (), capped
        message = "; ".join(f"{role} {why}" for role, why in shared.capped.items())
        return (Event("Warning", "BudgetBinding", message),), capped
    room = any(budget.fits({**shared.granted, role: shared.granted[role] + 1}) for role in WORKER_ROLES)
    if not room:
        return (), before
    if before:
        message = f"both pools get what they asked for within the budget of {budget.describe()}"
        return (Event("Normal", "BudgetReleased", message),), ()
    return (), ()


def _condition(
    decisions: Mapping[WorkerRole, Decision], unavailable: SignalsUnavailableError | None
) -> Condition:
    if unavailable is not None:
        return Condition(
            type=METRICS_AVAILABLE, status="False", reason=unavailable.reason, message=unavailable.message
        )
    held = [f"{role}: {d.reason}" for role, d in decisions.items() if not d.metrics_available]
    if held:
        return Condition(
            type=METRICS_AVAILABLE, status="False", reason="MissingData", message="; ".join(held)
        )
    return Condition(
        type=METRICS_AVAILABLE,
        status="True",
        reason="SignalsRead",
        message="TTFT, ITL and load signals read for both pools",
    )


def _events(
    decisions: Mapping[WorkerRole, Decision], before: Condition | None, after: Condition
) -> tuple[Event, ...]:
    events = [
        Event("Normal", "Autoscaled", f"{role}: {d.current} -> {d.desired} replicas: {d.reason}")
        for role, d in decisions.items()
        if d.desired != d.current
    ]
    was_false = before is not None and before.status == "False"
    if after.status == "False" and (not was_false or before is None or before.reason != after.reason):
        message = f"holding replicas: {after.reason}: {after.message}"
        events.append(Event("Warning", "MetricsUnavailable", message))
    elif after.status == "True" and was_false:
        message = "signals readable again; autoscaling resumed"
        events.append(Event("Normal", "MetricsAvailable", message))
    return tuple(events)
