"""Signal plumbing: the PromQL, the local evaluator against real /metrics endpoints, error mapping."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
import requests
from aiohttp import web

from splitserve_operator.autoscaling.scrape import (
    ScrapeSource,
    counter_increase,
    histogram_quantile,
    parse_exposition,
)
from splitserve_operator.autoscaling.signals import (
    PrometheusSource,
    SignalQuery,
    SignalSpec,
    SignalsUnavailableError,
    promql,
    root_cause,
    signal_specs,
)
from tests.operator.autoscaling.conftest import MetricsEndpoint, drive, free_port

QUERY = SignalQuery(pool="chat", window_seconds=60, ttft_percentile=0.9, itl_percentile=0.95)


def test_promql_matches_the_documented_queries() -> None:
    specs = signal_specs(QUERY)
    assert promql(specs["ttft"], QUERY) == (
        "histogram_quantile(0.9, sum by (le) (rate("
        'splitserve_time_to_first_token_seconds_bucket{pool="chat",role="router"}[60s])))'
    )
    assert promql(specs["itl"], QUERY).startswith("histogram_quantile(0.95, ")
    assert promql(specs["request_rate"], QUERY) == (
        'sum(rate(splitserve_requests_total{pool="chat",role="router"}[60s]))'
    )
    assert promql(specs["decode.replicas"], QUERY) == (
        'count(splitserve_requests_running{pool="chat",role="decode"})'
    )
    assert promql(specs["prefill.busy"], QUERY) == (
        'sum(rate(splitserve_prefill_step_seconds_sum{pool="chat",role="prefill"}[60s]))'
    )
    assert promql(specs["decode.kv_usage"], QUERY) == (
        'avg(avg_over_time(splitserve_kv_cache_usage_ratio{pool="chat",role="decode"}[60s]))'
    )


def test_promql_selects_the_namespace_when_given_and_escapes_labels() -> None:
    query = SignalQuery(
        pool='we"ird\\', window_seconds=30, ttft_percentile=0.5, itl_percentile=0.5, namespace="team-a"
    )
    text = promql(SignalSpec("sum", "splitserve_requests_waiting", "prefill"), query)
    assert text == 'sum(splitserve_requests_waiting{pool="we\\"ird\\\\",role="prefill",namespace="team-a"})'


INF = math.inf


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [(1.0, 0), (2.0, 10), (INF, 10)], 1.5),  # linear inside (1, 2]
        (0.9, [(1.0, 0), (2.0, 10), (INF, 10)], 1.9),
        (0.9, [(1.0, 5), (2.0, 5), (INF, 10)], 2.0),  # rank in +Inf: the highest finite bound
        (0.25, [(1.0, 4), (2.0, 8), (INF, 8)], 0.5),  # first bucket starts at 0
        (0.5, [(2.0, 8), (1.0, 4), (INF, 8)], 1.0),  # order does not matter
        (0.5, [(1.0, 0), (INF, 0)], math.nan),  # no observations
        (0.5, [(1.0, 3), (2.0, 5)], math.nan),  # no +Inf bucket
        (0.5, [(1.0, 4), (2.0, 3.9), (INF, 8)], 1.0),  # a dip from rate noise is evened out
    ],
)
def test_histogram_quantile_follows_prometheus(
    q: float, buckets: list[tuple[float, float]], expected: float
) -> None:
    result = histogram_quantile(q, buckets)
    assert (math.isnan(result) and math.isnan(expected)) or result == pytest.approx(expected)


def test_counter_increase_survives_a_restart() -> None:
    assert counter_increase([10, 15, 20, 3, 8]) == 10 + 3 + 5


def test_parse_exposition_reads_prometheus_client_output() -> None:
    endpoint = MetricsEndpoint("chat", "router")
    endpoint.metrics.ttft.observe(0.3)
    samples = parse_exposition(endpoint.metrics.exposition()[0].decode())
    labels = (("le", "0.3"), ("pool", "chat"), ("role", "router"))
    key = ("splitserve_time_to_first_token_seconds_bucket", labels)
    assert samples[key] == 1.0


# ---- the direct-scrape source, against real endpoints --------------------------------------------


Endpoints = dict[str, MetricsEndpoint]


async def scrape_while_driving(source: ScrapeSource, endpoints: Endpoints, rounds: int) -> None:
    for _ in range(rounds):
        drive(endpoints, ttft=0.6, itl=0.02)
        assert await source.scrape() == len(source.targets)
        await asyncio.sleep(0.2)


async def test_scrape_source_computes_rates_quantiles_and_gauges(endpoints: Endpoints) -> None:
    source = ScrapeSource([e.url for e in endpoints.values()])
    try:
        started = time.monotonic()
        await scrape_while_driving(source, endpoints, rounds=4)
        drive(endpoints, ttft=0.6, itl=0.02)
        signals = await source.read(QUERY)
        elapsed = time.monotonic() - started
    finally:
        await source.close()
    # 40 requests over the scrapes' span (10 per scrape after the first): rate ~ 40 / elapsed.
    assert signals.request_rate is not None and 40 / elapsed * 0.8 < signals.request_rate < 40 / elapsed * 1.6
    assert signals.prompt_token_rate == pytest.approx(200 * signals.request_rate)
    assert signals.ttft == pytest.approx(0.5 + 0.25 * 0.9)  # all in (0.5, 0.75]: p90 interpolated
    assert signals.itl is not None and 0.015 < signals.itl <= 0.02
    assert signals.prefill.replicas == 1 and signals.decode.replicas == 1
    assert signals.decode.running == pytest.approx(4.0)
    assert signals.decode.kv_usage == pytest.approx(0.1)
    assert signals.prefill.busy is not None and signals.prefill.tokens is not None
    assert signals.prefill.tokens / signals.prefill.busy == pytest.approx(200 / 0.02)  # tokens per busy s
    assert signals.decode.tokens is not None and signals.decode.steps is not None
    assert signals.decode.tokens / signals.decode.steps == pytest.approx(4.0)  # mean batch


async def test_scrape_source_filters_pool_and_namespace(endpoints: Endpoints) -> None:
    source = ScrapeSource([e.url for e in endpoints.values()])
    try:
        await scrape_while_driving(source, endpoints, rounds=2)
        other_pool = await source.read(SignalQuery("other", 60, 0.9, 0.9))
        namespaced = await source.read(SignalQuery("chat", 60, 0.9, 0.9, namespace="team-a"))
    finally:
        await source.close()
    for signals in (other_pool, namespaced):  # local processes carry no namespace label
        assert signals.request_rate is None and signals.ttft is None and signals.prefill.replicas is None


async def test_scrape_source_without_history_has_no_rates(endpoints: Endpoints) -> None:
    source = ScrapeSource([e.url for e in endpoints.values()])
    try:
        signals = await source.read(QUERY)  # one scrape: gauges yes, rates need two samples
    finally:
        await source.close()
    assert signals.request_rate is None and signals.ttft is None
    assert signals.decode.replicas == 1


async def test_scrape_source_tolerates_a_dead_target_and_reports_all_dead(
    endpoints: Endpoints,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    source = ScrapeSource([*(e.url for e in endpoints.values()), dead], timeout=1.0)
    try:
        await scrape_while_driving_partial(source, endpoints)
        assert (await source.read(QUERY)).request_rate is not None
        source.set_targets([dead])
        with pytest.raises(SignalsUnavailableError) as raised:
            await source.read(QUERY)
    finally:
        await source.close()
    assert raised.value.reason == "ScrapeFailed"
    with pytest.raises(SignalsUnavailableError, match="no /metrics"):
        await ScrapeSource([]).read(QUERY)


async def scrape_while_driving_partial(source: ScrapeSource, endpoints: Endpoints) -> None:
    for _ in range(2):
        drive(endpoints, ttft=0.6, itl=0.02)
        assert await source.scrape() == len(source.targets) - 1
        await asyncio.sleep(0.2)


# ---- the Prometheus source's failure modes -------------------------------------------------------


async def test_unreachable_prometheus_is_reported_quickly_in_the_same_words() -> None:
    url = f"http://127.0.0.1:{free_port()}/behind/a/proxy"
    source = PrometheusSource(url, timeout=2.0)
    messages = []
    for _ in range(2):  # the query carries `&time=<now>`; the message must not
        started = time.monotonic()
        with pytest.raises(SignalsUnavailableError) as raised:
            await source.read(QUERY)
        assert raised.value.reason == "PrometheusUnreachable"
        assert time.monotonic() - started < 2.0  # no retry backoff
        messages.append(raised.value.message)
    assert messages == [f"Prometheus at {url} unreachable: connection refused"] * 2
    source.close()


def test_root_cause_names_an_unresolvable_host() -> None:
    wrapped = requests.ConnectionError(OSError("outer text with ?time=1"))
    wrapped.__cause__ = socket.gaierror(-2, "Name or service not known")
    assert root_cause(wrapped) == "name or service not known"
    assert root_cause(requests.ConnectionError("no cause at all")) == "ConnectionError"


async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/v1/query", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_a_failing_query_is_reported() -> None:
    async def bad_request(request: web.Request) -> web.Response:
        return web.json_response({"status": "error", "error": "parse error"}, status=400)

    runner, url = await serve(bad_request)
    try:
        with pytest.raises(SignalsUnavailableError) as raised:
            await PrometheusSource(url, timeout=2.0).read(QUERY)
    finally:
        await runner.cleanup()
    assert raised.value.reason == "QueryFailed"
    assert "ttft" in raised.value.message


async def test_a_hanging_prometheus_times_out_without_blocking_the_loop() -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)
        return web.json_response({"status": "success", "data": {"result": []}})

    runner, url = await serve(hang)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        with pytest.raises(SignalsUnavailableError) as raised:
            await PrometheusSource(url, timeout=0.5).read(QUERY)
    finally:
        task.cancel()
        release.set()
        await runner.cleanup()
    assert raised.value.reason == "PrometheusTimeout"
    assert ticks >= 5  # the event loop kept running while the client waited in its thread
