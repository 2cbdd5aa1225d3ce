"""The predictive planner: forecasting, queueing model, online capacity learning, sizing."""

from __future__ import annotations

import math

import pytest

from splitserve_operator.autoscaling.planner import (
    DECODE_SIGMAS,
    PREFILL_HEADROOM,
    DecodePlanner,
    Forecaster,
    Observation,
    PrefillPlanner,
    Sizing,
    StepModel,
    erlang_c,
    prefill_ttft,
    replicas_for_ttft,
)

SIZING = Sizing(target=0.5, percentile=0.9, horizon=30.0, drain=60.0, max_num_seqs=64)


def test_forecaster_follows_level_and_trend_and_never_goes_negative() -> None:
    steady = Forecaster()
    for k in range(20):
        steady.update(15.0 * k, 100.0)
    assert steady.forecast(60) == pytest.approx(100.0)
    ramp = Forecaster()
    for k in range(40):
        ramp.update(15.0 * k, 100.0 + 2.0 * 15 * k)  # +2 per second
    assert ramp.forecast(60) == pytest.approx(100 + 2 * 15 * 39 + 2 * 60, rel=0.02)
    falling = Forecaster()
    for k in range(10):
        falling.update(15.0 * k, 500 - 20.0 * k)
    assert falling.trend < 0 and falling.forecast(600) == 0.0


def test_forecaster_does_not_extrapolate_a_trend_that_is_noise() -> None:
    wandering = Forecaster()
    for k in range(40):  # 100 +- 5, no trend
        wandering.update(15.0 * k, 100.0 + (5.0 if (k * 7) % 3 == 0 else -5.0))
    assert wandering.trend != 0.0 and wandering.significant_trend() == 0.0
    assert wandering.forecast(600) == pytest.approx(wandering.level)
    noisy_ramp = Forecaster()
    for k in range(40):  # +1 per second, the same noise
        noisy_ramp.update(15.0 * k, 100.0 + 15.0 * k + (5.0 if (k * 7) % 3 == 0 else -5.0))
    assert 0.5 < noisy_ramp.significant_trend() <= noisy_ramp.trend  # most of it stands out


@pytest.mark.parametrize(
    ("servers", "offered", "expected"),
    [
        (1, 0.5, 0.5),  # M/M/1: P(wait) = utilisation
        (2, 1.0, 1 / 3),
        (3, 3.0, 1.0),  # saturated
    ],
)
def test_erlang_c(servers: int, offered: float, expected: float) -> None:
    assert erlang_c(servers, offered) == pytest.approx(expected)


def test_prefill_model_is_monotonic() -> None:
    service = 0.1
    assert prefill_ttft(4, 1.0, service, 0.9) == service  # nobody waits at 2.5 % busy
    by_load = [prefill_ttft(4, rate, service, 0.9) for rate in (10, 20, 30, 38)]
    assert by_load == sorted(by_load) and by_load[-1] > by_load[0]
    by_size = [prefill_ttft(n, 30, service, 0.9) for n in (4, 5, 8)]
    assert by_size == sorted(by_size, reverse=True)
    assert prefill_ttft(3, 30, service, 0.9) == math.inf


def test_replicas_for_ttft() -> None:
    assert replicas_for_ttft(30, 0.1, target=0.05, percentile=0.9) is None  # one prompt misses alone
    small, large = replicas_for_ttft(30, 0.1, 0.3, 0.9), replicas_for_ttft(300, 0.1, 0.3, 0.9)
    assert small is not None and large is not None and 4 <= small < large <= 40
    # Pooling: ten times the load needs fewer than ten times the replicas.
    assert large < 10 * small


def prefill_obs(rate: float, ready: int, latency: float = 0.3, waiting: float = 0.0) -> Observation:
    """`rate` requests/s of 100 tokens, computed at 1000 tokens per busy second."""
    return Observation(
        latency=latency,
        request_rate=rate,
        demand=rate * 100,
        ready=ready,
        waiting=waiting,
        busy=rate * 0.1,
        steps=rate,
        tokens=rate * 100,
    )


def test_prefill_planner_learns_capacity_and_sizes_for_the_load() -> None:
    planner = PrefillPlanner()
    assert planner.plan(prefill_obs(20, 4), SIZING).replicas is None  # nothing learned yet
    for k in range(10):
        planner.learn(prefill_obs(20, 4), 15.0 * k, SIZING, settled=True)
    assert planner.tokens_per_busy_second == pytest.approx(1000)
    at_20 = planner.plan(prefill_obs(20, 4), SIZING)
    assert at_20.replicas is not None and at_20.load == pytest.approx(2000)
    # Sized for the forecast arrivals plus the headroom, at the TTFT target.
    assert at_20.replicas == replicas_for_ttft(20 * (1 + PREFILL_HEADROOM), 0.1, 0.5, 0.9)
    for k in range(10, 20):
        planner.learn(prefill_obs(40, 4), 15.0 * k, SIZING, settled=False)
    at_40 = planner.plan(prefill_obs(40, 4), SIZING)
    assert at_40.replicas is not None and at_40.replicas > at_20.replicas
    # 6000 prompts queued, drained within the 60 s drain time on top of the forecast arrivals (~40/s),
    # at 10 prompts/s per replica: (40 + 6000 / 60) / 10.
    queued = planner.plan(prefill_obs(40, 4, waiting=6000), SIZING)
    assert queued.load == at_40.load and queued.steady == at_40.replicas
    assert queued.replicas == math.ceil((at_40.load / 100 + 100) / 10) and "drain 6000 prompts" in queued.note
    assert "prompt tokens/s forecast" in at_40.note


def test_prefill_correction_learns_only_near_the_target_from_a_settled_pool() -> None:
    planner = PrefillPlanner()
    for k in range(30):  # 4 replicas 50 % busy: the model says ~0.11 s, 0.3 s is observed
        planner.learn(prefill_obs(20, 4, latency=0.3), 15.0 * k, SIZING, settled=True)
    assert planner.correction == pytest.approx(0.3 / prefill_ttft(4, 20, 0.1, 0.9), rel=0.01)
    before = planner.correction
    planner.learn(prefill_obs(20, 4, latency=0.9), 200.0, SIZING, settled=False)  # replicas starting
    planner.learn(prefill_obs(20, 4, latency=0.1), 215.0, SIZING, settled=True)  # far below the target
    planner.learn(prefill_obs(20, 4, latency=0.9, waiting=50), 230.0, SIZING, settled=True)  # backlog
    assert planner.correction == before


def decode_obs(batch: float, latency: float | None = 0.005, kv_usage: float | None = None) -> Observation:
    """Two replicas stepping at 2 ms + 0.2 ms per sequence over `batch` sequences each."""
    ready = 2
    step = 0.002 + 0.0002 * batch
    steps = ready / step
    return Observation(
        latency=latency,
        request_rate=steps * batch / 100,
        demand=steps * batch,
        ready=ready,
        running=batch * ready,
        waiting=0.0,
        kv_usage=kv_usage,
        busy=float(ready),
        steps=steps,
        tokens=steps * batch,
    )


def test_step_model_needs_spread_and_keeps_its_last_line() -> None:
    model = StepModel()
    for _ in range(5):
        model.add(8.0, 0.0036)
    assert model.line is None  # one batch size cannot tell slope from intercept
    for batch in (2, 4, 8, 16, 24, 32, 4, 12):
        model.add(batch, 0.002 + 0.0002 * batch)
    assert model.line == pytest.approx((0.002, 0.0002), rel=1e-3)
    for _ in range(500):
        model.add(8.0, 0.0036)
    assert model.line == pytest.approx((0.002, 0.0002), rel=1e-2)
    assert model.largest_batch == 32


def trained_decode_planner() -> DecodePlanner:
    planner = DecodePlanner()
    for k, batch in enumerate((2, 4, 8, 16, 24, 12, 6, 10)):
        planner.learn(decode_obs(batch, latency=None), 15.0 * k, SIZING, settled=True)
    return planner


@pytest.mark.parametrize(
    ("target", "max_num_seqs", "kv_usage", "bound", "batch"),
    [
        (0.01, 64, None, "ITL target", 40),  # (10 ms - 2 ms) / 0.2 ms
        (0.01, 16, None, "maxNumSeqs", 16),
        (0.01, 64, 0.5, "KV cache", 0.9 * 12 / 0.5),  # 12 streams fill half the cache
        (0.02, 256, None, "extrapolation", 48),  # twice the largest batch seen (24)
    ],
)
def test_decode_planner_batch_limits(
    target: float, max_num_seqs: int, kv_usage: float | None, bound: str, batch: float
) -> None:
    planner = trained_decode_planner()
    sizing = Sizing(target=target, percentile=0.9, horizon=0.0, drain=60.0, max_num_seqs=max_num_seqs)
    plan = planner.plan(decode_obs(12, kv_usage=kv_usage), sizing)
    assert bound in plan.note and f"{batch:.3g} per replica" in plan.note
    assert plan.load is not None
    streams = plan.load + DECODE_SIGMAS * math.sqrt(plan.load)  # plus the Poisson spread of the streams
    assert plan.replicas == max(1, math.ceil(streams / batch - 1e-6))


def test_decode_planner_uses_littles_law_and_reports_infeasible_targets() -> None:
    planner = trained_decode_planner()
    for k in range(10):  # the load settles at batch 12
        planner.learn(decode_obs(12, latency=None), 200.0 + 15 * k, SIZING, settled=True)
    plan = planner.plan(decode_obs(12), Sizing(0.01, 0.9, 0.0, 60.0, 64))
    tokens_per_second = decode_obs(12).demand
    assert tokens_per_second is not None and plan.load == pytest.approx(tokens_per_second * 0.010, rel=0.05)
    hopeless = planner.plan(decode_obs(12), Sizing(0.0015, 0.9, 0.0, 60.0, 64))
    assert hopeless.replicas is None and "over the ITL target" in hopeless.note


def test_decode_correction_is_itl_percentile_over_the_step_one_spread_above_the_mean_batch() -> None:
    planner = trained_decode_planner()
    modelled = 0.002 + 0.0002 * (20 + math.sqrt(20 / 2))  # two replicas at a mean batch of 20
    for k in range(20):
        obs = decode_obs(20, latency=1.5 * modelled)
        planner.learn(obs, 200.0 + 15 * k, Sizing(0.01, 0.9, 0.0, 60.0, 64), settled=True)
    assert planner.correction == pytest.approx(1.5, rel=0.01)
