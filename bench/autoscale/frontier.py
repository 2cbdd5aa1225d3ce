"""How attainment trades against replica-seconds on one trace, over the policy's own settings.

    PYTHONPATH=operator:worker python -m bench.autoscale.frontier \
        --capacity bench/autoscale/results/capacity-tiny-cpu.json --out bench/autoscale/results

Replays the trace (diurnal by default) with the splitserve policy for every combination of the
latency window, the scale-down stabilization window and the tolerance, with everything else as in
`bench.autoscale.run`. If the settings only slide along one curve, no tuning of them reaches a corner
that the curve misses: the policy (or the start-up delay) has to change instead. Writes
frontier-<trace>.json and frontier-<trace>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.autoscale.capacity import Capacity
from bench.autoscale.policies import SplitservePolicy
from bench.autoscale.run import TARGET_ATTAINMENT, Setup, bench_spec, fixed_peak, replay, summarize
from bench.autoscale.simulate import Workload
from bench.autoscale.traces import TRACES
from splitserve_operator.models import InferencePoolSpec

WINDOWS = (30, 45, 60)
STABILIZATION = (120, 180, 240, 300)
TOLERANCES = (0.05, 0.1)
TARGET_REPLICA_SECONDS = 0.60


def with_settings(
    spec: InferencePoolSpec, window: int, stabilization: int, tolerance: float
) -> InferencePoolSpec:
    auto = spec.autoscaling
    scale_down = auto.scale_down.model_copy(update={"stabilization_window_seconds": stabilization})
    update = {"window_seconds": window, "tolerance": tolerance, "scale_down": scale_down}
    return spec.model_copy(update={"autoscaling": auto.model_copy(update=update)})


async def frontier(setup: Setup, trace_name: str, peak_rate: float) -> list[dict[str, Any]]:
    trace = TRACES[trace_name](peak_rate, np.random.default_rng(setup.seed))
    fixed = (await fixed_peak(trace, setup)).replica_seconds
    points = []
    grid = list(itertools.product(WINDOWS, STABILIZATION, TOLERANCES))
    for done, (window, stabilization, tolerance) in enumerate(grid, 1):
        spec = with_settings(setup.spec, window, stabilization, tolerance)
        variant = dataclasses.replace(setup, spec=spec)
        run = await replay(trace, variant, functools.partial(SplitservePolicy, spec))
        summary = summarize(run, trace, variant, fixed)
        point = {
            "window_seconds": window,
            "scale_down_stabilization_seconds": stabilization,
            "tolerance": tolerance,
            "attainment": summary["attainment"],
            "replica_seconds_vs_fixed_peak": summary["replica_seconds_vs_fixed_peak"],
        }
        points.append(point)
        print(f"[{done}/{len(grid)}] {json.dumps(point)}", file=sys.stderr, flush=True)
    return points


def plot(points: list[dict[str, Any]], defaults: dict[str, Any], trace_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for window in WINDOWS:
        mine = [p for p in points if p["window_seconds"] == window]
        ax.scatter(
            [p["replica_seconds_vs_fixed_peak"] for p in mine],
            [100 * p["attainment"] for p in mine],
            label=f"window {window}s",
        )
    default = next(p for p in points if all(p[k] == v for k, v in defaults.items()))
    ax.scatter(
        default["replica_seconds_vs_fixed_peak"],
        100 * default["attainment"],
        s=160,
        facecolors="none",
        edgecolors="black",
        label="spec defaults",
    )
    ax.axhline(100 * TARGET_ATTAINMENT, color="red", linestyle="--", linewidth=0.8)
    ax.axvline(TARGET_REPLICA_SECONDS, color="red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("replica-seconds / fixed peak-sized pools")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"{trace_name}: settings of the splitserve policy (target: upper left of the red lines)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=Path, required=True, help="Capacity JSON (schema in capacity.py).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for the JSON and the PNG.")
    parser.add_argument("--trace", default="diurnal", choices=list(TRACES))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--peak-rate", type=float, default=300.0)
    args = parser.parse_args()
    try:
        capacity = Capacity.load(args.capacity)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    spec = bench_spec(0.1, 0.0075, 32, capacity.max_num_seqs)
    setup = Setup(capacity, Workload(), spec, 60.0, args.seed, 0.7, 900)
    points = asyncio.run(frontier(setup, args.trace, args.peak_rate))
    auto = spec.autoscaling
    defaults = {
        "window_seconds": auto.window_seconds,
        "scale_down_stabilization_seconds": auto.scale_down.stabilization_window_seconds,
        "tolerance": auto.tolerance,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "command": " ".join(["python -m bench.autoscale.frontier", *sys.argv[1:]]),
        "defaults": defaults,
        "points": points,
    }
    (args.out / f"frontier-{args.trace}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(points, defaults, args.trace, args.out / f"frontier-{args.trace}.png")
    print(f"wrote {args.out / f'frontier-{args.trace}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
