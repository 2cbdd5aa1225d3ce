"""Replay load traces against the capacity model and compare autoscaling policies.

    PYTHONPATH=operator:worker python -m bench.autoscale.run \
        --capacity bench/autoscale/results/capacity-tiny-cpu.json --out bench/autoscale/results

For each trace (step, ramp, diurnal, burst) and policy (splitserve, fixed-peak, hpa-utilization):
SLO attainment = share of evaluation intervals whose TTFT and ITL p90 both meet their targets,
replica-seconds (starting pods included) and their ratio to the fixed peak-sized pools, scaling
actions, and for the step trace how many intervals the first scale-up took. Every replay starts with
a warm-up at the trace's first rate (not counted), so policies begin settled. Writes results.json and
one PNG per trace. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench.autoscale.capacity import Capacity
from bench.autoscale.plots import plot_trace
from bench.autoscale.policies import (
    FixedPolicy,
    HpaUtilizationPolicy,
    Policy,
    SplitservePolicy,
    estimate_size,
)
from bench.autoscale.simulate import Simulation, Workload, weighted_quantile
from bench.autoscale.traces import TRACES, Trace
from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator.models import (
    DecodePoolSpec,
    InferencePoolSpec,
    ItlSlo,
    ModelSpec,
    PrefillPoolSpec,
    ReplicaBounds,
    TtftSlo,
)

TARGET_ATTAINMENT = 0.99


@dataclass(frozen=True)
class Setup:
    capacity: Capacity
    workload: Workload
    spec: InferencePoolSpec
    startup: float
    seed: int
    hpa_target: float
    warmup: int


@dataclass
class Run:
    """One replay; records before `offset` belong to the warm-up and are left out."""

    policy: str
    sim: Simulation
    decisions: list[tuple[float, dict[WorkerRole, int]]]
    offset: int

    def rec(self, name: str) -> NDArray[np.float64]:
        return self.sim.rec[name][self.offset :]

    @property
    def replica_seconds(self) -> float:
        return float(self.rec("replicas_p").sum() + self.rec("replicas_d").sum())

    def latencies(self, interval: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """TTFT and ITL p90 of each interval (NaN without traffic)."""
        n = (len(self.sim.rates) - self.offset) // interval
        ttft, itl = np.full(n, np.nan), np.full(n, np.nan)
        for k in range(n):
            block = slice(self.offset + k * interval, self.offset + (k + 1) * interval)
            value = weighted_quantile(self.sim.ttft[block], self.sim.rec["arrivals"][block], 0.9)
            ttft[k] = np.nan if value is None else value
            value = weighted_quantile(self.sim.itl[block], self.sim.rec["tokens"][block], 0.9)
            itl[k] = np.nan if value is None else value
        return ttft, itl

    def meets(self, spec: InferencePoolSpec) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        """Per interval: TTFT within target, ITL within target (intervals without traffic meet both)."""
        ttft, itl = self.latencies(spec.autoscaling.interval_seconds)
        return (
            np.nan_to_num(ttft) <= spec.prefill.slo.ttft_seconds,
            np.nan_to_num(itl) <= spec.decode.slo.itl_seconds,
        )


def bench_spec(ttft: float, itl: float, max_replicas: int, max_num_seqs: int) -> InferencePoolSpec:
    bounds = ReplicaBounds(min=1, max=max_replicas)
    return InferencePoolSpec(
        model=ModelSpec(name="tiny"),
        prefill=PrefillPoolSpec(replicas=bounds, slo=TtftSlo(ttft_seconds=ttft, percentile=0.9)),
        decode=DecodePoolSpec(
            replicas=bounds, slo=ItlSlo(itl_seconds=itl, percentile=0.9), max_num_seqs=max_num_seqs
        ),
    )


async def replay(
    trace: Trace,
    setup: Setup,
    policy: Callable[[Simulation], Policy],
    start: dict[WorkerRole, int] | None = None,
) -> Run:
    """Run one policy over the warm-up and the trace; pools start at `start` (or a first guess), ready."""
    rates = np.concatenate([np.full(setup.warmup, trace.rate[0]), trace.rate])
    sim = Simulation(setup.capacity, setup.workload, rates, setup.seed)
    start = start or estimate_size(sim, float(trace.rate[0]), setup.spec.decode.slo.itl_seconds)
    sim.prefill.scale_to(start["prefill"], -setup.startup, setup.startup)
    sim.decode.scale_to(start["decode"], -setup.startup, setup.startup)
    chosen = policy(sim)
    interval = setup.spec.autoscaling.interval_seconds
    decisions: list[tuple[float, dict[WorkerRole, int]]] = []
    for t in range(len(rates)):
        if t > 0 and t % interval == 0:
            desired = await chosen.decide(sim, float(t))
            decisions.append((float(t), desired))
            sim.prefill.scale_to(desired["prefill"], t, setup.startup)
            sim.decode.scale_to(desired["decode"], t, setup.startup)
        sim.tick()
    return Run(chosen.name, sim, decisions, setup.warmup)


async def fixed_peak(trace: Trace, setup: Setup) -> Run:
    """The smallest constant pools that keep attainment >= 99 % through the trace, found by replaying:
    from a first guess at the peak rate, add replicas to the pool that misses more until the target is
    met, then take replicas away from either pool while it stays met."""
    sim = Simulation(setup.capacity, setup.workload, trace.rate, setup.seed)
    size = estimate_size(sim, float(trace.rate.max()), setup.spec.decode.slo.itl_seconds)

    async def attempt(replicas: dict[WorkerRole, int]) -> tuple[Run, NDArray[np.bool_], NDArray[np.bool_]]:
        fixed = FixedPolicy(dict(replicas))
        run = await replay(trace, setup, lambda _sim: fixed, start=fixed.replicas)
        return (run, *run.meets(setup.spec))

    run, ttft_ok, itl_ok = await attempt(size)
    while (ttft_ok & itl_ok).mean() < TARGET_ATTAINMENT:
        size["prefill" if ttft_ok.mean() <= itl_ok.mean() else "decode"] += 1
        run, ttft_ok, itl_ok = await attempt(size)
    for role in WORKER_ROLES:
        while size[role] > 1:
            smaller = {**size, role: size[role] - 1}
            candidate, ttft_ok, itl_ok = await attempt(smaller)
            if (ttft_ok & itl_ok).mean() < TARGET_ATTAINMENT:
                break
            size, run = smaller, candidate
    return run


def summarize(run: Run, trace: Trace, setup: Setup, fixed_replica_seconds: float) -> dict[str, Any]:
    ttft_ok, itl_ok = run.meets(setup.spec)
    decisions = [(at, d) for at, d in run.decisions if at >= run.offset]
    summary: dict[str, Any] = {
        "attainment": round(float((ttft_ok & itl_ok).mean()), 4),
        "ttft_attainment": round(float(ttft_ok.mean()), 4),
        "itl_attainment": round(float(itl_ok.mean()), 4),
        "replica_seconds": round(run.replica_seconds),
        "replica_seconds_vs_fixed_peak": round(run.replica_seconds / fixed_replica_seconds, 4),
        "scaling_actions": sum(1 for (_, a), (_, b) in itertools.pairwise(decisions) if a != b),
        "max_replicas": {
            "prefill": int(run.rec("replicas_p").max()),
            "decode": int(run.rec("replicas_d").max()),
        },
        "mean_replicas": {
            "prefill": round(float(run.rec("replicas_p").mean()), 2),
            "decode": round(float(run.rec("replicas_d").mean()), 2),
        },
    }
    if trace.step_at is not None:
        summary["step_scale_up_intervals"] = scale_up_delay(
            run, run.offset + trace.step_at, setup.spec.autoscaling.interval_seconds
        )
    return summary


def scale_up_delay(run: Run, step_at: int, interval: int) -> float | None:
    """Intervals from the step to the first decision that adds replicas to any pool."""
    previous: dict[WorkerRole, int] | None = None
    for at, desired in run.decisions:
        if at > step_at and previous and any(desired[r] > previous[r] for r in WORKER_ROLES):
            return (at - step_at) / interval
        previous = desired
    return None


async def bench(setup: Setup, traces: list[str], peak_rate: float, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    interval = setup.spec.autoscaling.interval_seconds
    for name in traces:
        trace = TRACES[name](peak_rate, np.random.default_rng(setup.seed))
        print(f"{name}: replaying ...", file=sys.stderr, flush=True)
        runs = {
            "fixed-peak": await fixed_peak(trace, setup),
            "splitserve": await replay(trace, setup, lambda sim: SplitservePolicy(setup.spec, sim)),
            "hpa-utilization": await replay(
                trace, setup, lambda _sim: HpaUtilizationPolicy(setup.spec, setup.hpa_target)
            ),
        }
        fixed = runs["fixed-peak"].replica_seconds
        results[name] = {policy: summarize(run, trace, setup, fixed) for policy, run in runs.items()}
        plot_trace(
            trace,
            runs,
            {policy: run.latencies(interval) for policy, run in runs.items()},
            setup.spec,
            out / f"{name}.png",
        )
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=Path, required=True, help="Capacity JSON (schema in capacity.py).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for results.json and PNGs.")
    parser.add_argument("--traces", nargs="+", default=list(TRACES), choices=list(TRACES))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--peak-rate", type=float, default=300.0, help="Peak requests/s of every trace.")
    parser.add_argument("--startup-seconds", type=float, default=60.0, help="Pod start to serving.")
    parser.add_argument("--warmup-seconds", type=int, default=900, help="Unscored lead-in at the first rate.")
    parser.add_argument("--ttft", type=float, default=0.1, help="TTFT p90 target, seconds.")
    parser.add_argument("--itl", type=float, default=0.0075, help="ITL p90 target, seconds.")
    parser.add_argument("--max-replicas", type=int, default=32)
    parser.add_argument("--hpa-target", type=float, default=0.7, help="Utilisation target of the HPA rule.")
    args = parser.parse_args()
    try:
        capacity = Capacity.load(args.capacity)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    spec = bench_spec(args.ttft, args.itl, args.max_replicas, capacity.max_num_seqs)
    setup = Setup(
        capacity, Workload(), spec, args.startup_seconds, args.seed, args.hpa_target, args.warmup_seconds
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(bench(setup, args.traces, args.peak_rate, args.out))
    settings = {
        "seed": args.seed,
        "peak_rate": args.peak_rate,
        "startup_seconds": args.startup_seconds,
        "warmup_seconds": args.warmup_seconds,
        "ttft_p90_seconds": args.ttft,
        "itl_p90_seconds": args.itl,
        "interval_seconds": spec.autoscaling.interval_seconds,
        "window_seconds": spec.autoscaling.window_seconds,
        "hpa_target": args.hpa_target,
        "workload": vars(setup.workload),
        "capacity": capacity.summary(),
    }
    document = {
        "command": " ".join(["python -m bench.autoscale.run", *sys.argv[1:]]),
        "settings": settings,
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
