"""One budget for both pools: split it by what each pool's SLO needs, never exceed it.

A platform team owns N accelerators for a model, not N per pool. Each pool's policy first decides on its
own (its SLO, its bounds, its behavior rules); when the two answers together do not fit the budget,
`split` decides who yields. The rule, pure and deterministic:

1. Every pool keeps what it holds, up to what it asked for (if that no longer fits, as when the budget
   was lowered: its `replicas.min`, which the CRD guarantees fits). Held replicas move to the other pool
   only while it stays the worse-off after the move (by the share of its need still missing: its
   arrivals' need, or a remembered burst's size if larger), and never from a pool draining a queue of
   its own: a move costs a start-up, so needs within a
   replica of each other do not make the split flap.
2. The rest goes one replica at a time to the pool **furthest from its target**, in rounds:
   - first to what its arrivals need (the planner's size without a queue to drain), to the pool missing
     the largest share of that need, (need - granted) / need;
   - then to the drains (what its policy asked for), to the pool whose latency is further above its
     target (observed / target) first: a queue is drained from what the load itself leaves over, and
     decode asking to drain prefill's queue cannot starve the prefill that must feed it;
   - then, while a burst is remembered (burst memory), budget left unused keeps each pool at the size
     the burst needed, so the next burst finds it (a budget is capacity the team owns).
   Ties go to the higher latency pressure, then to prefill, whose queue is also decode's.
3. A replica that does not fit what is left (a pool of 2-GPU replicas with one GPU left) is skipped; the
   other pool may still take it.

So a budget that binds cuts both pools to about the same share of their need, and the pool that is
worse off gets the next replica first. When the budget does not bind, each pool gets what it asked for
(or a remembered burst's size). Replicas count `accelerator` from their container's limits (else
requests), and `maxReplicasTotal` counts replicas: CPU pools, which hold no accelerator, are budgeted by
replicas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator.autoscaling_spec import accelerators_per_replica
from splitserve_operator.models import InferencePoolSpec


@dataclass(frozen=True)
class Budget:
    """The budget of one InferencePool, with what one replica of each pool costs."""

    max_accelerators: int | None
    max_replicas: int | None
    accelerator: str
    per_replica: Mapping[WorkerRole, int]  # accelerators one replica holds

    @classmethod
    def from_spec(cls, spec: InferencePoolSpec) -> Budget | None:
        budget = spec.autoscaling.budget
        if budget is None:
            return None
        pools = {"prefill": spec.prefill, "decode": spec.decode}
        per_replica = {
            role: accelerators_per_replica(pools[role], budget.accelerator) for role in WORKER_ROLES
        }
        return cls(budget.max_accelerators_total, budget.max_replicas_total, budget.accelerator, per_replica)

    def accelerators(self, replicas: Mapping[WorkerRole, int]) -> int:
        return sum(self.per_replica[role] * count for role, count in replicas.items())

    def fits(self, replicas: Mapping[WorkerRole, int]) -> bool:
        within_accelerators = (
            self.max_accelerators is None or self.accelerators(replicas) <= self.max_accelerators
        )
        within_replicas = self.max_replicas is None or sum(replicas.values()) <= self.max_replicas
        return within_accelerators and within_replicas

    def describe(self) -> str:
        limits = []
        if self.max_accelerators is not None:
            limits.append(f"{self.max_accelerators} {self.accelerator}")
        if self.max_replicas is not None:
            limits.append(f"{self.max_replicas} replicas")
        return " and ".join(limits)


@dataclass(frozen=True)
class Claim:
    """What one pool's policy asked for, and how far its latency is from its target."""

    asked: int
    minimum: int
    pressure: float = 0.0  # observed / target latency; 0 when unknown
    needed: int | None = None  # replicas the arrivals alone need (without draining a queue), if known
    burst: int | None = None  # the size a recent burst needed (burst memory), if any
    held: int = 0  # replicas the pool has now (a replica moved to the other pool costs a start-up)
    draining: bool = False  # a standing queue of its own: its replicas are busy draining it

    @property
    def first(self) -> int:
        """What the pool claims in the first round: its need for the arrivals, at most what it asked."""
        return self.asked if self.needed is None else min(self.needed, self.asked)


@dataclass(frozen=True)
class Split:
    """Replicas granted per pool, and for each pool the budget capped, why."""

    granted: dict[WorkerRole, int]
    capped: dict[WorkerRole, str]

    @property
    def binding(self) -> bool:
        return bool(self.capped)


def split(budget: Budget, claims: Mapping[WorkerRole, Claim]) -> Split:
    """Grant each pool what it holds (up to what it asked for; its minimum when that does not fit),
    move held replicas only where that brings the worse-off pool closer to its need, then give one
    replica at a time to the pool furthest from its goal, round by round, while it fits."""
    granted = {r: max(min(claims[r].held, claims[r].asked), claims[r].minimum) for r in WORKER_ROLES}
    if not budget.fits(granted):
        granted = {role: claims[role].minimum for role in WORKER_ROLES}
    _rebalance(budget, claims, granted)
    rounds = (
        # The arrivals' needs first, by share of the need still missing.
        ({r: claims[r].first for r in WORKER_ROLES}, False),
        # Then the drains, to the pool whose latency is further above its target first.
        ({r: claims[r].asked for r in WORKER_ROLES}, True),
        # Then, while a burst is remembered, budget left unused keeps the burst's size.
        ({r: max(claims[r].asked, claims[r].burst or 0) for r in WORKER_ROLES}, False),
    )
    for goal, by_pressure in rounds:
        while True:
            open_ = [
                role
                for role in WORKER_ROLES
                if granted[role] < goal[role] and budget.fits({**granted, role: granted[role] + 1})
            ]
            if not open_:
                break
            role = max(
                open_, key=lambda r: _priority(goal[r], granted[r], claims[r].pressure, r, by_pressure)
            )
            granted[role] += 1
    capped = {
        role: _why(role, budget, claims, granted)
        for role in WORKER_ROLES
        if granted[role] < max(claims[role].asked, claims[role].minimum)
    }
    return Split(granted, capped)


def _rebalance(budget: Budget, claims: Mapping[WorkerRole, Claim], granted: dict[WorkerRole, int]) -> None:
    """Move held replicas to the pool missing the larger share of its need while it stays the worse-off
    one after the move: a move costs a start-up, so shares that differ by less than one replica stay
    put and the split does not flap between near-equal answers as the needs wander."""
    # A remembered burst is part of the need: replicas moved away after it would be moved back for the
    # next one, a start-up each way.
    goal = {r: max(claims[r].first, claims[r].burst or 0) for r in WORKER_ROLES}
    for _ in range(sum(granted.values())):
        worst = max(WORKER_ROLES, key=lambda r: _shortfall(goal[r], granted[r]))
        other: WorkerRole = "decode" if worst == "prefill" else "prefill"
        moved = {worst: granted[worst] + 1, other: granted[other] - 1}
        # Only while the taker stays the worse-off after the move: needs that differ by less than one
        # replica keep the replicas where they are.
        still_worse = _shortfall(goal[worst], moved[worst]) >= _shortfall(goal[other], moved[other])
        donor = claims[other]
        if moved[other] < donor.minimum or donor.draining or not budget.fits(moved) or not still_worse:
            return
        granted.update(moved)


def _priority(
    goal: int, granted: int, pressure: float, role: WorkerRole, by_pressure: bool
) -> tuple[float, ...]:
    """Who gets the next replica: the larger shortfall, then the higher pressure, then prefill (or
    pressure first, for the drains)."""
    shortfall = _shortfall(goal, granted)
    keys = (pressure, shortfall) if by_pressure else (shortfall, pressure)
    return (*keys, 1.0 if role == "prefill" else 0.0)


def _shortfall(goal: int, granted: int) -> float:
    """The share of its goal the pool still lacks: its distance from its target."""
    return (goal - granted) / goal if goal > 0 else 0.0


def _why(
    role: WorkerRole, budget: Budget, claims: Mapping[WorkerRole, Claim], granted: Mapping[WorkerRole, int]
) -> str:
    other: WorkerRole = "decode" if role == "prefill" else "prefill"
    used = budget.accelerators(granted)
    return (
        f"asked for {claims[role].asked}, granted {granted[role]}: the budget of {budget.describe()} "
        f"holds {granted[role]} {role} + {granted[other]} {other} ({used} {budget.accelerator}, "
        f"{sum(granted.values())} replicas); {other} asked for {claims[other].asked}"
    )
