"""A prefill pool that may stand at zero: stopped when TTFT allows and its last replica idles, kept at
zero while the decode workers' own prefills meet TTFT, brought back when they miss it."""

from __future__ import annotations

import pytest

from splitserve_operator.autoscaling.budget import Budget, Claim, split
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler
from splitserve_operator.autoscaling.planner import Observation
from splitserve_operator.autoscaling.policy import PoolPolicy, PoolState, decide
from splitserve_operator.autoscaling.signals import PoolSignals, WorkerSignals
from splitserve_operator.autoscaling.zero import IDLE_BUSY
from splitserve_operator.autoscaling_spec import AutoscalingSpec, ScaleDownRules
from splitserve_operator.models import InferencePoolSpec, ModelSpec, PrefillPoolSpec, ReplicaBounds, TtftSlo
from tests.operator.autoscaling.test_evaluator import FakeSource

TARGET = 0.5


def spec(min_replicas: int = 0, down_window: int = 0, predictive: bool = True) -> InferencePoolSpec:
    return InferencePoolSpec(
        model=ModelSpec(name="m"),
        prefill=PrefillPoolSpec(
            replicas=ReplicaBounds(min=min_replicas, max=4), slo=TtftSlo(ttft_seconds=TARGET)
        ),
        autoscaling=AutoscalingSpec(
            predictive=predictive, scale_down=ScaleDownRules(stabilization_window_seconds=down_window)
        ),
    )


def traffic(ttft: float, *, ready: int | None, busy: float | None, waiting: float = 0.0) -> Observation:
    """Requests flowing at the router; `ready`/`busy` None: no prefill worker exports anything."""
    return Observation(
        latency=ttft,
        request_rate=4.0,
        demand=400.0,
        ready=ready,
        running=None if ready is None else 1.0,
        waiting=None if ready is None else waiting,
        busy=busy,
        steps=None if busy is None else 10.0,
        tokens=None if busy is None else 400.0,
    )


def prefill(min_replicas: int = 0, down_window: int = 0, predictive: bool = True) -> PoolPolicy:
    return PoolPolicy.from_spec(spec(min_replicas, down_window, predictive), "prefill")


@pytest.mark.parametrize("predictive", [True, False])
def test_an_idle_last_replica_stops_when_ttft_allows(predictive: bool) -> None:
    policy, state, obs = (
        prefill(predictive=predictive),
        PoolState.new("prefill"),
        traffic(0.1, ready=1, busy=0.02),
    )
    assert decide(policy, state, 1, obs, 0.0).desired == 1  # a fresh state holds its first evaluation
    decision = decide(policy, state, 1, obs, 15.0)
    assert decision.desired == 0 and decision.metrics_available
    assert "decode workers take its prompts" in decision.reason


@pytest.mark.parametrize(
    ("why", "obs"),
    [
        ("busy", traffic(0.1, ready=1, busy=IDLE_BUSY)),
        ("ttft within the band", traffic(TARGET, ready=1, busy=0.02)),
        ("a queue", traffic(0.1, ready=1, busy=0.02, waiting=5)),
        ("no busy signal", traffic(0.1, ready=1, busy=None)),
    ],
)
def test_the_last_replica_stays(why: str, obs: Observation) -> None:
    policy, state = prefill(), PoolState.new("prefill")
    assert [decide(policy, state, 1, obs, t).desired for t in (0.0, 15.0, 30.0)] == [1, 1, 1], why


def test_min_one_never_stops_the_pool() -> None:
    policy, state, obs = prefill(min_replicas=1), PoolState.new("prefill"), traffic(0.1, ready=1, busy=0.0)
    assert [decide(policy, state, 1, obs, t).desired for t in (0.0, 15.0, 30.0)] == [1, 1, 1]


def test_stopping_waits_for_the_scale_down_window() -> None:
    policy, state = prefill(down_window=300), PoolState.new("prefill")
    obs = traffic(0.1, ready=1, busy=0.02)
    desired = {t: decide(policy, state, 1, obs, float(t)).desired for t in range(0, 316, 15)}
    # Once 300 s agreed after the state's start (which counts as a recommendation to hold).
    assert {t for t, d in desired.items() if d == 0} == {315}


def test_at_zero_it_stays_while_ttft_meets_target_and_comes_back_when_it_misses() -> None:
    policy, state = prefill(), PoolState.new("prefill")
    for t, ttft in enumerate((0.1, 0.3, TARGET * 1.05)):  # below, below, within the band
        decision = decide(policy, state, 0, traffic(ttft, ready=None, busy=None), float(t))
        assert decision.desired == 0 and decision.metrics_available
        assert decision.predicted_replicas is None  # the planner would want prompts back on a replica
    back = decide(policy, state, 0, traffic(TARGET * 3, ready=None, busy=None), 10.0)
    assert back.desired >= 1 and "above target" in back.reason


async def test_a_pool_at_zero_has_signals_not_missing_data() -> None:
    """The router's TTFT is there; the prefill workers' series are not (no prefill worker runs)."""
    at_zero = PoolSignals(
        ttft=0.2,
        itl=0.01,
        request_rate=3.0,
        prompt_token_rate=300.0,
        generation_token_rate=90.0,
        prefill=WorkerSignals(),
        decode=WorkerSignals(replicas=1, running=2.0, waiting=0.0, busy=0.3, steps=30.0, tokens=60.0),
    )
    outcome = await PoolAutoscaler(FakeSource(at_zero)).evaluate(
        "team-a", "chat", spec(), {"prefill": 0, "decode": 1}, AutoscalerState(), 1000.0
    )
    assert outcome.condition.status == "True", outcome.condition.message
    assert outcome.replicas["prefill"] == 0 and "at zero" in outcome.decisions["prefill"].reason


def test_a_budget_leaves_a_stopped_prefill_pool_at_zero_and_gives_decode_the_rest() -> None:
    budget = Budget(None, 4, "nvidia.com/gpu", {"prefill": 0, "decode": 0})
    stopped = {"prefill": Claim(0, 0, 0.0, held=1), "decode": Claim(6, 1, 2.0, held=3)}
    assert split(budget, stopped).granted == {"prefill": 0, "decode": 4}
    # Back from zero under a full budget: a replica moves over only while prefill stays the worse-off
    # (the split rule); decode needing all of it keeps it, and the cap is said.
    decode_needs_all = {
        "prefill": Claim(1, 0, 3.0, held=0, needed=1),
        "decode": Claim(4, 1, 1.0, held=4, needed=4),
    }
    capped = split(budget, decode_needs_all)
    assert capped.granted == {"prefill": 0, "decode": 4} and "prefill" in capped.capped
    decode_needs_two = {
        "prefill": Claim(1, 0, 3.0, held=0, needed=1),
        "decode": Claim(4, 1, 1.0, held=4, needed=2),
    }
    assert split(budget, decode_needs_two).granted == {"prefill": 1, "decode": 3}
