"""The bench's CLIs, run as subprocesses on the step trace: scale-up within two intervals, determinism,
the settings frontier, the spread over seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CAPACITY = REPO / "bench" / "autoscale" / "results" / "capacity-tiny-cpu.json"


def run_bench(*args: str, module: str = "bench.autoscale.run") -> subprocess.CompletedProcess[str]:
    paths = [str(REPO / "operator"), str(REPO / "worker"), str(REPO)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_step_trace_scales_up_within_two_intervals_and_is_deterministic(tmp_path: Path) -> None:
    documents = []
    for out in (tmp_path / "a", tmp_path / "b"):
        done = run_bench("--capacity", str(CAPACITY), "--out", str(out), "--traces", "step")
        assert done.returncode == 0, done.stderr
        assert (out / "step.png").stat().st_size > 10_000
        documents.append(json.loads((out / "results.json").read_text())["results"])
    assert documents[0] == documents[1]
    step = documents[0]["step"]
    assert 0 < step["splitserve"]["step_scale_up_intervals"] <= 2
    assert step["fixed-peak"]["attainment"] >= 0.99
    assert step["splitserve"]["attainment"] > step["hpa-utilization"]["attainment"]


def test_bad_capacity_file_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "capacity.json"
    bad.write_text('{"schema": "something/else"}')
    done = run_bench("--capacity", str(bad), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    expected = "error: capacity file: expected schema 'splitserve.capacity/v1', got 'something/else'"
    assert done.stderr.strip().splitlines() == [expected]


def test_frontier_replays_every_combination_of_settings_and_the_reference(tmp_path: Path) -> None:
    done = run_bench(
        "--capacity",
        str(CAPACITY),
        "--out",
        str(tmp_path),
        "--trace",
        "step",
        module="bench.autoscale.frontier",
    )
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "frontier-step.json").read_text())
    points = document["points"]
    assert len(points) == 3 * 4 * 2
    settings = {(p["window_seconds"], p["scale_down_stabilization_seconds"], p["tolerance"]) for p in points}
    assert len(settings) == len(points)
    defaults = document["defaults"]
    assert tuple(defaults.values()) in settings
    assert all(0 <= p["attainment"] <= 1 and p["replica_seconds_vs_fixed_peak"] > 0 for p in points)
    # The clairvoyant reference: one point per margin; more margin buys attainment with replicas.
    reference = document["clairvoyant"]
    assert [p["margin"] for p in reference] == [0.0, 0.5, 1.0, 1.5, 2.0]
    thinnest, widest = reference[0], reference[-1]
    assert widest["replica_seconds_vs_fixed_peak"] > thinnest["replica_seconds_vs_fixed_peak"]
    assert widest["attainment"] >= thinnest["attainment"]
    assert (tmp_path / "frontier-step.png").stat().st_size > 10_000


def test_seeds_replays_one_day_per_seed_and_counts_those_meeting_both_targets(tmp_path: Path) -> None:
    args = ("--capacity", str(CAPACITY), "--out", str(tmp_path), "--trace", "step", "--seeds", "3", "5")
    done = run_bench(*args, module="bench.autoscale.seeds")
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "seeds-step.json").read_text())
    rows, summary = document["per_seed"], document["summary"]
    assert [row["seed"] for row in rows] == [3, 5] and rows[0] != rows[1]  # each seed its own day
    meeting = sum(row["attainment"] >= 0.99 and row["replica_seconds_vs_fixed_peak"] <= 0.6 for row in rows)
    assert summary["seeds"] == 2 and summary["seeds_meeting_both_targets"] == meeting
    attainment = summary["attainment"]
    assert attainment["min"] <= attainment["mean"] <= attainment["max"]
    assert (tmp_path / "seeds-step.png").stat().st_size > 10_000


def test_budget_scenario_never_exceeds_the_budget_and_finds_the_best_fixed_split(tmp_path: Path) -> None:
    done = run_bench(
        "--capacity",
        str(CAPACITY),
        "--out",
        str(tmp_path),
        "--traces",
        "burst",
        module="bench.autoscale.budget",
    )
    assert done.returncode == 0, done.stderr
    burst = json.loads((tmp_path / "budget.json").read_text())["results"]["burst"]
    assert burst["budget"] == round(0.7 * burst["peak_need"])
    assert burst["budget_exceeded_seconds"] == 0 and burst["max_accelerators_in_use"] <= burst["budget"]
    assert sum(burst["best_fixed_split"].values()) == burst["budget"]
    assert burst["budget_binding_share"] > 0  # the scenario does bind
    assert (tmp_path / "budget-burst.png").stat().st_size > 10_000
