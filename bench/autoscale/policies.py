"""The policies the bench compares, all behind one interface: replicas per pool at each interval.

- `SplitservePolicy`: the real thing, `PoolAutoscaler.evaluate` reading the simulator as its source.
- `FixedPolicy`: a constant replica count (sized for the trace's peak by `peak_size`).
- `HpaUtilizationPolicy`: what a HorizontalPodAutoscaler on a utilisation metric would do
  (desired = ceil(ready * utilisation / target), same tolerance, stabilization windows and step
  limits as ours): prefill utilisation = busy fraction, decode = running streams / maxNumSeqs.
- `ClairvoyantPolicy`: a reference no autoscaler can be, to tell how far a target is from what the
  trace allows at all.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

from bench.autoscale.simulate import Simulation
from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator.autoscaling.behavior import limit_step, stabilize
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler
from splitserve_operator.autoscaling.policy import PoolPolicy
from splitserve_operator.autoscaling.signals import PoolSignals, SignalQuery
from splitserve_operator.models import InferencePoolSpec


class Policy(Protocol):
    name: str

    async def decide(self, sim: Simulation, now: float) -> dict[WorkerRole, int]: ...


class SimSource:
    """A SignalSource over the simulator: what Prometheus would answer right now."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    async def read(self, query: SignalQuery) -> PoolSignals:
        return self.sim.signals(query)


class SplitservePolicy:
    name = "splitserve"

    def __init__(self, spec: InferencePoolSpec, sim: Simulation) -> None:
        self.spec, self.autoscaler, self.state = spec, PoolAutoscaler(SimSource(sim)), AutoscalerState()

    async def decide(self, sim: Simulation, now: float) -> dict[WorkerRole, int]:
        current: dict[WorkerRole, int] = {"prefill": sim.prefill.replicas, "decode": sim.decode.replicas}
        outcome = await self.autoscaler.evaluate(None, "bench", self.spec, current, self.state, now)
        return outcome.replicas


class FixedPolicy:
    name = "fixed-peak"

    def __init__(self, replicas: dict[WorkerRole, int]) -> None:
        self.replicas = replicas

    async def decide(self, sim: Simulation, now: float) -> dict[WorkerRole, int]:
        return dict(self.replicas)


class HpaUtilizationPolicy:
    name = "hpa-utilization"

    def __init__(self, spec: InferencePoolSpec, target: float) -> None:
        self.policies = {role: PoolPolicy.from_spec(spec, role) for role in WORKER_ROLES}
        self.target = target
        self.history: dict[WorkerRole, list[tuple[float, int]]] = {role: [] for role in WORKER_ROLES}
        self.started: float | None = None

    async def decide(self, sim: Simulation, now: float) -> dict[WorkerRole, int]:
        if self.started is None:
            self.started = now
        signals = sim.signals(SignalQuery("bench", self.policies["prefill"].window, 0.9, 0.9))
        current: dict[WorkerRole, int] = {"prefill": sim.prefill.replicas, "decode": sim.decode.replicas}
        ready = {"prefill": signals.prefill.replicas or 0, "decode": signals.decode.replicas or 0}
        usage = {
            "prefill": signals.prefill.busy,
            "decode": None
            if signals.decode.running is None
            else signals.decode.running / self.policies["decode"].max_num_seqs,
        }
        desired: dict[WorkerRole, int] = {}
        for role in WORKER_ROLES:
            policy, used = self.policies[role], usage[role]
            if not ready[role] or used is None:
                desired[role] = current[role]
                continue
            ratio = used / ready[role] / self.target
            raw = current[role] if abs(ratio - 1) <= policy.tolerance else math.ceil(ready[role] * ratio)
            self.history[role].append((now, policy.bound(raw)))
            stable = stabilize(self.history[role], current[role], now, policy, self.started)
            desired[role] = policy.bound(limit_step(current[role], stable, policy))
        return desired


class ClairvoyantPolicy:
    """Knows the trace: orders, a start-up ahead, the replicas that the highest rate until they would next
    be resized needs, plus `margin` x sqrt(rate) requests/s for the Poisson arrivals around that mean,
    sized from the simulator's own latency distributions (the plant, not a model of it). No forecast
    error, no model error, no stabilization: a real policy is not expected to beat its curve."""

    name = "clairvoyant"
    TRIALS = 20_000  # latency samples per pool size tried

    def __init__(self, sim: Simulation, spec: InferencePoolSpec, startup: float, margin: float) -> None:
        self.lookahead = int(startup) + spec.autoscaling.interval_seconds
        self.margin = margin
        self.ttft, self.itl = spec.prefill.slo, spec.decode.slo
        # A plant of its own for sizing, so sampling does not disturb the replay's random stream.
        self.plant = Simulation(sim.cap, sim.work, sim.rates, seed=0)
        self.sizes: dict[int, dict[WorkerRole, int]] = {}

    async def decide(self, sim: Simulation, now: float) -> dict[WorkerRole, int]:
        rate = float(sim.rates[int(now) : int(now) + self.lookahead].max())
        return self.size(math.ceil(rate + self.margin * math.sqrt(rate)))

    def size(self, rate: int) -> dict[WorkerRole, int]:
        if rate not in self.sizes:
            load = max(rate, 1)
            self.sizes[rate] = {
                "prefill": smallest(lambda n: self.prefill_meets(n, load)),
                "decode": smallest(lambda n: self.decode_meets(n, load)),
            }
        return self.sizes[rate]

    def prefill_meets(self, replicas: int, rate: float) -> bool:
        plant = self.plant
        if rate * plant.service >= 0.98 * replicas:
            return False
        samples = plant.ttft_samples(replicas, rate, 0.0, self.TRIALS)
        return bool(np.quantile(samples, self.ttft.percentile) <= self.ttft.ttft_seconds)

    def decode_meets(self, replicas: int, rate: float) -> bool:
        plant = self.plant
        if rate >= plant.decode_capacity(replicas):
            return False
        samples = plant.itl_samples(replicas, plant.decode_batch(replicas, rate), 0.0, 1.0, self.TRIALS)
        return bool(np.quantile(samples, self.itl.percentile) <= self.itl.itl_seconds)


def smallest(meets: Callable[[int], bool]) -> int:
    return next(n for n in itertools.count(1) if meets(n))


def estimate_size(sim: Simulation, rate: float, itl_target: float) -> dict[WorkerRole, int]:
    """A first guess at the pools steady `rate` needs: prefill at most 85 % busy, decode batches whose
    p90 step (mean + 1.28 sigma) stays within the ITL target. The bench refines it by replaying."""
    prefill = max(1, math.ceil(rate * sim.service / 0.85))
    decode = next(
        n
        for n in range(1, 10_000)
        if rate <= sim.decode_capacity(n)
        and sim.cap.step_seconds(sim.decode_batch(n, rate) + 1.28 * math.sqrt(sim.decode_batch(n, rate)))
        <= itl_target
    )
    return {"prefill": prefill, "decode": decode}
