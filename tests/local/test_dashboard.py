"""Every panel of the chart's Grafana dashboard returns data from a real Prometheus scraping a real pool.

A local pool (router, prefill and decode processes on 127.0.0.1) serves greedy traffic from the
official `openai` client while Prometheus scrapes it every second, and the operator's autoscaler
evaluates the pool through that Prometheus and exports its decisions on /metrics, scraped too (the
operator pod's series). Then each panel's every query, with Grafana's variables filled in as Grafana
would, goes through Prometheus's HTTP API and must return at least one series. The same results are
drawn as the dashboard's panels (matplotlib); with SPLITSERVE_DASHBOARD_PNG set, the picture is written
there (docs/dashboard.png is made that way).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from splitserve.contract.names import WorkerRole
from splitserve.local.pool import LocalPool
from splitserve.local.prometheus import LocalPrometheus
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler
from splitserve_operator.autoscaling.exporter import AutoscalerMetrics
from splitserve_operator.autoscaling.signals import PrometheusSource
from splitserve_operator.models import InferencePoolSpec
from tests.conftest import random_prompt
from tests.operator.autoscaling.conftest import prometheus_binary
from tests.worker.test_e2e import complete, start_pool

pytestmark = pytest.mark.slow
DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "splitserve" / "dashboards" / "splitserve.json"
NAMESPACE = "team-a"  # what the PodMonitor's relabelling adds in Kubernetes
TRAFFIC_SECONDS = 20.0
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval at a 1 s scrape interval, with margin
AUTOSCALED = InferencePoolSpec.model_validate(
    {
        "model": {"name": "tiny"},
        "prefill": {"replicas": {"min": 1, "max": 2}, "slo": {"ttftSeconds": 0.001}},
        "decode": {"replicas": {"min": 1, "max": 2}, "slo": {"itlSeconds": 0.0001}},
        "autoscaling": {"intervalSeconds": 1, "windowSeconds": 10, "predictive": False},
    }
)


def panel_queries(dashboard: dict[str, Any], pool: str) -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) of every target, with the dashboard's variables substituted."""
    constants = {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "textbox"}
    values = {"$namespace": NAMESPACE, "$pool": pool, "$__rate_interval": RATE_INTERVAL}
    values |= {f"${name}": value for name, value in constants.items()}
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable in sorted(values, key=len, reverse=True):  # $ttft_slo before any prefix of it
                expr = expr.replace(variable, values[variable])
            assert "$" not in expr, f"{panel['title']}: unfilled variable in {expr}"
            found.append((panel["title"], target["legendFormat"], expr))
    return found


def query(url: str, expr: str, **params: Any) -> list[dict[str, Any]]:
    path = "/api/v1/query_range" if "step" in params else "/api/v1/query"
    reply = requests.get(url + path, params={"query": expr, **params}, timeout=10)
    assert reply.status_code == 200, f"{expr}: {reply.text}"
    result: list[dict[str, Any]] = reply.json()["data"]["result"]
    return result


def drive(pool: LocalPool, seconds: float) -> int:
    """Greedy completions from eight concurrent clients for `seconds`; how many finished."""
    deadline = time.monotonic() + seconds

    def client(index: int) -> int:
        done = 0
        while time.monotonic() < deadline:
            complete(
                pool, random_prompt(20 + index, seed=index + done), stream=bool(index % 2), max_tokens=24
            )
            done += 1
        return done

    with ThreadPoolExecutor(8) as threads:
        return sum(threads.map(client, range(8)))


class Autoscaling(threading.Thread):
    """The operator's autoscaler on the pool, every second, with tight SLOs so that it scales up. Its
    decisions are taken as applied (the next evaluation starts from them) but the pool keeps its
    processes: desired 2 against 1 ready is what a scale-up looks like while new pods start."""

    def __init__(self, prometheus_url: str, pool: str) -> None:
        super().__init__(name="autoscaler", daemon=True)
        self.url, self.pool = prometheus_url, pool
        self.metrics = AutoscalerMetrics()
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._evaluate())

    async def _evaluate(self) -> None:
        autoscaler, state = PoolAutoscaler(PrometheusSource(self.url), self.metrics), AutoscalerState()
        current: dict[WorkerRole, int] = {"prefill": 1, "decode": 1}
        while not self.stop.is_set():
            outcome = await autoscaler.evaluate(NAMESPACE, self.pool, AUTOSCALED, current, state, time.time())
            current = outcome.replicas
            await asyncio.to_thread(self.stop.wait, 1.0)


def render(panels: dict[str, list[tuple[str, list[tuple[float, float]]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(13, 3.1 * rows), squeeze=False)
    for axis, (title, series) in zip(axes.flat, panels.items(), strict=False):
        start = min((points[0][0] for _, points in series if points), default=0.0)
        for legend, points in series:
            axis.plot([t - start for t, _ in points], [v for _, v in points], label=legend, linewidth=1.4)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7, loc="upper left")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(
        "splitserve dashboard: a local pool under greedy traffic, as Prometheus saw it", fontsize=11
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def test_every_panel_query_returns_data(tiny_model: Path, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    pool = start_pool(tiny_model, tmp_path / "pool", prefill=1, decode=1)
    prometheus = LocalPrometheus(
        prometheus_binary(), tmp_path / "prometheus", labels={"namespace": NAMESPACE}
    )
    autoscaling = Autoscaling(prometheus.url, pool.name)
    server, thread = autoscaling.metrics.serve(0, "127.0.0.1")
    try:
        targets = [process.url.removeprefix("http://") for process in pool.processes()]
        prometheus.set_targets([*targets, f"127.0.0.1:{server.server_port}"])
        prometheus.start()
        prometheus.wait_ready()
        started = time.time()
        autoscaling.start()
        done = drive(pool, TRAFFIC_SECONDS)
        assert done > 0
        scraped = f'sum(splitserve_requests_total{{pool="{pool.name}", role="router"}})'
        scaled = f'count(splitserve_autoscaler_last_scale_timestamp_seconds{{pool="{pool.name}"}})'
        deadline = time.monotonic() + 30
        while not (
            (result := query(prometheus.url, scraped))
            and float(result[0]["value"][1]) >= done
            and query(prometheus.url, scaled)
        ):
            assert time.monotonic() < deadline, f"Prometheus has {result} of {done} requests, or no scale"
            time.sleep(0.5)  # the next scrape: Prometheus offers nothing to wait on
        ended = time.time()
        queries = panel_queries(dashboard, pool.name)
        assert len({title for title, _, _ in queries}) == len(dashboard["panels"]) >= 11
        empty = [(title, expr) for title, _, expr in queries if not query(prometheus.url, expr, time=ended)]
        assert empty == [], empty

        drawn: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {}
        for title, legend, expr in queries:
            for series in query(prometheus.url, expr, start=started, end=ended, step=1):
                label = legend
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                points = [(float(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf")]
                drawn.setdefault(title, []).append((label, points))
        assert set(drawn) == {panel["title"] for panel in dashboard["panels"]}
        picture = Path(os.environ.get("SPLITSERVE_DASHBOARD_PNG") or tmp_path / "dashboard.png")
        render(drawn, picture)
        assert picture.stat().st_size > 10_000
    finally:
        autoscaling.stop.set()
        if autoscaling.is_alive():
            autoscaling.join(10)
        server.shutdown()
        thread.join(5)
        prometheus.stop()
        asyncio.run(pool.stop())
