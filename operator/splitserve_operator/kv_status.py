"""Proof that the pool shares its KV: counters over a window -> status figures and a Degraded verdict.

Pure; the controller (handlers.py) sends `kv_queries` with the autoscaler's Prometheus client once per
evaluation interval and writes what `status_patch` returns (nothing when nothing changed). Over the
pool's autoscaling window:

- `remotePrefillRatio`: prompts prefilled on a prefill worker / all prompts, from the router's
  splitserve_prefills_total{placement}; the rest ran on the decode workers (short uncached prompts,
  or the prefill pool at zero). None without prompts in the window.
- `prefixHitRatio`: prompt tokens found in the workers' prefix caches (every tier) / tokens looked up.
- `kvTransferFailures`: KV transfers that failed, by reason, from the prefill workers'
  splitserve_kv_transfer_failures_total{reason}; reasons without a failure are left out.

Degraded turns True (reason KVTransfersFailing) while transfers *keep* failing: at least FAILING_MIN
failures in the window and at least FAILING_SHARE of the transfers tried (failures + remote prefills).
One prefill worker dying mid-transfer fails a request or two, which the router retries elsewhere: that
alone does not degrade the pool; a broken network path or a decode worker refusing every transfer does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve.contract import names
from splitserve_operator import naming
from splitserve_operator.autoscaling.signals import SignalQuery, Vector, selector, window
from splitserve_operator.conditions import Event, get_condition
from splitserve_operator.diff import merge_diff
from splitserve_operator.status import Problem

KV_TRANSFERS_FAILING = "KVTransfersFailing"
FAILING_MIN = 3  # failed transfers in the window
FAILING_SHARE = 0.05  # of the transfers tried in the window
RATIO_DIGITS = 3


@dataclass(frozen=True)
class KvFigures:
    """Counter increases over the window, summed over the pool's processes; None: no such series."""

    window_seconds: float
    prefills: Mapping[str, float] = field(default_factory=dict)  # by placement: remote, local
    prefix_queries: float | None = None  # tokens looked up
    prefix_hits: float | None = None  # tokens found cached
    failures: Mapping[str, float] = field(default_factory=dict)  # by reason

    @classmethod
    def from_vectors(cls, vectors: Mapping[str, Vector], window_seconds: float) -> KvFigures:
        """From the answers to `kv_queries` (each {label value: increase}, "" for an unlabelled sum)."""

        def known(name: str) -> dict[str, float]:
            return {key: value for key, value in vectors.get(name, {}).items() if value is not None}

        return cls(
            window_seconds=window_seconds,
            prefills=known("prefills"),
            prefix_queries=known("queries").get(""),
            prefix_hits=known("hits").get(""),
            failures=known("failures"),
        )

    @property
    def failed(self) -> int:
        """Failed transfers in the window (increase() extrapolates, so counts are rounded)."""
        return sum(self.failure_counts.values())

    @property
    def failure_counts(self) -> dict[str, int]:
        counts = {reason: round(value) for reason, value in sorted(self.failures.items())}
        return {reason: count for reason, count in counts.items() if count > 0}


def kv_queries(query: SignalQuery) -> dict[str, str]:
    """PromQL for `KvFigures`: each series is exported by one kind of process only (names.SERIES_ROLES),
    so no role filter; the label names are those names.py documents for each counter."""
    where, over = selector(query, None), window(query)
    return {
        "prefills": f"sum by (placement) (increase({names.PREFILLS}{where}{over}))",
        "queries": f"sum(increase({names.PREFIX_CACHE_QUERIES}{where}{over}))",
        "hits": f"sum(increase({names.PREFIX_CACHE_HITS}{where}{over}))",
        "failures": f"sum by (reason) (increase({names.KV_TRANSFER_FAILURES}{where}{over}))",
    }


def _ratio(part: float, whole: float | None) -> float | None:
    """part / whole, None without a whole. A labelled series appears only once it counted something,
    so a missing part (no remote prefill yet, no hit yet) is a zero, not unknown."""
    if not whole:
        return None
    return round(min(part / whole, 1.0), RATIO_DIGITS)


def status_fields(figures: KvFigures) -> dict[str, Any]:
    """The status fields, camelCase, as of this window."""
    remote = figures.prefills.get("remote", 0.0)
    return {
        "remotePrefillRatio": _ratio(remote, sum(figures.prefills.values())),
        "prefixHitRatio": _ratio(figures.prefix_hits or 0.0, figures.prefix_queries),
        "kvTransferFailures": figures.failure_counts,
    }


def status_patch(current: Mapping[str, Any], figures: KvFigures) -> dict[str, Any]:
    """The merge patch that brings `current` status to these figures: empty when nothing changed, and
    null for a ratio without data or a reason that no longer failed within the window."""
    want = status_fields(figures)
    gone = dict.fromkeys(current.get("kvTransferFailures") or {})
    want["kvTransferFailures"] = gone | want["kvTransferFailures"]
    patch = merge_diff(current, want)
    if patch.get("kvTransferFailures") == {}:
        del patch["kvTransferFailures"]
    return patch


def transfer_problem(figures: KvFigures) -> Problem | None:
    """KVTransfersFailing while transfers keep failing (see the module's doc); the message changes only
    with the set of reasons, so a steady failure rate writes no status."""
    failed = figures.failed
    tried = failed + figures.prefills.get("remote", 0.0)
    if failed < FAILING_MIN or failed < FAILING_SHARE * tried:
        return None
    reasons = ", ".join(figures.failure_counts)
    message = (
        f"KV transfers keep failing ({reasons}): at least {FAILING_MIN} and {FAILING_SHARE:.0%} of the "
        f"transfers in {figures.window_seconds:g}s; see status.kvTransferFailures"
    )
    return Problem(KV_TRANSFERS_FAILING, message)


def recorded_problem(status: Mapping[str, Any]) -> Problem | None:
    """The verdict status already records (after an operator restart, until the first new reading)."""
    degraded = get_condition(status.get("conditions") or [], naming.DEGRADED)
    if degraded is None or degraded.get("status") != "True" or degraded.get("reason") != KV_TRANSFERS_FAILING:
        return None
    return Problem(KV_TRANSFERS_FAILING, str(degraded.get("message", "")))


def kv_events(before: Mapping[str, Any], after: list[dict[str, Any]]) -> list[Event]:
    """A Warning when Degraded turns KVTransfersFailing (`before`: the status so far, `after`: the new
    conditions); its message names the failing reasons."""
    old = get_condition(before.get("conditions") or [], naming.DEGRADED)
    new = get_condition(after, naming.DEGRADED)
    if (
        new is None
        or new["reason"] != KV_TRANSFERS_FAILING
        or (old is not None and old["reason"] == new["reason"])
    ):
        return []
    return [Event("Warning", KV_TRANSFERS_FAILING, new["message"])]
