"""The HPA `behavior` machinery: stabilization windows and per-evaluation step limits.

Kept apart from the policy (policy.py), which decides what the pool needs: this module only says how
far one evaluation may move towards it, the way the HPA's `behavior` does, from the two directions'
rules alone. The autoscaling bench replays the same machinery behind its baseline policies.
"""

from __future__ import annotations

import math
from typing import Protocol

from splitserve_operator.autoscaling_spec import ScalingRules


class Behavior(Protocol):
    """The rules of both directions (a `PoolPolicy` has them)."""

    @property
    def scale_up(self) -> ScalingRules: ...

    @property
    def scale_down(self) -> ScalingRules: ...


def step_limit(current: int, rules: ScalingRules) -> int:
    """Replicas one evaluation may add or remove: max(maxStep, ceil(current * maxStepPercent / 100))."""
    return max(rules.max_step, math.ceil(current * rules.max_step_percent / 100))


def stabilize(
    history: list[tuple[float, int]], current: int, now: float, policy: Behavior, hold_since: float | None
) -> int:
    """HPA stabilization: up to the lowest recommendation of the scale-up window, down to the highest of
    the scale-down window. `hold_since` counts `current` as recommended then (a fresh state has not yet
    watched a whole scale-down window, so it must not shrink the pool on its first evaluations)."""
    up_cut = now - policy.scale_up.stabilization_window_seconds
    down_cut = now - policy.scale_down.stabilization_window_seconds
    ups = [rec for time, rec in history if time >= up_cut]
    downs = [rec for time, rec in history if time >= down_cut]
    if hold_since is not None and hold_since >= down_cut:
        downs.append(current)
    result = current
    if ups and result < min(ups):
        result = min(ups)
    if downs and result > max(downs):
        result = max(downs)
    return result


def limit_step(current: int, desired: int, policy: Behavior) -> int:
    if desired > current:
        return min(desired, current + step_limit(current, policy.scale_up))
    if desired < current:
        return max(desired, current - step_limit(current, policy.scale_down))
    return desired
