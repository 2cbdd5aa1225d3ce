"""Integration: a real Prometheus scrapes real /metrics endpoints; the decisions follow what it reports.

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`; or set PROMETHEUS_BIN). Without
it these tests fail with that message, unless SPLITSERVE_SKIP_PROMETHEUS=1 says to skip them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import requests

from splitserve.local.prometheus import LocalPrometheus
from splitserve_operator.autoscaling.evaluator import AutoscalerState, Outcome, PoolAutoscaler
from splitserve_operator.autoscaling.scrape import ScrapeSource
from splitserve_operator.autoscaling.signals import PrometheusSource, SignalQuery
from splitserve_operator.autoscaling_spec import AutoscalingSpec, ScaleDownRules
from splitserve_operator.models import (
    DecodePoolSpec,
    InferencePoolSpec,
    ItlSlo,
    ModelSpec,
    PrefillPoolSpec,
    ReplicaBounds,
    TtftSlo,
)
from tests.operator.autoscaling.conftest import MetricsEndpoint, drive, prometheus_binary

Endpoints = dict[str, MetricsEndpoint]
WAIT_SECONDS = 30.0  # bound on every wait
NAMESPACE = "team-a"  # what a PodMonitor's relabelling adds in Kubernetes; here a static target label

SPEC = InferencePoolSpec(
    model=ModelSpec(name="m"),
    prefill=PrefillPoolSpec(replicas=ReplicaBounds(min=1, max=8), slo=TtftSlo(ttft_seconds=1.0)),
    decode=DecodePoolSpec(replicas=ReplicaBounds(min=1, max=8), slo=ItlSlo(itl_seconds=0.05)),
    # Feedback only, so every expected number follows from the latency Prometheus reports; short windows.
    autoscaling=AutoscalingSpec(
        interval_seconds=1,
        window_seconds=10,
        predictive=False,
        scale_down=ScaleDownRules(stabilization_window_seconds=0, max_step=1, max_step_percent=10),
    ),
)


class Prometheus(LocalPrometheus):
    """The product's local Prometheus, scraping the given targets every second, plus test helpers."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        # What a PodMonitor's relabelling adds in Kubernetes; here a label on the file's targets.
        super().__init__(binary, workdir, labels={"namespace": NAMESPACE})
        self.set_targets(targets)
        self.start()

    def get(self, path: str, **params: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", params=params, timeout=2)

    async def wait(self, what: str, check: Callable[[], bool]) -> None:
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                while True:
                    assert self.process is not None and self.process.poll() is None, (
                        f"prometheus exited: {self.log_path}"
                    )
                    with contextlib.suppress(requests.RequestException):
                        if await asyncio.to_thread(check):
                            return
                    await asyncio.sleep(0.25)
        except TimeoutError:
            raise AssertionError(f"prometheus: not {what} within {WAIT_SECONDS}s") from None

    async def query(self, expr: str) -> float:
        response = await asyncio.to_thread(self.get, "/api/v1/query", query=expr)
        result = response.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else math.nan


@pytest.fixture
async def prometheus(prometheus_bin: str, endpoints: Endpoints, tmp_path: Path) -> AsyncIterator[Prometheus]:
    server = Prometheus(prometheus_bin, tmp_path, [e.target for e in endpoints.values()])
    try:
        await server.wait("ready", lambda: server.get("/-/ready").status_code == 200)
        await server.wait(
            "all targets up",
            lambda: (
                server.get("/api/v1/query", query='count(up{job="splitserve"} == 1) == 3').json()["data"][
                    "result"
                ]
                != []
            ),
        )
        yield server
    finally:
        server.stop()


class Traffic:
    """Keeps recording requests with the given TTFT until told otherwise (or stopped)."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints, self.ttft, self.running = endpoints, 3.0, True
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if self.running:
                drive(self.endpoints, ttft=self.ttft, itl=0.047, requests=3)
            else:
                for role in ("prefill", "decode"):
                    self.endpoints[role].metrics.requests_running.set(0)
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.task.cancel()


async def until(
    what: str, step: Callable[[], Awaitable[Outcome]], done: Callable[[Outcome], bool]
) -> Outcome:
    """Evaluate once a second until `done` holds (bounded)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        outcome = await step()
        if done(outcome):
            return outcome
        assert time.monotonic() < deadline, f"{what}: last outcome {outcome.decisions}"
        await asyncio.sleep(1.0)


async def test_decisions_follow_what_prometheus_reports(prometheus: Prometheus, endpoints: Endpoints) -> None:
    traffic = Traffic(endpoints)
    source = PrometheusSource(prometheus.url, timeout=5.0)
    autoscaler, state = PoolAutoscaler(source), AutoscalerState()
    current = {"prefill": 1, "decode": 1}  # one endpoint each: every replica asked for reports
    scraper = ScrapeSource([e.url for e in endpoints.values()])

    async def evaluate() -> Outcome:
        await scraper.scrape()
        return await autoscaler.evaluate(NAMESPACE, "chat", SPEC, current, state, time.time())  # type: ignore[arg-type]

    try:
        # TTFT 3 s against a 1 s target: scale prefill up by the ratio Prometheus reports.
        up = await until("scale-up", evaluate, lambda o: o.replicas["prefill"] > 1)
        observed = up.decisions["prefill"].observed_latency
        assert observed is not None and 2.0 < observed <= 3.0  # the (2, 3] bucket
        assert up.replicas["prefill"] == math.ceil(observed)  # HPA's ceil(ready * observed / target)
        assert up.condition.status == "True"
        assert up.replicas["decode"] == 1  # ITL 0.047 s is within 0.05 s +-10 %: decode holds
        reported = await prometheus.query(
            "histogram_quantile(0.9, sum by (le) (rate(splitserve_time_to_first_token_seconds_bucket"
            f'{{pool="chat",role="router",namespace="{NAMESPACE}"}}[10s])))'
        )
        assert reported == pytest.approx(observed, rel=0.2)
        # The direct-scrape source computes the same quantile from the same endpoints.
        local = await scraper.read(SignalQuery("chat", 10, 0.9, 0.9))
        assert local.ttft == pytest.approx(observed, rel=0.2)
        current["prefill"] = up.replicas["prefill"]

        # Within target: hold, once the window no longer holds the slow requests.
        traffic.ttft = 0.95  # (0.75, 1.0] bucket: p90 interpolates to 0.975
        held = await until(
            "hold within target", evaluate, lambda o: "within target" in o.decisions["prefill"].reason
        )
        assert held.replicas == current and held.changed == {}

        # Idle: nothing over the window -> towards min, one replica per evaluation.
        traffic.running = False
        idle = await until("idle", evaluate, lambda o: "idle" in o.decisions["prefill"].reason)
        assert idle.replicas["prefill"] == current["prefill"] - 1
        assert idle.condition.status == "True", (idle.condition.message, idle.decisions["decode"].reason)

        # A pool Prometheus knows nothing about, or another namespace: hold, MetricsAvailable=False.
        unknown = await autoscaler.evaluate("team-b", "chat", SPEC, current, AutoscalerState(), time.time())  # type: ignore[arg-type]
        assert unknown.replicas == current and unknown.changed == {}
        assert (unknown.condition.status, unknown.condition.reason) == ("False", "MissingData")
        assert [e.reason for e in unknown.events] == ["MetricsUnavailable"]
    finally:
        traffic.stop()
        await scraper.close()
        source.close()


async def test_prometheus_stopped_holds_replicas(prometheus: Prometheus, endpoints: Endpoints) -> None:
    traffic = Traffic(endpoints)
    source = PrometheusSource(prometheus.url, timeout=2.0)
    autoscaler, state = PoolAutoscaler(source), AutoscalerState()
    current = {"prefill": 3, "decode": 2}
    try:
        await until(
            "signals flow",
            lambda: autoscaler.evaluate(None, "chat", SPEC, current, state, time.time()),
            lambda o: o.condition.status == "True",
        )  # type: ignore[arg-type]
        prometheus.stop()
        started = time.monotonic()
        down = await autoscaler.evaluate(None, "chat", SPEC, current, state, time.time())  # type: ignore[arg-type]
        assert time.monotonic() - started < 5.0
        assert down.replicas == current and down.changed == {}
        assert (down.condition.status, down.condition.reason) == ("False", "PrometheusUnreachable")
        assert prometheus.url in down.condition.message
        assert [(e.type, e.reason) for e in down.events] == [("Warning", "MetricsUnavailable")]
        assert "holding" in down.status_patch()["prefill"]["reason"]
        again = await autoscaler.evaluate(None, "chat", SPEC, current, state, time.time())  # type: ignore[arg-type]
        assert again.replicas == current and again.events == ()
    finally:
        traffic.stop()
        source.close()


def test_missing_binary_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_BIN", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("SPLITSERVE_SKIP_PROMETHEUS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y prometheus"):
        prometheus_binary()
    monkeypatch.setenv("SPLITSERVE_SKIP_PROMETHEUS", "1")
    with pytest.raises(pytest.skip.Exception):
        prometheus_binary()
