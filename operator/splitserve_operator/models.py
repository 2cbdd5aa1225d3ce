"""The InferencePool API: pydantic models that are the single source of truth for the CRD.

Field names are snake_case in Python and camelCase on the wire (Kubernetes convention);
`crd.py` turns these models into the CustomResourceDefinition under crds/. This module holds the spec's
root, the model and the pools; the KV cache (`kv_spec.py`), autoscaling (`autoscaling_spec.py`) and
status (`status_models.py`) live beside it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from splitserve.contract.names import DEFAULT_DRAIN_SECONDS
from splitserve_operator.api_base import ApiModel, KubeObject, Quantity, cel, validations
from splitserve_operator.autoscaling_spec import (
    BUDGET_CEL,
    AutoscalingSpec,
    accelerators_cel,
    accelerators_per_replica,
)
from splitserve_operator.kv_spec import KvCacheSpec
from splitserve_operator.routing_spec import RoutingSpec


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


# Decode workers hold every stream (and prefill prompts when the prefill pool stands at zero).
DECODE_FLOOR = "decode.replicas.min must be >= 1: decode workers serve every stream"


class ReplicaBounds(ApiModel):
    """Replica limits of one pool; the autoscaler moves between min and max."""

    model_config = validations(
        cel("self.min <= self.max", "replicas.min must be <= replicas.max"),
        cel(
            "!has(self.initial) || (self.min <= self.initial && self.initial <= self.max)",
            "replicas.initial must lie within min..max",
        ),
    )

    min: int = Field(
        1,
        ge=0,
        description="Fewest replicas; the autoscaler never goes below. Prefill may be 0: decode workers "
        "then prefill every prompt themselves and the pool keeps serving; decode needs at least 1.",
    )
    max: int = Field(4, ge=1, description="Most replicas; the autoscaler never goes above.")
    initial: int | None = Field(
        None,
        ge=0,
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

    model_config = validations(cel("self.replicas.min >= 1", DECODE_FLOOR))

    slo: ItlSlo = Field(default_factory=ItlSlo)
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one decode batch.")
    kv_cache_bytes: Quantity | None = Field(
        None,
        description="KV cache budget per replica, e.g. `40Gi`; defaults to 90% of free GPU "
        "memory after weights, or 2Gi on CPU.",
    )

    @model_validator(mode="after")
    def _serves(self) -> DecodePoolSpec:
        if self.replicas.min < 1:
            raise ValueError(DECODE_FLOOR)
        return self


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


class LocalObjectReference(ApiModel):
    """A Secret in the pool's namespace, by name."""

    name: str = Field(min_length=1, description="Name of a Secret in the pool's namespace.")


class InferencePoolSpec(ApiModel):
    """Desired state of an InferencePool."""

    model_config = validations(
        cel(
            BUDGET_CEL + "!has(self.autoscaling.budget.maxAcceleratorsTotal) || "
            "self.autoscaling.budget.maxAcceleratorsTotal >= "
            f"self.prefill.replicas.min * {accelerators_cel('prefill')} + "
            f"self.decode.replicas.min * {accelerators_cel('decode')}",
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
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
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
