"""Reading the autoscaler's signals: from Prometheus, or by scraping the processes' /metrics directly.

One table (`signal_specs`) says what each signal is; `PrometheusSource` renders it as PromQL and asks
Prometheus (prometheus-api-client, synchronous, so it runs in a worker thread under a timeout), while
`ScrapeSource` (scrape.py) evaluates the same table itself over a short history of scrapes, for
`splitserve up` without a Prometheus. Both are async and never block the event loop. A source that
cannot answer raises `SignalsUnavailableError`; a series that is absent or NaN comes back as None (the
policy holds on it).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol, TypeVar

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from splitserve.contract import names

T = TypeVar("T")
Vector = dict[str, float | None]  # one query's series by the value of its `by` label
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


def series_labels(query: SignalQuery, role: str | None) -> dict[str, str]:
    labels = {"pool": query.pool} | ({"role": role} if role is not None else {})
    if query.namespace is not None:
        labels["namespace"] = query.namespace
    return labels


def selector(query: SignalQuery, role: str | None) -> str:
    """`{pool="..",role="..",namespace=".."}`, escaped; no role: every role exporting the series."""
    escaped = {
        key: value.replace("\\", "\\\\").replace('"', '\\"')
        for key, value in series_labels(query, role).items()
    }
    return "{" + ",".join(f'{key}="{value}"' for key, value in escaped.items()) + "}"


def window(query: SignalQuery) -> str:
    """The range of the window's rate() and increase() queries, e.g. `[60s]`."""
    return f"[{max(1, round(query.window_seconds))}s]"


def promql(spec: SignalSpec, query: SignalQuery) -> str:
    """The PromQL for one signal, e.g. histogram_quantile(0.9, sum by (le) (rate(x_bucket{..}[60s])))."""
    selector_, window_ = selector(query, spec.role), window(query)
    series = spec.metric + selector_
    match spec.kind:
        case "quantile":
            buckets = f"sum by (le) (rate({spec.metric}_bucket{selector_}{window_}))"
            return f"histogram_quantile({spec.quantile:g}, {buckets})"
        case "rate":
            return f"sum(rate({series}{window_}))"
        case "count":
            return f"count({series})"
        case "sum":
            return f"sum({series})"
        case "sum_avg":
            return f"sum(avg_over_time({series}{window_}))"
        case "avg_avg":
            return f"avg(avg_over_time({series}{window_}))"


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
        return PoolSignals.from_values(await self.ask(exprs, _scalar))

    async def vectors(self, exprs: Mapping[str, str]) -> dict[str, Vector]:
        """Each query's series as {value of its one `by` label (or ""): value}, e.g. for
        `sum by (reason) (increase(...))`; the same timeouts and errors as `read`."""
        return await self.ask(exprs, _vector)

    async def ask(self, exprs: Mapping[str, str], parse: Callable[[Any], T]) -> dict[str, T]:
        """Every query at one evaluation time, each answer through `parse` (KeyError, ValueError and
        the like from it fail the read as QueryFailed)."""
        try:
            # Generous outer bound: each request is bounded by `timeout` already.
            return await asyncio.wait_for(
                asyncio.to_thread(self._query_all, exprs, time.time(), parse), self.timeout * 2
            )
        except TimeoutError as error:
            message = f"Prometheus at {self.url} did not answer within {self.timeout:g}s"
            raise SignalsUnavailableError("PrometheusTimeout", message) from error

    def _query_all(self, exprs: Mapping[str, str], at: float, parse: Callable[[Any], T]) -> dict[str, T]:
        """All queries at one evaluation time, so the signals describe the same instant."""
        values: dict[str, T] = {}
        for name, expr in exprs.items():
            try:
                values[name] = parse(self._client.custom_query(expr, params={"time": at}))
            except requests.RequestException as error:
                if _timed_out(error):
                    raise SignalsUnavailableError(
                        "PrometheusTimeout", f"Prometheus at {self.url} timed out on {name}"
                    ) from error
                raise SignalsUnavailableError(
                    "PrometheusUnreachable", f"Prometheus at {self.url} unreachable: {root_cause(error)}"
                ) from error
            except (PrometheusApiClientException, KeyError, IndexError, TypeError, ValueError) as error:
                raise SignalsUnavailableError(
                    "QueryFailed", f"query for {name} failed: {_first_line(error)} ({expr})"
                ) from error
        return values

    def close(self) -> None:
        self._client.close()


def _scalar(result: Any) -> float | None:
    """The value of a query whose answer is one series (or none: no data)."""
    return finite(float(result[0]["value"][1])) if result else None


def _vector(result: Any) -> Vector:
    return {next(iter(r["metric"].values()), ""): finite(float(r["value"][1])) for r in result}


def _timed_out(error: requests.RequestException) -> bool:
    """A read timeout, however requests wraps it (with retries off it arrives as a ConnectionError)."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(error, requests.Timeout) or isinstance(reason, ReadTimeoutError)


def root_cause(error: BaseException) -> str:
    """The innermost cause of a failed request, short and the same on every try ("connection refused").

    The outer exceptions' texts embed the request URL, whose PromQL query ends in `&time=<epoch>`:
    a condition message built from them changed on every evaluation, so every evaluation wrote status.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    innermost = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        innermost = current
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        reason = getattr(current, "reason", None)
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = reason if isinstance(reason, BaseException) else current.__cause__ or nested
    return type(innermost).__name__


def _first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300]
