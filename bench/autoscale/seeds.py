"""How far one replay's numbers are from the policy's: the diurnal trace over many seeds.

    PYTHONPATH=operator:worker python -m bench.autoscale.seeds \
        --capacity bench/autoscale/results/capacity-tiny-cpu.json --out bench/autoscale/results

A seed draws both the trace's wander and the simulated arrivals, so one day's replay scores one day
among many; near a target, a tenth of a point is seed noise. For each seed: the fixed peak-sized pools
(found by replaying, as in `bench.autoscale.run`) and the splitserve policy with the spec defaults.
Writes seeds-<trace>.json (per seed, plus mean / min / max and how many seeds meet both targets) and
seeds-<trace>.png (attainment against replica-seconds, one point per seed, the target corner in red).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.autoscale.frontier import TARGET_REPLICA_SECONDS, bench_parser, default_setup, finish_target_plot
from bench.autoscale.policies import SplitservePolicy
from bench.autoscale.run import TARGET_ATTAINMENT, Setup, fixed_peak, replay, summarize
from bench.autoscale.traces import TRACES


async def over_seeds(
    setup: Setup, trace_name: str, peak_rate: float, seeds: list[int]
) -> list[dict[str, Any]]:
    rows = []
    for done, seed in enumerate(seeds, 1):
        variant = dataclasses.replace(setup, seed=seed)
        trace = TRACES[trace_name](peak_rate, np.random.default_rng(seed))
        fixed = await fixed_peak(trace, variant)
        run = await replay(trace, variant, functools.partial(SplitservePolicy, setup.spec))
        summary = summarize(run, trace, variant, fixed.replica_seconds)
        row = {
            "seed": seed,
            "fixed_peak_replicas": {
                "prefill": int(fixed.rec("replicas_p").max()),
                "decode": int(fixed.rec("replicas_d").max()),
            },
            **{
                key: summary[key]
                for key in ("attainment", "replica_seconds_vs_fixed_peak", "scaling_actions")
            },
        }
        rows.append(row)
        print(f"[{done}/{len(seeds)}] {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


def meets(row: dict[str, Any]) -> bool:
    return bool(
        row["attainment"] >= TARGET_ATTAINMENT
        and row["replica_seconds_vs_fixed_peak"] <= TARGET_REPLICA_SECONDS
    )


def overview(rows: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {"seeds_meeting_both_targets": sum(map(meets, rows)), "seeds": len(rows)}
    for key in ("attainment", "replica_seconds_vs_fixed_peak"):
        values = [row[key] for row in rows]
        result[key] = {"mean": round(float(np.mean(values)), 4), "min": min(values), "max": max(values)}
    return result


def plot(rows: list[dict[str, Any]], trace_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [row["replica_seconds_vs_fixed_peak"] for row in rows]
    ys = [100 * row["attainment"] for row in rows]
    ax.scatter(xs, ys, color="tab:blue", label="splitserve, spec defaults (one point per seed)")
    for row, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(str(row["seed"]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.scatter([np.mean(xs)], [np.mean(ys)], marker="x", s=120, color="black", label="mean")
    finish_target_plot(fig, ax, f"{trace_name}: one replay per seed", path)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    args = parser.parse_args()
    setup = default_setup(parser, args.capacity, args.seeds[0])
    rows = asyncio.run(over_seeds(setup, args.trace, args.peak_rate, args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "command": " ".join(["python -m bench.autoscale.seeds", *sys.argv[1:]]),
        "summary": overview(rows),
        "per_seed": rows,
    }
    (args.out / f"seeds-{args.trace}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(rows, args.trace, args.out / f"seeds-{args.trace}.png")
    print(f"wrote {args.out / f'seeds-{args.trace}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
