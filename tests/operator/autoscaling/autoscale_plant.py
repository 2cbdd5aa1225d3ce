"""A tiny synthetic pool for closed-loop policy tests: load in, Observation out, replicas start late.

Prefill: each replica serves `capacity` requests/s of `prompt_tokens` tokens; TTFT at the percentile
grows like an M/M/1 response time, service / (1 - utilisation), and a backlog builds in overload.
Decode: step time = base + per_seq * batch, ITL = 1.2 x step, batch = streams per replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve_operator.autoscaling.planner import Observation
from splitserve_operator.autoscaling.policy import PoolPolicy, PoolState, decide


def idle(ready: int) -> Observation:
    """No traffic over the window: no latency samples, every rate zero."""
    return Observation(
        latency=None,
        request_rate=0.0,
        demand=0.0,
        ready=ready,
        running=0.0,
        waiting=0.0,
        busy=0.0,
        steps=0.0,
        tokens=0.0,
    )


@dataclass
class PrefillPlant:
    capacity: float = 10.0  # requests/s per replica
    prompt_tokens: float = 100.0
    service: float = 0.1  # seconds per request

    def observe(self, load: float, ready: int, backlog: float = 0.0) -> Observation:
        if load == 0:
            return idle(ready)
        utilisation = load / (ready * self.capacity)
        latency = self.service / (1 - utilisation) if utilisation < 0.98 else 30.0
        served = min(load, ready * self.capacity)
        return Observation(
            latency=latency + backlog / (ready * self.capacity),
            request_rate=load,
            demand=load * self.prompt_tokens,
            ready=ready,
            running=min(load * self.service, ready),
            waiting=backlog,
            busy=served * self.service,
            steps=served,
            tokens=served * self.prompt_tokens,
        )


@dataclass
class DecodePlant:
    base: float = 0.002  # seconds per step
    per_seq: float = 0.0002  # seconds per sequence in the batch
    output_tokens: float = 100.0

    def observe(self, load: float, ready: int) -> Observation:
        """`load` is requests/s; streams in flight follow from Little's law at the current step time."""
        if load == 0:
            return idle(ready)
        per_replica = load / ready * self.output_tokens
        denominator = max(1 - per_replica * self.per_seq, 0.05)
        batch = per_replica * self.base / denominator
        step = self.base + self.per_seq * batch
        return Observation(
            latency=1.2 * step,
            request_rate=load,
            demand=load * self.output_tokens,
            ready=ready,
            running=batch * ready,
            waiting=0.0,
            kv_usage=batch / 400,
            busy=float(ready),
            steps=ready / step,
            tokens=load * self.output_tokens,
        )


@dataclass
class Loop:
    """Runs a policy against a plant once per interval; replicas serve `startup` evaluations late."""

    policy: PoolPolicy
    plant: PrefillPlant | DecodePlant
    current: int
    startup: int = 0
    state: PoolState = field(init=False)
    pending: list[tuple[int, int]] = field(default_factory=list)  # (ready at step, replicas)
    ready: int = field(init=False)
    history: list[tuple[float, int, float | None, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = PoolState.new(self.policy.role)
        self.ready = self.current

    def run(self, loads: list[float], start: int = 0) -> list[int]:
        """Desired replicas after each evaluation."""
        desired = []
        for k, load in enumerate(loads, start=start):
            now = k * self.policy.interval
            self.ready = min(self.current, max([self.ready, *[n for at, n in self.pending if at <= k]]))
            obs = self.plant.observe(load, self.ready)
            decision = decide(self.policy, self.state, self.current, obs, now)
            if decision.desired > self.current:
                self.pending.append((k + self.startup, decision.desired))
            self.current = decision.desired
            self.ready = min(self.ready, self.current)
            self.history.append((now, decision.desired, obs.latency, decision.reason))
            desired.append(decision.desired)
        return desired
