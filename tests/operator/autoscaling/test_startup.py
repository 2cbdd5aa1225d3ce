"""The start-up estimate the planner sizes for: the workers' own measurement (exported as
splitserve_startup_seconds) until a scale-up is timed, written into status and read back after a restart."""

from __future__ import annotations

from dataclasses import replace

from splitserve.contract import names
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler
from splitserve_operator.autoscaling.signals import SignalQuery, WorkerSignals, promql, signal_specs
from splitserve_operator.status_models import InferencePoolStatus, PoolStatus

from .test_evaluator import BUSY, SPEC, FakeSource

MEASURED = replace(BUSY, prefill=WorkerSignals(replicas=2, startup=42.0), decode=WorkerSignals(replicas=1))


def test_the_startup_signal_is_the_workers_gauge() -> None:
    query = SignalQuery("chat", 30, 0.9, 0.9, namespace="team-a")
    spec = signal_specs(query)["prefill.startup"]
    assert promql(spec, query) == (
        f'avg(avg_over_time({names.STARTUP_SECONDS}{{pool="chat",role="prefill",namespace="team-a"}}[30s]))'
    )


async def test_the_measured_startup_seeds_the_estimate_and_reaches_status() -> None:
    state = AutoscalerState()
    outcome = await PoolAutoscaler(FakeSource(MEASURED)).evaluate(
        "team-a", "chat", SPEC, {"prefill": 2, "decode": 1}, state, 1000.0
    )
    assert state.pools["prefill"].startup == 42.0
    status = outcome.status_patch()
    assert status["prefill"]["startupSeconds"] == 42.0
    assert status["decode"]["startupSeconds"] is None, "no decode measurement yet"
    # A scale-up timed from decision to ready (scheduling and pulls included) moves the estimate from
    # the measurement toward what it saw: the learned average starts from the measurement.
    state.pools["prefill"].scaling_up = (1000.0, 2)
    await PoolAutoscaler(FakeSource(MEASURED)).evaluate(
        "team-a", "chat", SPEC, {"prefill": 2, "decode": 1}, state, 1090.0
    )
    assert state.pools["prefill"].startup == (42.0 + 90.0) / 2


def test_an_operator_restart_resumes_from_the_status() -> None:
    status = InferencePoolStatus(prefill=PoolStatus(startup_seconds=75.0))
    state = AutoscalerState.resume(status)
    assert state.pools["prefill"].startup == 75.0 and state.pools["decode"].startup is None
