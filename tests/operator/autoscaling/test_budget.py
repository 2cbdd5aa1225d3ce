"""The shared budget: the split rule (pure), and the evaluation that applies it (status, events)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator.autoscaling.budget import Budget, Claim, split
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler
from splitserve_operator.autoscaling.signals import PoolSignals, SignalQuery, WorkerSignals
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.status_models import InferencePoolStatus


def budget(accelerators: int | None, replicas: int | None = None, per: tuple[int, int] = (1, 1)) -> Budget:
    return Budget(accelerators, replicas, "nvidia.com/gpu", {"prefill": per[0], "decode": per[1]})


def claims(
    prefill: int, decode: int, minimum: int = 1, pressure: tuple[float, float] = (0, 0)
) -> dict[WorkerRole, Claim]:
    return {
        "prefill": Claim(prefill, minimum, pressure[0]),
        "decode": Claim(decode, minimum, pressure[1]),
    }


def test_a_budget_that_does_not_bind_grants_what_was_asked() -> None:
    result = split(budget(30), claims(10, 15))
    assert result.granted == {"prefill": 10, "decode": 15} and not result.binding


def test_a_binding_budget_goes_to_the_pool_furthest_from_its_target() -> None:
    # 20 GPUs for 10 + 15 asked: both end near 80 % of their need; the last replica goes to the pool
    # missing the larger share.
    result = split(budget(20), claims(10, 15))
    assert result.granted == {"prefill": 8, "decode": 12}
    assert result.binding and set(result.capped) == {"prefill", "decode"}
    assert "asked for 10, granted 8" in result.capped["prefill"]
    # One pool far from its target takes the budget first: decode asks for its minimum only.
    assert split(budget(20), claims(30, 1)).granted == {"prefill": 19, "decode": 1}


def test_ties_go_to_the_pool_whose_latency_is_further_above_target_then_to_prefill() -> None:
    assert split(budget(3), claims(2, 2, pressure=(1.0, 3.0))).granted == {"prefill": 1, "decode": 2}
    assert split(budget(3), claims(2, 2, pressure=(3.0, 1.0))).granted == {"prefill": 2, "decode": 1}
    assert split(budget(3), claims(2, 2)).granted == {"prefill": 2, "decode": 1}


def test_replicas_of_several_accelerators_and_a_replica_budget() -> None:
    # Prefill replicas hold 2 GPUs: with 1 GPU left, only decode can take it.
    result = split(budget(9, per=(2, 1)), claims(4, 4))
    assert result.granted == {"prefill": 3, "decode": 3}
    assert budget(9, per=(2, 1)).accelerators(result.granted) == 9
    # CPU pools (no accelerator) are budgeted by replicas.
    assert split(budget(None, 6, per=(0, 0)), claims(5, 5)).granted == {"prefill": 3, "decode": 3}
    # Both limits apply: 8 GPUs and 5 replicas are both used up.
    assert split(budget(8, 5, per=(2, 1)), claims(4, 4)).granted == {"prefill": 3, "decode": 2}


@pytest.mark.parametrize(
    ("prefill", "decode", "limit"), list(itertools.product([1, 3, 9], [1, 4, 12], [4, 10, 40]))
)
def test_the_budget_is_never_exceeded_and_minimums_always_held(prefill: int, decode: int, limit: int) -> None:
    shared = budget(limit, per=(2, 1))
    result = split(shared, claims(prefill, decode))
    assert shared.fits(result.granted)
    assert all(
        1 <= result.granted[r] <= max(1, {"prefill": prefill, "decode": decode}[r]) for r in WORKER_ROLES
    )
    # Nothing left over that an unsatisfied pool could still use.
    for role in result.capped:
        assert not shared.fits({**result.granted, role: result.granted[role] + 1})


SPEC: dict[str, Any] = {
    "model": {"name": "m"},
    "prefill": {
        "replicas": {"min": 1, "max": 20},
        "slo": {"ttftSeconds": 1.0},
        "resources": {"limits": {"nvidia.com/gpu": 1}},
    },
    "decode": {"replicas": {"min": 1, "max": 20}, "resources": {"limits": {"nvidia.com/gpu": 2}}},
    "autoscaling": {"predictive": False, "windowSeconds": 30, "budget": {"maxAcceleratorsTotal": 8}},
}


class Signals:
    def __init__(self, ttft: float) -> None:
        self.ttft = ttft
        self.prefill_ready = 2

    async def read(self, query: SignalQuery) -> PoolSignals:
        return PoolSignals(
            ttft=self.ttft,
            itl=0.05,
            request_rate=5.0,
            prompt_token_rate=500.0,
            generation_token_rate=100.0,
            prefill=WorkerSignals(replicas=self.prefill_ready),
            decode=WorkerSignals(replicas=2),
        )


async def test_evaluation_caps_a_pool_says_why_in_status_and_posts_events_on_transitions() -> None:
    spec = InferencePoolSpec.model_validate(SPEC)
    source, state = Signals(ttft=4.0), AutoscalerState()
    autoscaler = PoolAutoscaler(source)
    # TTFT 4x the target on 2 prefill replicas asks for 8, 6 within the step limit; 2 decode
    # replicas hold 4 GPUs: 4 are left.
    outcome = await autoscaler.evaluate("ns", "chat", spec, {"prefill": 2, "decode": 2}, state, 1000.0)
    assert outcome.replicas == {"prefill": 4, "decode": 2}
    assert "capped by the budget to 4: asked for 6, granted 4" in outcome.decisions["prefill"].reason
    budget_status = outcome.status_patch()["budget"]
    assert budget_status == {
        "maxAcceleratorsTotal": 8,
        "maxReplicasTotal": None,
        "accelerators": 8,
        "replicas": 6,
        "binding": True,
        "capped": ["prefill"],
        "reason": budget_status["reason"],
    }
    assert budget_status["reason"].startswith(
        "prefill asked for 6, granted 4: the budget of 8 nvidia.com/gpu"
    )
    assert [e.reason for e in outcome.events if e.type == "Warning"] == ["BudgetBinding"]
    assert state.pools["prefill"].scaling_up == (1000.0, 4)  # the start-up in flight is the capped one
    # Full while prefill waits for its scale-up to show: no event, nor after a restart from status.
    again = await autoscaler.evaluate("ns", "chat", spec, {"prefill": 4, "decode": 2}, state, 1030.0)
    assert again.replicas == {"prefill": 4, "decode": 2} and not again.events
    resumed = AutoscalerState.resume(InferencePoolStatus.model_validate({"budget": budget_status}))
    assert resumed.budget_capped == ("prefill",)
    # Less load: prefill gives replicas back, the budget has room again, a Normal event says so.
    source.ttft, source.prefill_ready = 0.2, 4
    current: dict[WorkerRole, int] = {"prefill": 4, "decode": 2}
    settling = await autoscaler.evaluate("ns", "chat", spec, current, state, 1400.0)
    assert not settling.events
    released = await autoscaler.evaluate("ns", "chat", spec, current, state, 1730.0)  # after 300 s
    assert released.replicas["prefill"] == 3
    assert [(e.type, e.reason) for e in released.events][1:] == [("Normal", "BudgetReleased")]
    assert released.status_patch()["budget"]["capped"] == []


async def test_without_a_budget_status_clears_it() -> None:
    spec = InferencePoolSpec.model_validate(
        {**SPEC, "autoscaling": {"predictive": False, "windowSeconds": 30}}
    )
    outcome = await PoolAutoscaler(Signals(ttft=4.0)).evaluate(
        "ns", "chat", spec, {"prefill": 2, "decode": 2}, AutoscalerState(), 1000.0
    )
    assert outcome.status_patch()["budget"] is None and outcome.replicas["prefill"] == 6


def test_arrivals_needs_come_before_drains_and_unused_budget_keeps_a_burst() -> None:
    # Decode asks for 20 to drain prefill's queue, though its arrivals need 6; prefill needs 8 of its 10.
    drains: dict[WorkerRole, Claim] = {
        "prefill": Claim(asked=10, minimum=1, pressure=600.0, needed=8),
        "decode": Claim(asked=20, minimum=1, pressure=1.2, needed=6),
    }
    # Round one: 8 + 6 of 16; round two, the drains: prefill's latency is further above target.
    assert split(budget(16), drains).granted == {"prefill": 10, "decode": 6}
    # After a burst, unused budget keeps each pool at the size the burst needed.
    calm: dict[WorkerRole, Claim] = {
        "prefill": Claim(asked=4, minimum=1, needed=4, burst=7),
        "decode": Claim(asked=6, minimum=1, needed=6, burst=11),
    }
    kept = split(budget(16), calm)
    assert kept.granted == {"prefill": 6, "decode": 10} and not kept.binding
    assert split(budget(30), calm).granted == {"prefill": 7, "decode": 11}


def test_held_replicas_move_only_when_the_needs_differ_by_more_than_one_replica() -> None:
    def held(prefill: int, decode: int, need: tuple[int, int]) -> dict[WorkerRole, Claim]:
        return {
            "prefill": Claim(asked=20, minimum=1, needed=need[0], held=prefill),
            "decode": Claim(asked=20, minimum=1, needed=need[1], held=decode),
        }

    # 7 + 11 held against needs of 10 and 14: 8 + 10 would be fairer by a hair; a move costs a start-up.
    assert split(budget(18), held(7, 11, (10, 14))).granted == {"prefill": 7, "decode": 11}
    assert split(budget(18), held(7, 11, (10, 15))).granted == {"prefill": 7, "decode": 11}
    # 4 + 14 against the same needs: replicas move until the shares are within one replica.
    assert split(budget(18), held(4, 14, (10, 14))).granted == {"prefill": 7, "decode": 11}
    # A budget lowered below what the pools hold: the split starts again from the minimums.
    assert split(budget(12), held(7, 11, (10, 15))).granted == {"prefill": 5, "decode": 7}
    # Never from a pool that drains a queue of its own: its replicas are busy with it.
    draining = {
        "prefill": Claim(asked=20, minimum=1, needed=4, held=7, draining=True),
        "decode": Claim(asked=20, minimum=1, needed=15, held=11),
    }
    assert split(budget(18), draining).granted == {"prefill": 7, "decode": 11}
    # After a burst prefill's arrivals need 4, decode's 15: without the burst's memory replicas would
    # go to decode, with it (10 and 15 remembered) they stay for the next burst.
    after_burst = {
        "prefill": Claim(asked=20, minimum=1, needed=4, held=7),
        "decode": Claim(asked=20, minimum=1, needed=15, held=11),
    }
    assert split(budget(18), after_burst).granted["decode"] > 11
    remembered = {
        "prefill": Claim(asked=20, minimum=1, needed=4, held=7, burst=10),
        "decode": Claim(asked=20, minimum=1, needed=15, held=11, burst=15),
    }
    assert split(budget(18), remembered).granted == {"prefill": 7, "decode": 11}
