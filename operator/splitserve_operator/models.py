"""The InferencePool API: pydantic models that are the single source of truth for the CRD.

Field names are snake_case in Python and camelCase on the wire (Kubernetes convention);
`crd.py` turns these models into the CustomResourceDefinition under crds/.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from splitserve.contract.names import DEFAULT_DRAIN_SECONDS

API_GROUP = "splitserve.io"
API_VERSION = "v1alpha1"
KIND = "InferencePool"
PLURAL = "inferencepools"

# The apiserver's own grammar for resource quantities ("500m", "2", "16Gi", "1e3").
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY_PATTERN = rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"


def _quantity_str(value: object) -> object:
    """Quantities are int-or-string in Kubernetes: `nvidia.com/gpu: 1` is as valid as `"1"`."""
    if isinstance(value, bool):
        return value  # rejected by the str schema, as the apiserver would
    return str(value) if isinstance(value, int | float) else value


# A Kubernetes resource quantity such as "500m", 2, "16Gi" or "1e3" (int-or-string on the wire).
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_str),
    Field(
        pattern=QUANTITY_PATTERN,
        max_length=64,
        # pydantic leaves `pattern` out of the JSON schema behind a BeforeValidator; say it again.
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN},
    ),
]
# Free-form Kubernetes core objects (tolerations, affinity, env) that we pass through unchanged.
KubeObject = dict[str, Any]


def cel(rule: str, message: str) -> JsonDict:
    """One `x-kubernetes-validations` entry: the CRD's copy of a cross-field pydantic validator."""
    return {"rule": rule, "message": message}


def validations(*rules: JsonDict) -> ConfigDict:
    """Model config carrying CEL rules; crd.py copies them into the CRD schema of that object."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class ApiModel(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


class SecretKeyRef(ApiModel):
    """A key of a Secret in the pool's namespace."""

    name: str = Field(min_length=1, description="Name of a Secret in the pool's namespace.")
    key: str = Field("token", min_length=1, description="Key within the Secret.")


class ModelCache(ApiModel):
    """The pool's Hugging Face cache on a PersistentVolumeClaim: the first pod downloads the weights,
    every later one (scale-ups, restarts, rollouts) loads them from the claim instead of the hub."""

    enabled: bool = Field(True, description="false: a per-pod emptyDir, downloaded again by every pod.")
    claim_name: str | None = Field(
        None,
        min_length=1,
        description="An existing claim to use (shared by pools, kept after them); by default the "
        "operator creates `<pool>-model-cache`, deleted with the pool.",
    )
    size: Quantity = Field("100Gi", description="Size of the claim the operator creates: the weights fit.")
    storage_class_name: str | None = Field(
        None, description="StorageClass of the created claim; default: the cluster's default class."
    )
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = Field(
        "ReadWriteMany",
        description="ReadWriteMany lets pods on every node share it (NFS, CephFS, EFS, Filestore...); "
        "ReadWriteOnce only suits pools whose pods share one node.",
    )


class HubSource(ApiModel):
    """Download weights from the Hugging Face hub, once, into the pool's model cache."""

    cache: ModelCache = Field(default_factory=ModelCache, description="Where downloads are kept.")
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a hub token (HF_TOKEN), for gated or private models."
    )
    endpoint: str | None = Field(None, description="Hub endpoint (HF_ENDPOINT), e.g. a mirror.")


class PvcSource(ApiModel):
    """Weights already on a PersistentVolumeClaim, mounted read-only at `mountPath`."""

    claim_name: str = Field(min_length=1, description="Name of the PersistentVolumeClaim.")
    mount_path: str = Field("/models", pattern=r"^/", description="Where the claim is mounted.")
    sub_path: str | None = Field(None, description="Sub-path of the volume to mount.")


class HostPathSource(ApiModel):
    """A node directory used as the Hugging Face cache (HF_HOME), e.g. pre-seeded by a DaemonSet."""

    path: str = Field(pattern=r"^/", description="Directory on the node.")
    mount_path: str = Field(
        "/cache/huggingface", pattern=r"^/", description="Where it is mounted; HF_HOME points here."
    )


class ModelSource(ApiModel):
    """Where weights come from: at most one of hub, pvc, hostPath (hub, with its cache, when none is
    set). hostPath is refused by namespaces enforcing the restricted Pod Security Standard."""

    model_config = validations(
        cel(
            "(has(self.hub) ? 1 : 0) + (has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) <= 1",
            "set only one model source: hub, pvc or hostPath",
        )
    )

    hub: HubSource | None = None
    pvc: PvcSource | None = None
    host_path: HostPathSource | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> ModelSource:
        chosen = [name for name in ("hub", "pvc", "host_path") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set only one model source, got {', '.join(chosen)}")
        return self


class ModelSpec(ApiModel):
    """The model every worker of the pool serves."""

    name: str = Field(
        min_length=1,
        description="Hugging Face model id (org/name) or a path inside the container "
        "(e.g. under a PVC's mountPath).",
    )
    served_name: str | None = Field(
        None, description="Model name clients send in requests; defaults to `name`."
    )
    revision: str | None = Field(None, description="Hub revision: branch, tag or commit.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and KV cache dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context window in tokens; defaults to the model's own."
    )
    source: ModelSource = Field(default_factory=ModelSource, description="Where weights come from.")


class ReplicaBounds(ApiModel):
    """Replica limits of one pool; the autoscaler moves between min and max."""

    model_config = validations(
        cel("self.min <= self.max", "replicas.min must be <= replicas.max"),
        cel(
            "!has(self.initial) || (self.min <= self.initial && self.initial <= self.max)",
            "replicas.initial must lie within min..max",
        ),
    )

    min: int = Field(1, ge=1, description="Fewest replicas; the autoscaler never goes below.")
    max: int = Field(4, ge=1, description="Most replicas; the autoscaler never goes above.")
    initial: int | None = Field(
        None,
        ge=1,
        description="Replicas at creation, and always when autoscaling is disabled; defaults to min.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaBounds:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must be <= replicas.max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(
                f"replicas.initial ({self.initial}) must lie within min..max ({self.min}..{self.max})"
            )
        return self

    @property
    def start(self) -> int:
        return self.initial if self.initial is not None else self.min


class ResourceRequirements(ApiModel):
    """Core v1 ResourceRequirements of the worker container."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="GPUs as `nvidia.com/gpu: 1`, or any extended resource.",
    )


class DisruptionBudget(ApiModel):
    """The PodDisruptionBudget of one role, so a node drain (a voluntary eviction) cannot take the
    whole pool at once. A pool of one replica can still be evicted: a budget that forbade it would
    block the node drain forever; run two or more where a drain must not interrupt service."""

    enabled: bool = Field(True, description="Render a PodDisruptionBudget for this role.")
    max_unavailable: int = Field(1, ge=1, description="Most pods of this role evicted at one time.")


class Scheduling(ApiModel):
    """Pod placement and environment, shared by every workload kind."""

    disruption_budget: DisruptionBudget = Field(default_factory=DisruptionBudget)
    drain_seconds: int = Field(
        DEFAULT_DRAIN_SECONDS,
        ge=0,
        description="On SIGTERM (scale-down, rollout, node drain) pods stop taking work and let open "
        "streams finish this long, then fail the rest with an error; the grace period adds 15 s.",
    )

    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[KubeObject] = Field(default_factory=list, description="Core v1 Tolerations.")
    affinity: KubeObject | None = Field(None, description="Core v1 Affinity.")
    priority_class_name: str | None = None
    env: list[KubeObject] = Field(default_factory=list, description="Core v1 EnvVars, added last.")


class WorkerPoolSpec(Scheduling):
    """A pool of workers of one role."""

    replicas: ReplicaBounds = Field(default_factory=ReplicaBounds)
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; defaults to the CPU request, else torch's own."
    )
    args: list[str] = Field(default_factory=list, description="Extra `splitserve worker` flags.")


class TtftSlo(ApiModel):
    """Prefill target: time to first token at a percentile."""

    ttft_seconds: float = Field(1.0, gt=0, description="Time to first token the pool must meet.")
    percentile: float = Field(0.9, gt=0, lt=1, description="Quantile the target applies to.")


class ItlSlo(ApiModel):
    """Decode target: inter-token latency at a percentile."""

    itl_seconds: float = Field(0.05, gt=0, description="Inter-token latency the pool must meet.")
    percentile: float = Field(0.9, gt=0, lt=1, description="Quantile the target applies to.")


class PrefillPoolSpec(WorkerPoolSpec):
    """Prefill workers: run whole prompts, scaled on TTFT."""

    slo: TtftSlo = Field(default_factory=TtftSlo)
    chunk_size: int = Field(
        512, ge=16, description="Prompt tokens per forward pass; bounds activation memory."
    )


class DecodePoolSpec(WorkerPoolSpec):
    """Decode workers: emit tokens from the KV cache, scaled on ITL."""

    slo: ItlSlo = Field(default_factory=ItlSlo)
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one decode batch.")
    kv_cache_bytes: Quantity | None = Field(
        None,
        description="KV cache budget per replica, e.g. `40Gi`; defaults to 90% of free GPU "
        "memory after weights, or 2Gi on CPU.",
    )


class ServiceSpec(ApiModel):
    """How the router is exposed."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(8000, ge=1, le=65535)


class RouterSpec(Scheduling):
    """The OpenAI-compatible router in front of the pools."""

    replicas: int = Field(1, ge=1, description="Router replicas (stateless).")
    service: ServiceSpec = Field(default_factory=ServiceSpec)


class KvTransferSpec(ApiModel):
    """How KV caches travel from prefill to decode workers."""

    transport: Literal["tcp"] = Field("tcp", description="How KV caches travel prefill -> decode.")
    port: int = Field(8001, ge=1, le=65535, description="Port decode workers receive KV caches on.")
    timeout_seconds: float = Field(
        60.0, gt=0, description="How long a decode worker waits for a request's KV cache."
    )
    max_transfer_bytes: Quantity = Field("8Gi", description="Largest KV cache accepted for one request.")


class KvHostTier(ApiModel):
    """Evicted prefix-cache blocks kept in each worker's host memory (pinned on GPUs)."""

    size: Quantity = Field(description="Host memory per worker for evicted KV blocks, e.g. `16Gi`.")
    ttl_seconds: float | None = Field(
        None, gt=0, description="How long a block is kept after its last use; unset: until room is needed."
    )


class KvDiskTier(ApiModel):
    """Blocks the host tier lets go of, as checked files on a volume: node-local NVMe (hostPath or a
    local PV), an emptyDir, or a ReadWriteMany claim the pool's workers share."""

    model_config = validations(cel("size(self.volume) == 1", "kvCache.disk.volume takes exactly one source"))

    volume: KubeObject = Field(
        description="A core v1 volume source, e.g. `{emptyDir: {}}` or `{persistentVolumeClaim: {claimName: "
        "kv}}`; mounted in every prefill and decode pod."
    )
    mount_path: str = Field("/var/cache/splitserve/kv", pattern=r"^/", description="Where it is mounted.")
    size: Quantity = Field("10Gi", description="Budget of block files per worker.")
    ttl_seconds: float | None = Field(
        None,
        gt=0,
        description="How long a block file is kept after its last use; unset: until room is needed.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> KvDiskTier:
        if len(self.volume) != 1:
            raise ValueError(f"kvCache.disk.volume takes exactly one source, got {sorted(self.volume)}")
        return self


class KvCacheSpec(ApiModel):
    """The workers' KV cache: block size, prefix caching, and its retention tiers below the device."""

    model_config = validations(
        cel(
            "self.prefixCaching || (!has(self.host) && !has(self.disk))",
            "kvCache.host and kvCache.disk keep prefix-cache blocks: they need prefixCaching",
        )
    )

    block_size: int = Field(16, ge=1, le=4096, description="Tokens per KV block (the unit of reuse).")
    prefix_caching: bool = Field(
        True, description="Keep full KV blocks after their request and reuse them for equal prompt prefixes."
    )
    host: KvHostTier | None = Field(None, description="Host-memory tier; off unless sized.")
    disk: KvDiskTier | None = Field(
        None, description="Disk tier behind the host tier; off unless a volume is given."
    )

    @model_validator(mode="after")
    def _tiers_need_prefix_caching(self) -> KvCacheSpec:
        if not self.prefix_caching and (self.host is not None or self.disk is not None):
            raise ValueError(
                "kvCache.host and kvCache.disk keep prefix-cache blocks: they need prefixCaching"
            )
        return self


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


def _accelerators_cel(pool: str) -> str:
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


class LocalObjectReference(ApiModel):
    """A Secret in the pool's namespace, by name."""

    name: str = Field(min_length=1, description="Name of a Secret in the pool's namespace.")


class InferencePoolSpec(ApiModel):
    """Desired state of an InferencePool."""

    model_config = validations(
        cel(
            BUDGET_CEL + "!has(self.autoscaling.budget.maxAcceleratorsTotal) || "
            "self.autoscaling.budget.maxAcceleratorsTotal >= "
            f"self.prefill.replicas.min * {_accelerators_cel('prefill')} + "
            f"self.decode.replicas.min * {_accelerators_cel('decode')}",
            "autoscaling.budget.maxAcceleratorsTotal must cover both pools' replicas.min",
        ),
        cel(
            BUDGET_CEL + "!has(self.autoscaling.budget.maxReplicasTotal) || "
            "self.autoscaling.budget.maxReplicasTotal >= "
            "self.prefill.replicas.min + self.decode.replicas.min",
            "autoscaling.budget.maxReplicasTotal must cover both pools' replicas.min",
        ),
    )

    model: ModelSpec
    image: str | None = Field(None, description="Worker image; defaults to the operator's setting.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Registry credentials (docker-registry Secrets) of every pod."
    )
    pod_security_context: KubeObject | None = Field(
        None,
        description="Core v1 PodSecurityContext fields merged over the restricted defaults "
        "(runAsNonRoot, runAsUser/runAsGroup/fsGroup 10001, fsGroupChangePolicy OnRootMismatch, "
        "seccompProfile RuntimeDefault).",
    )
    prefill: PrefillPoolSpec = Field(default_factory=PrefillPoolSpec)
    decode: DecodePoolSpec = Field(default_factory=DecodePoolSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    kv_transfer: KvTransferSpec = Field(default_factory=KvTransferSpec)
    kv_cache: KvCacheSpec = Field(default_factory=KvCacheSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)

    @model_validator(mode="after")
    def _budget_covers_minimums(self) -> InferencePoolSpec:
        budget = self.autoscaling.budget
        if budget is None:
            return self
        pools = (self.prefill, self.decode)
        if budget.max_accelerators_total is not None:
            need = sum(p.replicas.min * accelerators_per_replica(p, budget.accelerator) for p in pools)
            if budget.max_accelerators_total < need:
                raise ValueError(
                    f"autoscaling.budget.maxAcceleratorsTotal ({budget.max_accelerators_total}) must cover "
                    f"both pools' replicas.min ({need} {budget.accelerator})"
                )
        if budget.max_replicas_total is not None and budget.max_replicas_total < sum(
            p.replicas.min for p in pools
        ):
            raise ValueError(
                f"autoscaling.budget.maxReplicasTotal ({budget.max_replicas_total}) must cover both pools' "
                f"replicas.min ({sum(p.replicas.min for p in pools)})"
            )
        return self


# ---- status -----------------------------------------------------------------------------------

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
