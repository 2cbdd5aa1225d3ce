"""Queue-aware sizing: the projected queue, the drain size, arrivals from a standing queue, and the policy
that keeps drain replicas out of its stabilization history and off latency feedback."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from splitserve_operator.autoscaling.backlog import QueueWatch, Startups, drain_replicas, projected_queue
from splitserve_operator.autoscaling.planner import Observation, Plan, Sizing
from splitserve_operator.autoscaling.policy import PoolPolicy, PoolState, decide
from splitserve_operator.models import InferencePoolSpec, ModelSpec, PrefillPoolSpec, ReplicaBounds, TtftSlo


def test_the_queue_is_projected_to_when_a_replica_asked_for_now_serves() -> None:
    # 1000 queued, 300/s arriving, 4 ready at 36/s each, 4 more serving in 20 s, start-up 60 s.
    pool = Startups(ready=4, pending=4, pending_in=20.0, startup=60.0)
    first = 1000 + (300 - 4 * 36) * 20
    assert projected_queue(1000, 300, 36, pool) == pytest.approx(first + (300 - 8 * 36) * 40)
    # Enough replicas in flight: the queue is gone before any new one could serve, nothing more to ask.
    assert projected_queue(1000, 300, 36, Startups(ready=4, pending=10, pending_in=20.0, startup=60.0)) == 0
    assert drain_replicas(
        1000, 300, 36, Startups(ready=4, pending=10, pending_in=20.0, startup=60.0), 15
    ) == (0, 0)


def test_drain_replicas_serve_the_arrivals_and_the_projected_queue_by_the_deadline() -> None:
    pool = Startups(ready=4, pending=0, pending_in=0.0, startup=60.0)
    replicas, backlog = drain_replicas(1000, 300, 36, pool, deadline=30)
    assert backlog == pytest.approx(1000 + (300 - 144) * 60)
    assert replicas == -(-(300 + backlog / 30) // 36)  # ceil
    # A shorter deadline asks for more.
    assert drain_replicas(1000, 300, 36, pool, deadline=15)[0] > replicas


def test_a_standing_queue_reveals_the_arrivals_and_noise_does_not() -> None:
    watch = QueueWatch()
    watch.update(0.0, 0.0, 144.0, ready=4)
    assert watch.arrivals is None
    watch.update(15.0, 2250.0, 144.0, ready=4)  # grew by 150/s while serving 144/s
    assert watch.arrivals == pytest.approx(294.0)
    watch.update(30.0, 1500.0, 288.0, ready=8)  # drains by 50/s at 288/s
    assert watch.arrivals == pytest.approx(238.0)
    watch.update(45.0, 3.0, 288.0, ready=8)  # three requests over eight replicas: Poisson noise
    assert watch.arrivals is None


@dataclass
class Draining:
    """A planner that asks for `replicas` to drain a queue, `steady` for the arrivals alone."""

    replicas: int
    steady: int

    def learn(self, obs: Observation, now: float, sizing: Sizing, settled: bool) -> None:
        return None

    def plan(self, obs: Observation, sizing: Sizing) -> Plan:
        return Plan(self.replicas, 1.0, "drain", steady=self.steady)


def test_drain_replicas_bypass_stabilization_and_latency_feedback_and_go_with_the_queue() -> None:
    spec = InferencePoolSpec(
        model=ModelSpec(name="m"),
        prefill=PrefillPoolSpec(replicas=ReplicaBounds(min=1, max=40), slo=TtftSlo(ttft_seconds=0.1)),
    )
    policy = PoolPolicy.from_spec(spec, "prefill")
    planner = Draining(replicas=14, steady=10)
    state = PoolState(planner=planner)

    def obs(waiting: float, latency: float, ready: int = 8) -> Observation:
        return Observation(latency=latency, request_rate=300.0, demand=1.0, ready=ready, waiting=waiting)

    # TTFT 600x the target: feedback alone would ask for thousands; the planner's drain size wins.
    first = decide(policy, state, 8, obs(5000, 60.0), now=0.0)
    assert first.desired == 14 and "draining a queue" in first.reason
    assert [rec for _, rec in state.history] == [10]  # the history holds the arrivals' size only
    # While the queue stands, the replicas it was sized with stay, though the planner now asks for less.
    planner.replicas = 10
    assert decide(policy, state, 14, obs(3000, 60.0), now=15.0).desired == 14
    # Queue gone, the latency window still full of it: no feedback on it.
    settling = decide(policy, state, 14, obs(0, 30.0, ready=14), now=30.0)
    assert settling.desired == 14 and "feedback" not in settling.reason
    # A scale-down window later the pool steps down towards the arrivals' 10, by the scale-down rules,
    # never below them (the burst memory holds the burst's size).
    after = decide(policy, state, 14, obs(0, 0.05, ready=14), now=330.0)
    assert 10 <= after.desired < 14


def test_start_ups_in_flight_use_the_start_up_time_learned_on_the_pool() -> None:
    state = PoolState.new("prefill")
    assert state.startups(current=4, ready=4, now=0.0, window=60.0).startup == 60.0  # a window until seen
    state.scaling_up = (0.0, 8)
    state.track_startup(ready=8, now=75.0)  # the 8 asked for at 0 all serve at 75
    assert state.startup == 75.0
    state.scaling_up = (100.0, 12)
    assert state.startups(current=12, ready=8, now=130.0, window=60.0) == Startups(
        ready=8, pending=4, pending_in=45.0, startup=75.0
    )
