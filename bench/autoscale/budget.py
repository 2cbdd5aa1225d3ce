"""The shared budget: splitserve under a budget below the peak need, against the best fixed split of it.

    PYTHONPATH=operator:worker python -m bench.autoscale.budget \
        --capacity bench/autoscale/results/capacity-tiny-cpu.json --out bench/autoscale/results

Per trace (diurnal and burst by default): the peak need is the fixed peak-sized pools (as in
`bench.autoscale.run`), one accelerator per replica; the budget is `--share` of it (70 %), as
`spec.autoscaling.budget.maxAcceleratorsTotal` with each pool's replicas holding `nvidia.com/gpu: 1`.
Compared on the same simulated traffic: splitserve with that budget, and every fixed prefill:decode
split of the same budget replayed in hindsight (the best one is the reference a static deployment of
that size could at most reach). Checked: the budget is never exceeded (replicas of both pools, starting
ones included, every second). Writes budget.json and budget-<trace>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.autoscale.frontier import default_setup
from bench.autoscale.policies import FixedPolicy, SplitservePolicy
from bench.autoscale.run import Run, Setup, fixed_peak, replay, summarize
from bench.autoscale.traces import TRACES, Trace
from splitserve.contract.names import WORKER_ROLES, WorkerRole
from splitserve_operator.models import InferencePoolSpec

GPU = {"limits": {"nvidia.com/gpu": 1}}


def budget_spec(spec: InferencePoolSpec, accelerators: int) -> InferencePoolSpec:
    """The bench's spec with one GPU per replica and a shared budget of `accelerators`."""
    data = spec.model_dump(by_alias=True, exclude_none=True)
    data["prefill"]["resources"] = data["decode"]["resources"] = GPU
    data["autoscaling"]["budget"] = {"maxAcceleratorsTotal": accelerators}
    return InferencePoolSpec.model_validate(data)


def in_use(run: Run) -> np.ndarray:
    """Accelerators held each second (one per replica, starting ones included)."""
    return run.rec("replicas_p") + run.rec("replicas_d")


async def best_fixed_split(
    trace: Trace, setup: Setup, accelerators: int
) -> tuple[dict[WorkerRole, int], Run]:
    """Every prefill:decode split of the budget, replayed; the one with the highest attainment."""
    best: tuple[float, dict[WorkerRole, int], Run] | None = None
    for prefill in range(1, accelerators):
        split: dict[WorkerRole, int] = {"prefill": prefill, "decode": accelerators - prefill}
        fixed = FixedPolicy(split)
        run = await replay(trace, setup, lambda _sim, policy=fixed: policy, start=split)  # type: ignore[misc]
        ttft_ok, itl_ok = run.meets(setup.spec)
        attainment = float((ttft_ok & itl_ok).mean())
        if best is None or attainment > best[0]:
            best = (attainment, split, run)
    assert best is not None
    return best[1], best[2]


async def scenario(
    setup: Setup, trace_name: str, peak_rate: float, share: float, out: Path
) -> dict[str, Any]:
    trace = TRACES[trace_name](peak_rate, np.random.default_rng(setup.seed))
    print(f"{trace_name}: fixed peak ...", file=sys.stderr, flush=True)
    peak = await fixed_peak(trace, setup)
    need = int(peak.rec("replicas_p").max() + peak.rec("replicas_d").max())
    accelerators = round(share * need)
    budgeted = dataclasses.replace(setup, spec=budget_spec(setup.spec, accelerators))
    print(f"{trace_name}: budget {accelerators} of a peak need of {need} ...", file=sys.stderr, flush=True)
    auto = await replay(trace, budgeted, functools.partial(SplitservePolicy, budgeted.spec))
    split, fixed = await best_fixed_split(trace, budgeted, accelerators)
    result = {
        "peak_need": need,
        "budget": accelerators,
        "best_fixed_split": split,
        "splitserve": summarize(auto, trace, budgeted, peak.replica_seconds),
        "fixed-split": summarize(fixed, trace, budgeted, peak.replica_seconds),
        "max_accelerators_in_use": int(in_use(auto).max()),
        "budget_exceeded_seconds": int((in_use(auto) > accelerators).sum()),
        "budget_binding_share": round(float((in_use(auto) >= accelerators).mean()), 4),
    }
    plot(trace, budgeted.spec, auto, fixed, split, accelerators, out / f"budget-{trace_name}.png")
    print(f"{trace_name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def plot(
    trace: Trace,
    spec: InferencePoolSpec,
    auto: Run,
    fixed: Run,
    split: dict[WorkerRole, int],
    accelerators: int,
    path: Path,
) -> None:
    """Load; both pools' replicas against the budget and the best fixed split; attainment over time."""
    scale, unit = (3600.0, "hours") if trace.duration > 4 * 3600 else (60.0, "minutes")
    seconds = np.arange(trace.duration) / scale
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    axes[0].plot(seconds, trace.rate, color="black", lw=0.8)
    axes[0].set_ylabel("offered load\n(requests/s)")
    axes[1].plot(seconds, auto.rec("replicas_p"), color="tab:blue", lw=1.0, label="splitserve prefill")
    axes[1].plot(seconds, auto.rec("replicas_d"), color="tab:green", lw=1.0, label="splitserve decode")
    axes[1].plot(seconds, in_use(auto), color="tab:purple", lw=1.0, label="splitserve both")
    axes[1].axhline(accelerators, color="red", lw=0.8, ls="--", label=f"budget ({accelerators})")
    for role in WORKER_ROLES:
        style = ":" if role == "prefill" else "-."
        axes[1].axhline(
            split[role], color="gray", lw=0.8, ls=style, label=f"best fixed {role} ({split[role]})"
        )
    axes[1].set_ylabel("replicas (1 GPU each)")
    axes[1].legend(loc="upper left", fontsize=7, ncol=2)
    interval = spec.autoscaling.interval_seconds
    for name, run, color in (("splitserve", auto, "tab:blue"), ("best fixed split", fixed, "tab:gray")):
        ttft_ok, itl_ok = run.meets(spec)
        blocks = (np.arange(len(ttft_ok)) + 1) * interval / scale
        window = 300 // interval  # a 5-minute running mean
        running = np.convolve(ttft_ok & itl_ok, np.ones(window) / window, mode="same")
        axes[2].plot(blocks, running, color=color, lw=1.0, label=name)
    axes[2].set_ylabel("attainment\n(5-minute mean)")
    axes[2].set_ylim(0, 1.05)
    axes[2].legend(loc="lower left", fontsize=8)
    axes[-1].set_xlabel(unit)
    fig.suptitle(f"{trace.name}: a budget of {accelerators} GPUs for both pools")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=Path, required=True, help="Capacity JSON (schema in capacity.py).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for budget.json and the PNGs.")
    parser.add_argument("--traces", nargs="+", default=["diurnal", "burst"], choices=list(TRACES))
    parser.add_argument("--peak-rate", type=float, default=300.0)
    parser.add_argument("--share", type=float, default=0.7, help="Budget as a share of the peak need.")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    setup = default_setup(parser, args.capacity, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        name: asyncio.run(scenario(setup, name, args.peak_rate, args.share, args.out)) for name in args.traces
    }
    document = {
        "command": " ".join(["python -m bench.autoscale.budget", *sys.argv[1:]]),
        "settings": {"seed": args.seed, "peak_rate": args.peak_rate, "share": args.share},
        "results": results,
    }
    (args.out / "budget.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out / 'budget.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
