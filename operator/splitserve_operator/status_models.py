"""The InferencePool's status: conditions, per-pool figures, the budget, the router's endpoint."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from splitserve_operator.api_base import ApiModel

ConditionType = Literal["Ready", "Progressing", "Degraded", "MetricsAvailable"]


class StatusModel(ApiModel):
    """Status is written by several parties (reconciler, autoscaler, kopf): read it leniently."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    """A standard Kubernetes condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = Field(None, description="RFC 3339 time the status flipped.")
    observed_generation: int | None = None


class PoolStatus(StatusModel):
    """Observed state of one worker pool, and the autoscaler's last decision."""

    replicas: int = 0
    ready_replicas: int = 0
    desired_replicas: int = 0
    ready: str = Field("0/0", description="ready/desired, for printer columns.")
    # The autoscaler's last decision, explained.
    observed_latency_seconds: float | None = Field(
        None, description="TTFT (prefill) or ITL (decode) at the SLO percentile."
    )
    target_latency_seconds: float | None = None
    predicted_replicas: int | None = Field(None, description="Replicas the predictive planner asks for.")
    predicted_load: float | None = Field(
        None, description="Load the planner sized for: prompt tokens/s (prefill), streams (decode)."
    )
    reason: str | None = Field(None, description="Why desiredReplicas is what it is.")
    last_scale_time: str | None = None
    startup_seconds: float | None = Field(
        None,
        description="Start-up time the planner sizes for: the workers' own measurement (process start "
        "to serving) until a scale-up was timed from decision to ready, then that.",
    )


class BudgetStatus(StatusModel):
    """The shared budget as the autoscaler last applied it (absent without spec.autoscaling.budget)."""

    max_accelerators_total: int | None = None
    max_replicas_total: int | None = None
    accelerators: int = Field(0, description="Accelerators both pools' desired replicas hold.")
    replicas: int = Field(0, description="Desired replicas of both pools together.")
    binding: bool = Field(False, description="Whether the budget capped a pool below what it asked for.")
    capped: list[str] = Field(default_factory=list, description="Pools the budget capped.")
    reason: str | None = Field(None, description="How the budget was split, and why.")


class RouterStatus(StatusModel):
    """Observed state of the router."""

    replicas: int = 0
    ready_replicas: int = 0


class InferencePoolStatus(StatusModel):
    """Observed state of an InferencePool."""

    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    prefill: PoolStatus = Field(default_factory=PoolStatus)
    decode: PoolStatus = Field(default_factory=PoolStatus)
    router: RouterStatus = Field(default_factory=RouterStatus)
    budget: BudgetStatus | None = None
    endpoint: str | None = Field(None, description="URL of the router's OpenAI-compatible API.")
    # Proof that the pool shares its KV (kv_status.py), over the autoscaling window.
    remote_prefill_ratio: float | None = Field(
        None,
        description="Prompts prefilled on prefill workers / all prompts; the rest ran on decode workers.",
    )
    prefix_hit_ratio: float | None = Field(
        None, description="Prompt tokens found in the workers' prefix caches / prompt tokens looked up."
    )
    kv_transfer_failures: dict[str, int] = Field(
        default_factory=dict, description="Failed KV transfers prefill -> decode, by reason."
    )
