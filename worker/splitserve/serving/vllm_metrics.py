"""The `vllm:*` series the ecosystem reads, beside splitserve's own, in the same registry.

Names, types, label sets and buckets follow vLLM's PrometheusStatLogger (vllm/v1/metrics/loggers.py;
see splitserve.contract.names). Most are views of splitserve series at scrape time, so nothing is
counted twice and the two can never disagree: gauges and counters are re-labelled, and histograms are
read at vLLM's bucket edges, which are a subset of ours (the contract merges them), so each vLLM
bucket count is exact. The two that have no splitserve counterpart are recorded here: the per-request
mean time per output token and successes by finish reason.

Which process exports what: the client-facing series (TTFT, ITL, per-request TPOT, e2e, tokens,
successes) come from the router (and `both`), the scheduler's (running, waiting, KV usage) from the
engines (prefill, decode, both), so a sum over a pool counts every request once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from splitserve.contract import names

if TYPE_CHECKING:
    from splitserve.serving.metrics import Metrics

ENGINE_INDEX = "0"  # one engine per process


class VllmSeries(Collector):
    """vLLM-named views of one process's `Metrics`, plus the two series only vLLM has."""

    def __init__(self, metrics: Metrics, model_name: str) -> None:
        self.metrics = metrics
        self.values = [model_name, ENGINE_INDEX]
        self.frontend = metrics.role in names.FRONTEND_ROLES
        self.engine = metrics.role != "router"
        # Recorded by the frontend; registered in a private registry and exported by `collect`, so
        # an engine-only process does not show them.
        own = CollectorRegistry(auto_describe=True)
        self.time_per_output_token = Histogram(
            names.VLLM_TPOT,
            "Histogram of time_per_output_token_seconds per request.",
            names.VLLM_LABELS,
            buckets=names.VLLM_ITL_BUCKETS,
            registry=own,
        ).labels(*self.values)
        self._success = Counter(
            names.VLLM_REQUEST_SUCCESS,
            "Count of successfully processed requests.",
            (*names.VLLM_LABELS, names.VLLM_FINISHED_REASON_LABEL),
            registry=own,
        )
        for reason in names.VLLM_FINISHED_REASONS:
            self._success.labels(*self.values, reason)
        self._own = own
        metrics.registry.register(self)

    def request_succeeded(self, finish_reasons: list[str | None]) -> None:
        """One successful request; vLLM counts it under its (first choice's) finish reason."""
        reason = next((r for r in finish_reasons if r), "stop")
        self._success.labels(*self.values, reason if reason in names.VLLM_FINISHED_REASONS else "stop").inc()

    def request_timed(self, first_token: float | None, last_token: float | None, tokens: int) -> None:
        """vLLM's mean time per output token of one request: decode time over the tokens after the first."""
        if first_token is not None and last_token is not None and tokens > 1:
            self.time_per_output_token.observe((last_token - first_token) / (tokens - 1))

    def describe(self) -> list[Metric]:
        return []  # collected fresh each scrape; nothing to check for name clashes up front

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        if self.frontend:
            yield self._histogram(
                names.VLLM_TTFT,
                "Histogram of time to first token in seconds.",
                m.ttft,
                names.VLLM_TTFT_BUCKETS,
            )
            yield self._histogram(
                names.VLLM_ITL, "Histogram of inter-token latency in seconds.", m.itl, names.VLLM_ITL_BUCKETS
            )
            yield self._histogram(
                names.VLLM_E2E, "Histogram of e2e request latency in seconds.", m.e2e, names.VLLM_E2E_BUCKETS
            )
            yield self._counter(
                names.VLLM_PROMPT_TOKENS, "Number of prefill tokens processed.", m.prompt_tokens
            )
            yield self._counter(
                names.VLLM_GENERATION_TOKENS, "Number of generation tokens processed.", m.generation_tokens
            )
            yield from self._own.collect()
        if self.engine:
            yield self._gauge(
                names.VLLM_RUNNING, "Number of requests in model execution batches.", m.requests_running
            )
            yield self._gauge(
                names.VLLM_WAITING, "Number of requests waiting to be processed.", m.requests_waiting
            )
            yield self._gauge(
                names.VLLM_KV_USAGE, "KV-cache usage. 1 means 100 percent usage.", m.kv_cache_usage
            )
            yield self._counter(
                names.VLLM_PREFIX_CACHE_QUERIES,
                "Prefix cache queries, in terms of number of queried tokens.",
                m.prefix_cache_queries,
            )
            yield self._counter(
                names.VLLM_PREFIX_CACHE_HITS,
                "Prefix cache hits, in terms of number of cached tokens.",
                m.prefix_cache_hits("device"),
            )

    def _samples(self, source: MetricWrapperBase) -> dict[str, list[tuple[dict[str, str], float]]]:
        by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in source.collect():
            for sample in family.samples:
                by_name.setdefault(sample.name, []).append((sample.labels, sample.value))
        return by_name

    def _histogram(self, name: str, doc: str, source: Histogram, edges: tuple[float, ...]) -> Metric:
        samples = self._samples(source)
        cumulative = {float(labels["le"]): value for labels, value in samples[f"{_base(source)}_bucket"]}
        buckets = [(str(float(edge)), cumulative[edge]) for edge in edges]
        buckets.append(("+Inf", cumulative[math.inf]))
        family = HistogramMetricFamily(name, doc, labels=names.VLLM_LABELS)
        family.add_metric(self.values, buckets, samples[f"{_base(source)}_sum"][0][1])
        return family

    def _counter(self, name: str, doc: str, source: Counter) -> Metric:
        family = CounterMetricFamily(name, doc, labels=names.VLLM_LABELS)
        family.add_metric(self.values, self._samples(source)[f"{_base(source)}_total"][0][1])
        return family

    def _gauge(self, name: str, doc: str, source: MetricWrapperBase) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=names.VLLM_LABELS)
        family.add_metric(self.values, next(iter(self._samples(source).values()))[0][1])
        return family


def _base(metric: MetricWrapperBase) -> str:
    return str(metric._name)  # the family name, without _total/_bucket
