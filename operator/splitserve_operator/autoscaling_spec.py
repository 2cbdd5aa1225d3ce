"""The InferencePool's autoscaling settings: HPA-like rules per direction, the shared budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from splitserve_operator.api_base import ApiModel, cel, validations

if TYPE_CHECKING:
    from splitserve_operator.models import Scheduling


class ScalingRules(ApiModel):
    """One direction of scaling, after the HPA `behavior` API."""

    stabilization_window_seconds: int = Field(
        0, ge=0, le=3600, description="Act on the most conservative recommendation seen in this window."
    )
    max_step: int = Field(4, ge=1, description="Most replicas added or removed per evaluation.")
    max_step_percent: int = Field(
        100,
        ge=1,
        description="Most replicas per evaluation as a percentage of current; "
        "the larger of this and maxStep applies.",
    )


class ScaleUpRules(ScalingRules):
    """Scale-up, with the HPA's defaults: act at once, up to 4 replicas or doubling per evaluation."""


class ScaleDownRules(ScalingRules):
    """Scale-down, slow by default (HPA: 300 s stabilization); each field defaults on its own, so
    setting only `maxStep` keeps the 300 s window."""

    stabilization_window_seconds: int = Field(
        300, ge=0, le=3600, description="Act on the most conservative recommendation seen in this window."
    )
    max_step: int = Field(1, ge=1, description="Most replicas removed per evaluation.")
    max_step_percent: int = Field(
        10,
        ge=1,
        description="Most replicas removed per evaluation as a percentage of current; "
        "the larger of this and maxStep applies.",
    )
    burst_memory_seconds: int = Field(
        900,
        ge=0,
        le=7200,
        description="After a pool had to drain a queue (a burst it could not absorb in time), how long "
        "it keeps at least the size the burst's arrivals needed, so the next burst finds it; 0: no memory "
        "beyond stabilizationWindowSeconds.",
    )


class AutoscalingBudget(ApiModel):
    """One budget for both pools together: the autoscaler splits it by what each pool's SLO needs (see
    docs/autoscaling.md, "Budget"), never exceeds it, and says in status which pool it capped."""

    model_config = validations(
        cel(
            "has(self.maxAcceleratorsTotal) || has(self.maxReplicasTotal)",
            "autoscaling.budget needs maxAcceleratorsTotal or maxReplicasTotal",
        )
    )

    max_accelerators_total: int | None = Field(
        None,
        ge=1,
        description="Most accelerators both pools may hold together; each replica counts its "
        "container's `accelerator` limit (else request). Pools without one count nothing here.",
    )
    max_replicas_total: int | None = Field(
        None, ge=2, description="Most replicas both pools may hold together (e.g. for CPU pools)."
    )
    accelerator: str = Field(
        "nvidia.com/gpu", min_length=1, description="The extended resource maxAcceleratorsTotal counts."
    )

    @model_validator(mode="after")
    def _some_limit(self) -> AutoscalingBudget:
        if self.max_accelerators_total is None and self.max_replicas_total is None:
            raise ValueError("autoscaling.budget needs maxAcceleratorsTotal or maxReplicasTotal")
        return self


def accelerators_per_replica(pool: Scheduling, resource: str) -> int:
    """Accelerators one replica of the pool holds: its limit of `resource`, else its request (the
    apiserver defaults an extended resource's request to its limit), else none."""
    value = pool.resources.limits.get(resource, pool.resources.requests.get(resource))
    if value is None:
        return 0
    try:
        count = float(value)
    except ValueError as error:
        raise ValueError(f"{resource} must be a whole number of accelerators, got {value!r}") from error
    if count < 0 or not count.is_integer():
        raise ValueError(f"{resource} must be a whole number of accelerators, got {value!r}")
    return int(count)


def accelerators_cel(pool: str) -> str:
    """CEL for accelerators_per_replica of `self.<pool>` (quantities are int-or-string: int() takes both)."""
    res, key = f"self.{pool}.resources", "self.autoscaling.budget.accelerator"
    return (
        f"(has({res}.limits) && {key} in {res}.limits ? int({res}.limits[{key}]) : "
        f"(has({res}.requests) && {key} in {res}.requests ? int({res}.requests[{key}]) : 0))"
    )


BUDGET_CEL = "!has(self.autoscaling.budget) || "


class AutoscalingSpec(ApiModel):
    """Latency-driven scaling of the prefill and decode pools."""

    model_config = validations(
        cel(
            "self.windowSeconds >= self.intervalSeconds",
            "autoscaling.windowSeconds must be >= intervalSeconds",
        )
    )

    enabled: bool = True
    interval_seconds: int = Field(15, ge=1, description="How often each pool is evaluated.")
    window_seconds: int = Field(60, ge=10, description="Range of the Prometheus rate() queries.")
    tolerance: float = Field(
        0.1, ge=0, lt=1, description="No scaling while latency is within target*(1±tolerance)."
    )
    predictive: bool = Field(
        True, description="Also size pools from request/token rates and measured per-replica capacity."
    )
    scale_up: ScaleUpRules = Field(default_factory=ScaleUpRules)
    scale_down: ScaleDownRules = Field(default_factory=ScaleDownRules)
    budget: AutoscalingBudget | None = Field(
        None, description="One budget for both pools together, split by what each SLO needs."
    )

    @model_validator(mode="after")
    def _window_covers_interval(self) -> AutoscalingSpec:
        if self.window_seconds < self.interval_seconds:
            raise ValueError(
                f"autoscaling.windowSeconds ({self.window_seconds}) must be >= "
                f"intervalSeconds ({self.interval_seconds})"
            )
        return self
