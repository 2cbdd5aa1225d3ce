"""The kopf-free glue: one evaluation -> replicas, status fields, the MetricsAvailable condition, events."""

from __future__ import annotations

from typing import Literal

import pytest

from splitserve_operator.autoscaling.evaluator import (
    METRICS_AVAILABLE,
    AutoscalerState,
    Outcome,
    PoolAutoscaler,
)
from splitserve_operator.autoscaling.signals import (
    PoolSignals,
    SignalQuery,
    SignalsUnavailableError,
    WorkerSignals,
)
from splitserve_operator.autoscaling_spec import AutoscalingSpec
from splitserve_operator.conditions import rfc3339
from splitserve_operator.models import InferencePoolSpec, ModelSpec, PrefillPoolSpec, ReplicaBounds, TtftSlo
from splitserve_operator.status_models import Condition, InferencePoolStatus, PoolStatus

SPEC = InferencePoolSpec(
    model=ModelSpec(name="m"),
    prefill=PrefillPoolSpec(replicas=ReplicaBounds(min=1, max=10), slo=TtftSlo(ttft_seconds=1.0)),
    autoscaling=AutoscalingSpec(predictive=False, window_seconds=30),
)
BUSY = PoolSignals(
    ttft=3.0,
    itl=0.05,
    request_rate=5.0,
    prompt_token_rate=500.0,
    generation_token_rate=100.0,
    prefill=WorkerSignals(replicas=2),
    decode=WorkerSignals(replicas=1),
)


class FakeSource:
    """Answers with whatever the test sets: signals, or a SignalsUnavailableError."""

    def __init__(self, answer: PoolSignals | SignalsUnavailableError) -> None:
        self.answer = answer
        self.queries: list[SignalQuery] = []

    async def read(self, query: SignalQuery) -> PoolSignals:
        self.queries.append(query)
        if isinstance(self.answer, SignalsUnavailableError):
            raise self.answer
        return self.answer


async def evaluate(
    source: FakeSource, state: AutoscalerState, now: float, current: dict[str, int] | None = None
) -> Outcome:
    replicas = current or {"prefill": 2, "decode": 1}
    return await PoolAutoscaler(source).evaluate("team-a", "chat", SPEC, replicas, state, now)  # type: ignore[arg-type]


async def test_scale_up_is_explained_in_status_and_an_event() -> None:
    source, state = FakeSource(BUSY), AutoscalerState()
    outcome = await evaluate(source, state, now=1000.0)
    assert source.queries == [SignalQuery("chat", 30, 0.9, 0.9, namespace="team-a")]
    assert outcome.replicas == {"prefill": 6, "decode": 1}  # TTFT 3x the target on 2 ready replicas
    assert outcome.changed == {"prefill": 6}
    status = outcome.status_patch()
    assert status["prefill"] == {
        "desiredReplicas": 6,
        "observedLatencySeconds": 3.0,
        "targetLatencySeconds": 1.0,
        "predictedReplicas": None,
        "predictedLoad": None,
        "reason": outcome.decisions["prefill"].reason,
        "lastScaleTime": rfc3339(1000.0),
        "startupSeconds": None,
    }
    assert set(status["decode"]) <= set(PoolStatus.model_json_schema(by_alias=True)["properties"])
    assert "above target" in status["prefill"]["reason"]
    assert outcome.condition.type == METRICS_AVAILABLE and outcome.condition.status == "True"
    assert [(e.type, e.reason) for e in outcome.events] == [("Normal", "Autoscaled")]
    assert outcome.events[0].message.startswith("prefill: 2 -> 6 replicas")


async def test_unavailable_signals_hold_replicas_and_flip_the_condition_once() -> None:
    source, state = FakeSource(BUSY), AutoscalerState()
    await evaluate(source, state, now=1000.0)
    source.answer = SignalsUnavailableError("PrometheusUnreachable", "cannot reach Prometheus at http://p")
    down = await evaluate(source, state, now=1015.0, current={"prefill": 6, "decode": 1})
    assert down.replicas == {"prefill": 6, "decode": 1} and down.changed == {}
    assert (down.condition.status, down.condition.reason) == ("False", "PrometheusUnreachable")
    assert down.condition.last_transition_time == rfc3339(1015.0)
    assert [(e.type, e.reason) for e in down.events] == [("Warning", "MetricsUnavailable")]
    assert down.status_patch()["prefill"]["observedLatencySeconds"] is None
    assert "cannot reach Prometheus" in down.status_patch()["prefill"]["reason"]

    still = await evaluate(source, state, now=1030.0, current={"prefill": 6, "decode": 1})
    assert still.events == () and still.condition.last_transition_time == rfc3339(1015.0)

    source.answer = BUSY
    back = await evaluate(source, state, now=1045.0, current={"prefill": 6, "decode": 1})
    assert back.condition.status == "True" and back.condition.last_transition_time == rfc3339(1045.0)
    assert ("Normal", "MetricsAvailable") in [(e.type, e.reason) for e in back.events]


async def test_missing_series_hold_that_pool_with_the_reason() -> None:
    no_router = PoolSignals(prefill=WorkerSignals(replicas=2), decode=WorkerSignals(replicas=1))
    outcome = await evaluate(FakeSource(no_router), AutoscalerState(), now=0.0)
    assert outcome.replicas == {"prefill": 2, "decode": 1}
    assert (outcome.condition.status, outcome.condition.reason) == ("False", "MissingData")
    assert "no request rate at the router" in outcome.condition.message


async def test_idle_is_not_missing_data() -> None:
    idle = PoolSignals(request_rate=0.0, prompt_token_rate=0.0, generation_token_rate=0.0)
    state = AutoscalerState()
    outcome = await evaluate(FakeSource(idle), state, now=0.0, current={"prefill": 3, "decode": 2})
    assert outcome.condition.status == "True"
    assert "idle" in outcome.decisions["prefill"].reason
    assert outcome.replicas == {"prefill": 3, "decode": 2}  # a fresh state first watches a window
    later = await evaluate(FakeSource(idle), state, now=400.0, current={"prefill": 3, "decode": 2})
    assert later.replicas == {"prefill": 2, "decode": 1}


async def test_disabled_autoscaling_is_refused() -> None:
    disabled = SPEC.model_copy(update={"autoscaling": AutoscalingSpec(enabled=False)})
    with pytest.raises(ValueError, match="disabled"):
        await PoolAutoscaler(FakeSource(BUSY)).evaluate(
            None, "chat", disabled, {"prefill": 1, "decode": 1}, AutoscalerState(), 0.0
        )


def condition(status: Literal["True", "False"], reason: str, since: str | None = None) -> Condition:
    return Condition(type=METRICS_AVAILABLE, status=status, reason=reason, last_transition_time=since)


def test_resume_carries_on_from_status() -> None:
    status = InferencePoolStatus(
        conditions=[condition("False", "QueryFailed", "2026-01-01T00:00:00Z")],
        prefill=PoolStatus(last_scale_time="2026-01-01T00:00:10Z"),
    )
    state = AutoscalerState.resume(status)
    assert state.condition is not None and state.condition.reason == "QueryFailed"
    assert state.pools["prefill"].last_scale_time == pytest.approx(1767225610.0)
    assert state.pools["decode"].last_scale_time is None
    assert state.due(now=0.0, interval=15)
    state.last_evaluation = 100.0
    assert not state.due(now=110.0, interval=15) and state.due(now=115.0, interval=15)
