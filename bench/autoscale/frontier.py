"""How attainment trades against replica-seconds on one trace, over the policy's own settings.

    PYTHONPATH=operator:worker python -m bench.autoscale.frontier \
        --capacity bench/autoscale/results/capacity-tiny-cpu.json --out bench/autoscale/results

Replays the trace (diurnal by default) with the splitserve policy for every combination of the
latency window, the scale-down stabilization window and the tolerance, with everything else as in
`bench.autoscale.run`. If the settings only slide along one curve, no tuning of them reaches a corner
that the curve misses: the policy (or the start-up delay) has to change instead. Beside it, the curve of
a clairvoyant reference (`ClairvoyantPolicy`: knows the trace, sizes from the simulator itself, same
start-up delay) over its Poisson margin: how much room the trace leaves at all. Writes
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.autoscale.capacity import Capacity
from bench.autoscale.policies import ClairvoyantPolicy, Policy, SplitservePolicy
from bench.autoscale.run import TARGET_ATTAINMENT, Setup, bench_spec, fixed_peak, replay, summarize
from bench.autoscale.simulate import Simulation, Workload
from bench.autoscale.traces import TRACES
from splitserve_operator.models import InferencePoolSpec

WINDOWS = (30, 45, 60)
STABILIZATION = (120, 180, 240, 300)
TOLERANCES = (0.05, 0.1)
TARGET_REPLICA_SECONDS = 0.60
Curves = dict[str, list[dict[str, Any]]]  # per policy: its points, each settings + outcome
MARGINS = (0.0, 0.5, 1.0, 1.5, 2.0)  # the clairvoyant's, x sqrt(requests/s)


def with_settings(
    spec: InferencePoolSpec, window: int, stabilization: int, tolerance: float
) -> InferencePoolSpec:
    auto = spec.autoscaling
    scale_down = auto.scale_down.model_copy(update={"stabilization_window_seconds": stabilization})
    update = {"window_seconds": window, "tolerance": tolerance, "scale_down": scale_down}
    return spec.model_copy(update={"autoscaling": auto.model_copy(update=update)})


async def frontier(setup: Setup, trace_name: str, peak_rate: float) -> Curves:
    trace = TRACES[trace_name](peak_rate, np.random.default_rng(setup.seed))
    fixed = (await fixed_peak(trace, setup)).replica_seconds
    settings = list(itertools.product(WINDOWS, STABILIZATION, TOLERANCES))
    curves: Curves = {"splitserve": [], "clairvoyant": []}
    total = len(settings) + len(MARGINS)

    async def point(
        curve: str, variant: Setup, policy: Callable[[Simulation], Policy], **labels: Any
    ) -> None:
        summary = summarize(await replay(trace, variant, policy), trace, variant, fixed)
        labels["attainment"] = summary["attainment"]
        labels["replica_seconds_vs_fixed_peak"] = summary["replica_seconds_vs_fixed_peak"]
        curves[curve].append(labels)
        done = sum(map(len, curves.values()))
        print(f"[{done}/{total}] {curve} {json.dumps(labels)}", file=sys.stderr, flush=True)

    for window, stabilization, tolerance in settings:
        spec = with_settings(setup.spec, window, stabilization, tolerance)
        await point(
            "splitserve",
            dataclasses.replace(setup, spec=spec),
            functools.partial(SplitservePolicy, spec),
            window_seconds=window,
            scale_down_stabilization_seconds=stabilization,
            tolerance=tolerance,
        )
    for margin in MARGINS:
        knows = functools.partial(ClairvoyantPolicy, spec=setup.spec, startup=setup.startup, margin=margin)
        await point("clairvoyant", setup, knows, margin=margin)
    return curves


def plot(curves: Curves, defaults: dict[str, Any], trace_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, reference = curves["splitserve"], curves["clairvoyant"]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(
        [p["replica_seconds_vs_fixed_peak"] for p in reference],
        [100 * p["attainment"] for p in reference],
        color="gray",
        marker=".",
        label="clairvoyant reference (margin 0-2)",
    )
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
    ax.set_ylim(95, 100.3)  # the reference's thinnest margins fall far below: their line leaves the plot
    finish_target_plot(fig, ax, f"{trace_name}: settings of the splitserve policy", path)


def finish_target_plot(fig: Any, ax: Any, title: str, path: Path) -> None:
    """Attainment over replica-seconds: the target corner in red, labels, legend; saved to `path`."""
    ax.axhline(100 * TARGET_ATTAINMENT, color="red", linestyle="--", linewidth=0.8)
    ax.axvline(TARGET_REPLICA_SECONDS, color="red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("replica-seconds / fixed peak-sized pools")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"{title} (target: upper left of the red lines)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments the diurnal-study CLIs share."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--capacity", type=Path, required=True, help="Capacity JSON (schema in capacity.py).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for the JSON and the PNG.")
    parser.add_argument("--trace", default="diurnal", choices=list(TRACES))
    parser.add_argument("--peak-rate", type=float, default=300.0)
    return parser


def default_setup(parser: argparse.ArgumentParser, capacity_file: Path, seed: int) -> Setup:
    """The bench's defaults (as in bench.autoscale.run) on a capacity file; a bad file exits with one line."""
    try:
        capacity = Capacity.load(capacity_file)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    spec = bench_spec(0.1, 0.0075, 32, capacity.max_num_seqs)
    return Setup(capacity, Workload(), spec, 60.0, seed, 0.7, 900)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    setup = default_setup(parser, args.capacity, args.seed)
    spec = setup.spec
    curves = asyncio.run(frontier(setup, args.trace, args.peak_rate))
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
        "points": curves["splitserve"],
        "clairvoyant": curves["clairvoyant"],
    }
    (args.out / f"frontier-{args.trace}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(curves, defaults, args.trace, args.out / f"frontier-{args.trace}.png")
    print(f"wrote {args.out / f'frontier-{args.trace}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
