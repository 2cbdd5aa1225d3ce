"""Signals without a Prometheus: scrape the processes' /metrics and evaluate `signal_specs` here.

For `splitserve up`: `ScrapeSource` keeps a short history of scrapes per target and computes each
signal with the semantics of the PromQL that `PrometheusSource` (signals.py) would send.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from splitserve_operator.autoscaling.signals import (
    PoolSignals,
    SignalQuery,
    SignalSpec,
    SignalsUnavailableError,
    finite,
    series_labels,
    signal_specs,
)

log = logging.getLogger(__name__)

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
        wanted = series_labels(query, spec.role)
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
