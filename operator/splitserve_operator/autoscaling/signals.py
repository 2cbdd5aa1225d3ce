"""Reading the autoscaler's signals: from Prometheus, or by scraping the processes' /metrics directly.

One table (`signal_specs`) says what each signal is; `PrometheusSource` renders it as PromQL and asks
Prometheus (prometheus-api-client, synchronous, so it runs in a worker thread under a timeout), while
`ScrapeSource` evaluates the same table itself over a short history of scrapes, for `splitserve up`
without a Prometheus. Both are async and never block the event loop. A source that cannot answer raises
`SignalsUnavailableError`; a series that is absent or NaN comes back as None (the policy holds on it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal, Protocol

import aiohttp
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_client.parser import text_string_to_metric_families
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from splitserve.contract import names

log = logging.getLogger(__name__)

Kind = Literal["quantile", "rate", "count", "sum", "sum_avg", "avg_avg"]


@dataclass(frozen=True)
class SignalQuery:
    """Which InferencePool to read, over which window, at which latency percentiles."""

    pool: str
    window_seconds: float
    ttft_percentile: float
    itl_percentile: float
    namespace: str | None = None  # added by the Kubernetes scrape config; absent in local mode


@dataclass(frozen=True)
class WorkerSignals:
    """One worker pool (prefill or decode), aggregated over its replicas."""

    replicas: float | None = None  # replicas exporting metrics now
    running: float | None = None  # requests in their batches (sum of window averages)
    waiting: float | None = None  # requests queued now (sum)
    kv_usage: float | None = None  # KV cache usage ratio (mean of window averages)
    busy: float | None = None  # step-seconds per second (sum): busy replicas
    steps: float | None = None  # engine steps per second (sum)
    tokens: float | None = None  # tokens computed per second (sum)
    startup: float | None = None  # seconds from process start to serving (mean of the replicas)


@dataclass(frozen=True)
class PoolSignals:
    """Everything the autoscaler reads for one InferencePool; None = absent, NaN or no data."""

    ttft: float | None = None
    itl: float | None = None
    request_rate: float | None = None
    prompt_token_rate: float | None = None
    generation_token_rate: float | None = None
    prefill: WorkerSignals = WorkerSignals()
    decode: WorkerSignals = WorkerSignals()

    @classmethod
    def from_values(cls, values: Mapping[str, float | None]) -> PoolSignals:
        def workers(role: str) -> WorkerSignals:
            return WorkerSignals(**{f.name: values.get(f"{role}.{f.name}") for f in fields(WorkerSignals)})

        router = {f.name: values.get(f.name) for f in fields(cls) if f.name not in ("prefill", "decode")}
        return cls(**router, prefill=workers("prefill"), decode=workers("decode"))


class SignalsUnavailableError(Exception):
    """The source could not answer; `reason` is a CamelCase word for the MetricsAvailable condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class SignalSource(Protocol):
    async def read(self, query: SignalQuery) -> PoolSignals: ...


@dataclass(frozen=True)
class SignalSpec:
    """One signal: an aggregation of one metric of one role over the pool's series."""

    kind: Kind
    metric: str
    role: str
    quantile: float = 0.0


def signal_specs(query: SignalQuery) -> dict[str, SignalSpec]:
    specs = {
        "ttft": SignalSpec("quantile", names.TTFT, "router", query.ttft_percentile),
        "itl": SignalSpec("quantile", names.ITL, "router", query.itl_percentile),
        "request_rate": SignalSpec("rate", names.REQUESTS, "router"),
        "prompt_token_rate": SignalSpec("rate", names.PROMPT_TOKENS, "router"),
        "generation_token_rate": SignalSpec("rate", names.GENERATION_TOKENS, "router"),
    }
    for role in names.WORKER_ROLES:
        specs |= {
            f"{role}.replicas": SignalSpec("count", names.REQUESTS_RUNNING, role),
            f"{role}.running": SignalSpec("sum_avg", names.REQUESTS_RUNNING, role),
            f"{role}.waiting": SignalSpec("sum", names.REQUESTS_WAITING, role),
            f"{role}.kv_usage": SignalSpec("avg_avg", names.KV_CACHE_USAGE, role),
            f"{role}.busy": SignalSpec("rate", names.step_seconds(role) + "_sum", role),
            f"{role}.steps": SignalSpec("rate", names.step_seconds(role) + "_count", role),
            f"{role}.tokens": SignalSpec("rate", names.stage_tokens(role), role),
            f"{role}.startup": SignalSpec("avg_avg", names.STARTUP_SECONDS, role),
        }
    return specs


def _labels(query: SignalQuery, role: str) -> dict[str, str]:
    labels = {"pool": query.pool, "role": role}
    if query.namespace is not None:
        labels["namespace"] = query.namespace
    return labels


def promql(spec: SignalSpec, query: SignalQuery) -> str:
    """The PromQL for one signal, e.g. histogram_quantile(0.9, sum by (le) (rate(x_bucket{..}[60s])))."""
    escaped = {
        key: value.replace("\\", "\\\\").replace('"', '\\"')
        for key, value in _labels(query, spec.role).items()
    }
    selector = "{" + ",".join(f'{key}="{value}"' for key, value in escaped.items()) + "}"
    window = f"[{max(1, round(query.window_seconds))}s]"
    series = spec.metric + selector
    match spec.kind:
        case "quantile":
            buckets = f"sum by (le) (rate({spec.metric}_bucket{selector}{window}))"
            return f"histogram_quantile({spec.quantile:g}, {buckets})"
        case "rate":
            return f"sum(rate({series}{window}))"
        case "count":
            return f"count({series})"
        case "sum":
            return f"sum({series})"
        case "sum_avg":
            return f"sum(avg_over_time({series}{window}))"
        case "avg_avg":
            return f"avg(avg_over_time({series}{window}))"


def finite(value: float) -> float | None:
    """NaN, infinities and negative values are no data (rates and latencies are never negative)."""
    return value if math.isfinite(value) and value >= 0 else None


# ---- Prometheus ---------------------------------------------------------------------------------


class UnconfiguredSource:
    """The operator was started without --prometheus-url: every autoscaled pool holds, and says why."""

    async def read(self, query: SignalQuery) -> PoolSignals:
        raise SignalsUnavailableError(
            "PrometheusNotConfigured", "the operator runs without --prometheus-url, so no TTFT/ITL to act on"
        )


class PrometheusSource:
    """Signals from a Prometheus server, via prometheus-api-client in a worker thread."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        disable_ssl: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # No client-side retries: the next evaluation is the retry, and a down Prometheus must be
        # reported within one timeout, not after a backoff series.
        self._client = PrometheusConnect(
            url=self.url, headers=headers, disable_ssl=disable_ssl, retry=Retry(total=0), timeout=timeout
        )

    async def read(self, query: SignalQuery) -> PoolSignals:
        exprs = {name: promql(spec, query) for name, spec in signal_specs(query).items()}
        try:
            # Generous outer bound: each request is bounded by `timeout` already.
            values = await asyncio.wait_for(
                asyncio.to_thread(self._query_all, exprs, time.time()), self.timeout * 2
            )
        except TimeoutError as error:
            message = f"Prometheus at {self.url} did not answer within {self.timeout:g}s"
            raise SignalsUnavailableError("PrometheusTimeout", message) from error
        return PoolSignals.from_values(values)

    def _query_all(self, exprs: Mapping[str, str], at: float) -> dict[str, float | None]:
        """All queries at one evaluation time, so the signals describe the same instant."""
        values: dict[str, float | None] = {}
        for name, expr in exprs.items():
            try:
                result = self._client.custom_query(expr, params={"time": at})
                values[name] = finite(float(result[0]["value"][1])) if result else None
            except requests.RequestException as error:
                if _timed_out(error):
                    raise SignalsUnavailableError(
                        "PrometheusTimeout", f"Prometheus at {self.url} timed out on {name}"
                    ) from error
                raise SignalsUnavailableError(
                    "PrometheusUnreachable", f"cannot reach Prometheus at {self.url}: {_first_line(error)}"
                ) from error
            except (PrometheusApiClientException, KeyError, IndexError, TypeError, ValueError) as error:
                raise SignalsUnavailableError(
                    "QueryFailed", f"query for {name} failed: {_first_line(error)} ({expr})"
                ) from error
        return values

    def close(self) -> None:
        self._client.close()


def _timed_out(error: requests.RequestException) -> bool:
    """A read timeout, however requests wraps it (with retries off it arrives as a ConnectionError)."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(error, requests.Timeout) or isinstance(reason, ReadTimeoutError)


def _first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300]


# ---- direct scrape ------------------------------------------------------------------------------

LabelSet = tuple[tuple[str, str], ...]
Sample = dict[tuple[str, LabelSet], float]


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over (upper bound, cumulative count) pairs: linear within the
    bucket the rank falls in, the highest finite bound when it falls in +Inf, NaN without data."""
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]) or ordered[-1][1] <= 0:
        return math.nan
    counts = [ordered[0][1]]
    for _, count in ordered[1:]:
        counts.append(max(count, counts[-1]))  # rate noise can make cumulative counts dip
    rank = q * counts[-1]
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(ordered) - 1:
        return ordered[-2][0]
    start, end = (0.0, ordered[0][0]) if index == 0 else (ordered[index - 1][0], ordered[index][0])
    below = counts[index - 1] if index > 0 else 0.0
    inside = counts[index] - below
    return end if inside <= 0 else start + (end - start) * (rank - below) / inside


def parse_exposition(text: str) -> Sample:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counter_increase(values: Sequence[float]) -> float:
    """Increase over consecutive samples, treating a drop as a restart from zero (like rate())."""
    return sum(b - a if b >= a else b for a, b in itertools.pairwise(values))


class ScrapeSource:
    """Signals computed from the pools' own /metrics, scraped on every read (and whenever `scrape`
    is called, e.g. by a faster loop), keeping `keep_seconds` of history per target."""

    def __init__(
        self, targets: Iterable[str] = (), *, timeout: float = 2.0, keep_seconds: float = 600.0
    ) -> None:
        self.targets: list[str] = list(targets)
        self.timeout = timeout
        self.keep_seconds = keep_seconds
        self._history: dict[str, deque[tuple[float, Sample]]] = {}
        self._fresh: set[str] = set()  # targets whose last scrape succeeded
        self._session: aiohttp.ClientSession | None = None

    def set_targets(self, targets: Iterable[str]) -> None:
        """Replace the target list (replicas come and go); history of removed targets is dropped."""
        self.targets = list(targets)
        for url in set(self._history) - set(self.targets):
            del self._history[url]
        self._fresh &= set(self.targets)

    async def scrape(self) -> int:
        """Scrape every target once, concurrently; returns how many answered."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        session = self._session
        results = await asyncio.gather(*(self._scrape_one(session, url) for url in self.targets))
        now = time.monotonic()
        self._fresh = set()
        for url, sample in zip(self.targets, results, strict=True):
            history = self._history.setdefault(url, deque())
            while history and history[0][0] < now - self.keep_seconds:
                history.popleft()
            if sample is not None:
                history.append((now, sample))
                self._fresh.add(url)
        return len(self._fresh)

    async def _scrape_one(self, session: aiohttp.ClientSession, url: str) -> Sample | None:
        try:
            async with session.get(url) as response:
                response.raise_for_status()
                return parse_exposition(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.debug("scrape of %s failed: %s", url, error)
            return None

    async def read(self, query: SignalQuery) -> PoolSignals:
        if not self.targets:
            raise SignalsUnavailableError("NoTargets", "no /metrics URLs to scrape")
        if await self.scrape() == 0:
            message = f"none of {len(self.targets)} /metrics URLs answered"
            raise SignalsUnavailableError("ScrapeFailed", message)
        return PoolSignals.from_values(
            {name: self.evaluate(spec, query) for name, spec in signal_specs(query).items()}
        )

    def evaluate(self, spec: SignalSpec, query: SignalQuery) -> float | None:
        """One signal from the scrape history, with the semantics of the PromQL `promql` renders."""
        wanted = _labels(query, spec.role)
        if spec.kind == "quantile":
            rates: dict[float, float] = {}
            for labels, values in self._window(f"{spec.metric}_bucket", wanted, query.window_seconds):
                rate = _rate(values)
                if rate is not None:
                    le = float(dict(labels)["le"])
                    rates[le] = rates.get(le, 0.0) + rate
            return finite(histogram_quantile(spec.quantile, list(rates.items()))) if rates else None
        series = self._window(spec.metric, wanted, query.window_seconds)
        per_series: list[float | None]
        if spec.kind == "rate":
            per_series = [_rate(values) for _, values in series]
        elif spec.kind in ("count", "sum"):
            per_series = list(self._latest(spec.metric, wanted))
        else:
            per_series = [sum(v for _, v in values) / len(values) for _, values in series]
        known = [value for value in per_series if value is not None]
        if not known:
            return None
        if spec.kind == "count":
            return float(len(known))
        return finite(sum(known) / len(known) if spec.kind == "avg_avg" else sum(known))

    def _window(
        self, name: str, wanted: Mapping[str, str], window: float
    ) -> list[tuple[LabelSet, list[tuple[float, float]]]]:
        """Per matching series (per target): its (time, value) samples within the window."""
        found: list[tuple[LabelSet, list[tuple[float, float]]]] = []
        for history in self._history.values():
            if not history:
                continue
            cutoff = history[-1][0] - window
            by_series: dict[LabelSet, list[tuple[float, float]]] = {}
            for at, sample in history:
                if at < cutoff:
                    continue
                for (metric, labels), value in sample.items():
                    if metric == name and _matches(labels, wanted):
                        by_series.setdefault(labels, []).append((at, value))
            found.extend(by_series.items())
        return found

    def _latest(self, name: str, wanted: Mapping[str, str]) -> Iterable[float]:
        """Current values of the matching series of targets that answered the last scrape."""
        for url in self._fresh:
            for (metric, labels), value in self._history[url][-1][1].items():
                if metric == name and _matches(labels, wanted):
                    yield value

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _matches(labels: LabelSet, wanted: Mapping[str, str]) -> bool:
    present = dict(labels)
    return all(present.get(key) == value for key, value in wanted.items())


def _rate(values: Sequence[tuple[float, float]]) -> float | None:
    if len(values) < 2 or values[-1][0] <= values[0][0]:
        return None
    return counter_increase([v for _, v in values]) / (values[-1][0] - values[0][0])
