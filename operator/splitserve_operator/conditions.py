"""Standard Kubernetes conditions (set one without disturbing the others) and the events beside them.

Shared by the reconciler (Ready, Progressing, Degraded) and the autoscaler (MetricsAvailable), which
both write `status.conditions`. A merge patch replaces lists whole, so every writer sends the full
list returned here: its own condition updated, everybody else's kept.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the pool: the reconciler's and the autoscaler's alike."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def rfc3339(timestamp: float) -> str:
    """An epoch time as Kubernetes writes times (second precision, Z suffix)."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    return rfc3339(datetime.datetime.now(datetime.UTC).timestamp())


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type_: str,
    status: Status,
    reason: str,
    message: str,
    *,
    now: str,
    observed_generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new condition list with `type_` set; its lastTransitionTime moves only when status flips.

    Pure: `now` comes from the caller, so the same inputs always give the same list (and an
    unchanged condition gives an equal list, which is what keeps no-op reconciles write-free).
    """
    result: list[dict[str, Any]] = []
    found = False
    for condition in conditions:
        if condition.get("type") != type_:
            result.append(dict(condition))
            continue
        found = True
        flipped = condition.get("status") != status or not condition.get("lastTransitionTime")
        result.append(
            _condition(
                type_,
                status,
                reason,
                message,
                observed_generation,
                now if flipped else condition["lastTransitionTime"],
            )
        )
    if not found:
        result.append(_condition(type_, status, reason, message, observed_generation, now))
    return result


def get_condition(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def _condition(
    type_: str, status: Status, reason: str, message: str, observed_generation: int | None, when: str
) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    if observed_generation is not None:
        condition["observedGeneration"] = observed_generation
    return condition
