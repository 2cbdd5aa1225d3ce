"""One PNG per trace: load, replicas of each pool per policy, and TTFT / ITL percentiles against target."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.autoscale.traces import Trace
from splitserve_operator.models import InferencePoolSpec

if TYPE_CHECKING:
    from bench.autoscale.run import Run

COLORS = {"splitserve": "tab:blue", "fixed-peak": "tab:gray", "hpa-utilization": "tab:orange"}


def plot_trace(
    trace: Trace,
    runs: dict[str, Run],
    latencies: dict[str, tuple[np.ndarray, np.ndarray]],
    spec: InferencePoolSpec,
    path: Path,
) -> None:
    hours = trace.duration > 4 * 3600
    scale, unit = (3600.0, "hours") if hours else (60.0, "minutes")
    seconds = np.arange(trace.duration) / scale
    interval = spec.autoscaling.interval_seconds
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    axes[0].plot(seconds, trace.rate, color="black", lw=0.8)
    axes[0].set_ylabel("offered load\n(requests/s)")
    for name, run in runs.items():
        style = {"color": COLORS[name], "lw": 1.1, "label": name}
        axes[1].plot(seconds, run.rec("replicas_p"), **style)
        axes[2].plot(seconds, run.rec("replicas_d"), **style)
        ttft, itl = latencies[name]
        blocks = (np.arange(len(ttft)) + 1) * interval / scale
        axes[3].plot(blocks, ttft / spec.prefill.slo.ttft_seconds, **style)
        axes[4].plot(blocks, itl / spec.decode.slo.itl_seconds, **style)
    axes[1].set_ylabel("prefill replicas")
    axes[2].set_ylabel("decode replicas")
    axes[3].set_ylabel("TTFT p90 / target")
    axes[4].set_ylabel("ITL p90 / target")
    for ax in axes[3:]:
        ax.axhline(1.0, color="red", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_ylim(0.1, 100)
    if trace.step_at is not None:
        for ax in axes:
            ax.axvline(trace.step_at / scale, color="green", lw=0.6, ls=":")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel(unit)
    fig.suptitle(f"{trace.name}: replicas and latency per {interval}s interval")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
