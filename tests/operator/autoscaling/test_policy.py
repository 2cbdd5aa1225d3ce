"""The pure policy: HPA behavior semantics, the tolerance band, and closed-loop scenario tables."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from splitserve_operator.autoscaling.behavior import limit_step, stabilize, step_limit
from splitserve_operator.autoscaling.planner import Observation
from splitserve_operator.autoscaling.policy import PoolPolicy, PoolState, decide
from splitserve_operator.autoscaling_spec import AutoscalingSpec, ScaleDownRules, ScaleUpRules, ScalingRules
from splitserve_operator.models import (
    DecodePoolSpec,
    InferencePoolSpec,
    ItlSlo,
    ModelSpec,
    PrefillPoolSpec,
    ReplicaBounds,
    TtftSlo,
)
from tests.operator.autoscaling.autoscale_plant import DecodePlant, Loop, PrefillPlant


def spec(
    *,
    min_replicas: int = 1,
    max_replicas: int = 20,
    predictive: bool = True,
    down_window: int = 300,
    **auto: object,
) -> InferencePoolSpec:
    bounds = ReplicaBounds(min=min_replicas, max=max_replicas)
    return InferencePoolSpec(
        model=ModelSpec(name="m"),
        prefill=PrefillPoolSpec(replicas=bounds, slo=TtftSlo(ttft_seconds=0.5, percentile=0.9)),
        decode=DecodePoolSpec(replicas=bounds, slo=ItlSlo(itl_seconds=0.01, percentile=0.9), max_num_seqs=64),
        autoscaling=AutoscalingSpec(
            predictive=predictive,
            scale_down=ScaleDownRules(
                stabilization_window_seconds=down_window, max_step=1, max_step_percent=10
            ),
            **auto,
        ),
    )


def prefill_policy(**kwargs: object) -> PoolPolicy:
    return PoolPolicy.from_spec(spec(**kwargs), "prefill")  # type: ignore[arg-type]


# ---- behavior semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "rules", "allowed"),
    [
        (1, ScalingRules(max_step=4, max_step_percent=100), 4),  # maxStep wins at small sizes
        (10, ScalingRules(max_step=4, max_step_percent=100), 10),  # percent wins at large sizes
        (10, ScalingRules(max_step=1, max_step_percent=10), 1),
        (25, ScalingRules(max_step=1, max_step_percent=10), 3),  # ceil(2.5)
    ],
)
def test_step_limit_is_the_larger_of_step_and_percent(
    current: int, rules: ScalingRules, allowed: int
) -> None:
    assert step_limit(current, rules) == allowed


@pytest.mark.parametrize(
    ("current", "wanted", "expected"),
    [
        (2, 50, 6),  # up: +max(4, 100% of 2)
        (10, 50, 20),  # up: +100%
        (10, 1, 9),  # down: -max(1, 10%)
        (30, 1, 27),
        (5, 5, 5),
    ],
)
def test_limit_step(current: int, wanted: int, expected: int) -> None:
    assert limit_step(current, wanted, prefill_policy()) == expected


@pytest.mark.parametrize(
    ("history", "current", "expected", "why"),
    [
        (
            [(0, 3), (100, 8), (300, 5)],
            9,
            8,
            "scale-down goes only to the highest recommendation in its window",
        ),
        ([(100, 8), (300, 2)], 5, 5, "a higher recommendation in the window holds the current replicas"),
        ([(-10, 9), (100, 2), (300, 2)], 5, 2, "the 9 fell out of the window"),
        ([(290, 9), (300, 7)], 5, 7, "scale-up without a window acts on the newest recommendation"),
    ],
)
def test_stabilize(history: list[tuple[float, int]], current: int, expected: int, why: str) -> None:
    assert stabilize(history, current, 300.0, prefill_policy(), None) == expected, why


def test_scale_up_window_takes_the_lowest_recommendation() -> None:
    policy = prefill_policy(scale_up=ScaleUpRules(stabilization_window_seconds=60))
    assert stabilize([(250, 9), (280, 6), (300, 8)], 4, 300.0, policy, None) == 6


def test_a_fresh_state_counts_current_replicas_as_recommended() -> None:
    """After an operator restart nothing is known yet: no scale-down until a whole window was watched."""
    policy = prefill_policy()
    assert stabilize([(10, 2)], 6, 10.0, policy, hold_since=10.0) == 6
    assert stabilize([(400, 2)], 6, 400.0, policy, hold_since=10.0) == 2


# ---- one decision -------------------------------------------------------------------------------


def observation(latency: float | None, *, rate: float | None = 5.0, ready: int | None = 4) -> Observation:
    demand = None if rate is None else rate * 100
    return Observation(latency=latency, request_rate=rate, demand=demand, ready=ready)


@pytest.mark.parametrize(
    ("latency", "expected", "words"),
    [
        (1.0, 8, "above target"),  # ratio 2: ceil(4 * 2)
        (0.56, 5, "above target"),  # ratio 1.12: at least one more
        (0.54, 4, "within target"),  # inside the 10 % band: hold
        (0.46, 4, "within target"),
        (0.30, 3, "below target"),  # without a planner: HPA's ceil(4 * 0.6), stabilization 0 here
        (0.44, 4, "below target"),  # ceil(4 * 0.88) = 4: the ratio does not justify dropping one
    ],
)
def test_feedback_tolerance_band(latency: float, expected: int, words: str) -> None:
    policy = prefill_policy(predictive=False, down_window=0)
    state = PoolState.new("prefill")
    state.started = state.settled_since = -1000.0  # all replicas served for long
    decision = decide(policy, state, 4, observation(latency), now=0.0)
    assert decision.desired == expected
    assert words in decision.reason
    assert decision.observed_latency == latency and decision.target == 0.5


@pytest.mark.parametrize(
    ("obs", "unavailable", "why"),
    [
        (None, "Prometheus at http://x unreachable", "unreachable"),
        (observation(None), None, "no TTFT samples although requests are flowing"),
        (observation(0.9, rate=None), None, "no request rate at the router"),
        (observation(50.0, rate=None, ready=None), None, "no request rate at the router"),
    ],
)
def test_missing_data_holds_replicas(obs: Observation | None, unavailable: str | None, why: str) -> None:
    decision = decide(prefill_policy(), PoolState.new("prefill"), 6, obs, now=0.0, unavailable=unavailable)
    assert decision.desired == 6
    assert not decision.metrics_available
    assert why in decision.reason


def test_draining_after_traffic_stops_holds_without_a_missing_data_alarm() -> None:
    """No arrivals and no latency samples over the window, but work was still running in it (the
    gauges' window average): not idle yet, and not missing data either."""
    draining = Observation(latency=None, request_rate=0.0, demand=0.0, ready=4, running=2.0, waiting=0.0)
    decision = decide(prefill_policy(), PoolState.new("prefill"), 6, draining, now=0.0)
    assert decision.desired == 6 and decision.metrics_available
    assert "draining" in decision.reason


def test_bounds_apply_even_while_holding() -> None:
    decision = decide(prefill_policy(max_replicas=4), PoolState.new("prefill"), 9, None, 0.0, "down")
    assert decision.desired == 4
    assert "bounds" in decision.reason


# ---- closed-loop scenarios ----------------------------------------------------------------------


def changes(series: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(series) if a != b)


def direction_flips(series: list[int]) -> int:
    """How often the direction of change reverses: the measure of flapping."""
    moves = [b - a for a, b in itertools.pairwise(series) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


@pytest.mark.parametrize("predictive", [True, False])
def test_steady_load_settles_once_and_stays(predictive: bool) -> None:
    loop = Loop(prefill_policy(predictive=predictive), PrefillPlant(), current=5)
    replicas = loop.run([30.0] * 120)  # 5 replicas 60 % busy: TTFT 0.25 s, half the 0.5 s target
    assert replicas[-1] == 4  # 75 % busy: TTFT 0.4 s; 3 replicas would saturate
    assert changes(replicas) == 1, loop.history
    assert loop.history[-1][2] == 0.4


def test_noisy_load_does_not_flap() -> None:
    """+-15 % noise around a load that 4 replicas carry at 75 % busy: one move, then quiet. (Latency
    feedback alone cannot do this near saturation, where latency is far from proportional to load:
    that is what the planner is for; see docs/autoscaling.md.)"""
    rng = random.Random(3)
    loads = [30.0 * (1 + rng.uniform(-0.15, 0.15)) for _ in range(240)]
    replicas = Loop(prefill_policy(), PrefillPlant(), current=5).run(loads)
    assert direction_flips(replicas) == 0
    assert changes(replicas) <= 2


@pytest.mark.parametrize("predictive", [True, False])
def test_step_scales_up_within_two_intervals_and_settles(predictive: bool) -> None:
    loop = Loop(prefill_policy(predictive=predictive), PrefillPlant(), current=4, startup=4)
    replicas = loop.run([25.0] * 30 + [75.0] * 60)
    assert max(replicas[30:32]) > 4, loop.history[29:33]
    assert replicas[-1] >= 9  # 75 req/s at 10 per replica needs more than 7.5 replicas
    assert loop.history[-1][2] is not None and loop.history[-1][2] <= 0.5 * 1.1
    assert max(replicas) <= 20


def test_ramp_predictive_scales_before_the_breach() -> None:
    """With a rising load the planner adds replicas ahead of latency; feedback alone lags behind it."""
    loads = [10.0 + 0.5 * k for k in range(120)]  # 10 -> 70 req/s over 30 minutes

    def breaches(predictive: bool) -> int:
        loop = Loop(prefill_policy(predictive=predictive), PrefillPlant(), current=2, startup=4)
        loop.run(loads)
        return sum(1 for _, _, latency, _ in loop.history if latency is not None and latency > 0.55)

    assert breaches(predictive=True) < breaches(predictive=False)
    assert breaches(predictive=True) <= 3


def test_spike_scales_up_fast_and_down_slowly() -> None:
    loop = Loop(prefill_policy(), PrefillPlant(), current=3)
    replicas = loop.run([15.0] * 30 + [60.0] * 2 + [15.0] * 60)
    up = replicas[30]
    # The replicas that drain the spike's queue come in one evaluation, past the 4-or-100 % step limit.
    assert up > 2 * replicas[29] + 4
    # The replicas that drained the spike's queue go with it, down to the highest recommendation of the
    # 300 s (20 intervals) window, which holds until that window has passed...
    assert all(b <= a for a, b in itertools.pairwise(replicas[30:50]))
    assert min(replicas[40:50]) == max(replicas[40:50]) > 3
    # ...then at most max(1, 10 % of the pool) per evaluation, back to a small pool.
    drops = [(a, a - b) for a, b in itertools.pairwise(replicas[50:]) if b < a]
    assert drops and all(drop <= max(1, math.ceil(0.1 * pool)) for pool, drop in drops)
    assert replicas[-1] <= 4


def test_idle_goes_to_min_after_the_scale_down_window() -> None:
    loop = Loop(prefill_policy(min_replicas=2), PrefillPlant(), current=6)
    replicas = loop.run([45.0] * 30 + [0.0] * 60)  # 6 replicas 75 % busy, then nothing
    assert replicas[:49] == [6] * 49  # the 300 s window still holds the busy recommendations
    assert replicas[-1] == 2
    assert all(a - b <= 1 for a, b in itertools.pairwise(replicas))
    assert "idle" in loop.history[-1][3]


def test_missing_data_in_the_middle_of_a_run_holds() -> None:
    policy, state = prefill_policy(), PoolState.new("prefill")
    plant = PrefillPlant()
    for k in range(10):
        decide(policy, state, 5, plant.observe(30.0, 5), k * 15.0)
    busy = plant.observe(30.0, 5)
    garbage = [
        (None, "Prometheus down"),
        (Observation(latency=None, request_rate=busy.request_rate, demand=busy.demand), None),
        (Observation(latency=busy.latency, request_rate=None, demand=None), None),
    ]
    for k, (obs, unavailable) in enumerate(garbage):
        held = decide(policy, state, 5, obs, (10 + k) * 15.0, unavailable=unavailable)
        assert held.desired == 5 and not held.metrics_available
    after = decide(policy, state, 5, plant.observe(30.0, 5), 13 * 15.0)
    assert after.metrics_available and after.desired == 5


def test_decode_scales_on_itl() -> None:
    policy = PoolPolicy.from_spec(spec(), "decode")
    loop = Loop(policy, DecodePlant(), current=2, startup=2)
    replicas = loop.run([20.0] * 20 + [90.0] * 60)  # 2 replicas would step at 20 ms at 90 req/s
    assert replicas[-1] > replicas[19]
    assert loop.history[-1][2] is not None and loop.history[-1][2] <= 0.01 * 1.1
    assert direction_flips(replicas) <= 1
