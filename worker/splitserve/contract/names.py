"""Names both planes rely on: roles, label keys, the worker image's ports and paths, metric names.

The data plane exports these metrics and the control plane queries them; the operator labels pods with
these keys and runs the worker image with these ports. Written once here, so neither side can drift.
Imports nothing of the project and nothing heavy: the operator image has no torch.
"""

from __future__ import annotations

from typing import Final, Literal

# ---- roles ------------------------------------------------------------------------------------

# What one worker process runs (`splitserve worker --role`); `both` is the colocated baseline.
EngineRole = Literal["prefill", "decode", "both"]
ENGINE_ROLES: Final[tuple[EngineRole, ...]] = ("prefill", "decode", "both")
# The two pools an InferencePool scales, each on its own latency signal.
WorkerRole = Literal["prefill", "decode"]
WORKER_ROLES: Final[tuple[WorkerRole, WorkerRole]] = ("prefill", "decode")
# The Deployments of one InferencePool.
ComponentRole = Literal["prefill", "decode", "router"]
COMPONENT_ROLES: Final[tuple[ComponentRole, ComponentRole, ComponentRole]] = ("prefill", "decode", "router")

# ---- Kubernetes labels on every child and every worker pod ---------------------------------------

GROUP: Final = "splitserve.io"
POOL_LABEL: Final = f"{GROUP}/pool"
ROLE_LABEL: Final = f"{GROUP}/role"

# ---- the worker image ----------------------------------------------------------------------------

HTTP_PORT: Final = 8000
ENGINE_CONFIG_DIR: Final = "/etc/splitserve"  # where the operator mounts the engine ConfigMap
ENGINE_CONFIG_KEY: Final = "engine.json"
# SIGTERM drain (`--drain-seconds`, the pools' `drainSeconds`): a long answer, 4k tokens at 50 ms, with
# room; the pod's terminationGracePeriodSeconds adds the margin to flush errors and stop the engine.
DEFAULT_DRAIN_SECONDS: Final = 300
DRAIN_EXIT_MARGIN_SECONDS: Final = 15

# ---- metrics (every series carries the labels `pool` and `role`) ---------------------------------

METRIC_LABELS: Final = ("pool", "role")
# What clients see: exported by the router and by `both` workers.
TTFT: Final = "splitserve_time_to_first_token_seconds"
ITL: Final = "splitserve_inter_token_latency_seconds"
E2E_LATENCY: Final = "splitserve_e2e_request_latency_seconds"
PROMPT_TOKENS: Final = "splitserve_prompt_tokens_total"
GENERATION_TOKENS: Final = "splitserve_generation_tokens_total"
REQUESTS: Final = "splitserve_requests_total"  # label `outcome`, one of OUTCOMES
# What a worker's stage costs: exported by prefill, decode and both workers.
KV_TRANSFER_SECONDS: Final = "splitserve_kv_transfer_seconds"
KV_TRANSFER_BYTES: Final = "splitserve_kv_transfer_bytes_total"
REQUESTS_RUNNING: Final = "splitserve_requests_running"
REQUESTS_WAITING: Final = "splitserve_requests_waiting"
KV_CACHE_USAGE: Final = "splitserve_kv_cache_usage_ratio"
KV_CACHE_CAPACITY_TOKENS: Final = "splitserve_kv_cache_capacity_tokens"
KV_CACHE_BLOCKS: Final = "splitserve_kv_cache_blocks"  # label `state`: free | used
PREEMPTIONS: Final = "splitserve_preemptions_total"
# Prefix cache, in tokens as vLLM counts them: tokens looked up at admission, and those found cached,
# by the tier they came from (label `tier`); hits / queries is the hit ratio.
PREFIX_CACHE_QUERIES: Final = "splitserve_prefix_cache_queries_total"
PREFIX_CACHE_HITS: Final = "splitserve_prefix_cache_hits_total"
PREFIX_CACHE_TIER_LABEL: Final = "tier"
PrefixCacheTier = Literal["device", "host", "disk"]
PREFIX_CACHE_TIERS: Final[tuple[PrefixCacheTier, ...]] = ("device", "host", "disk")
KV_TIER_USAGE_BYTES: Final = "splitserve_kv_tier_usage_bytes"  # label `tier`: host | disk
# KV bytes moved between the device and the tiers below it: label `tier` (host | disk) and `direction`.
KV_OFFLOAD_BYTES: Final = "splitserve_kv_offload_bytes_total"
OffloadDirection = Literal["store", "load"]  # store: into the tier; load: from it back to the device
OFFLOAD_DIRECTIONS: Final[tuple[OffloadDirection, ...]] = ("store", "load")
KV_DISK_ERRORS: Final = "splitserve_kv_disk_errors_total"  # label `reason`, one of KV_DISK_ERROR_REASONS
KV_DISK_ERROR_REASONS: Final = ("truncated", "corrupt", "foreign", "io_error", "write_error")
# The pool shares its KV (router and decode workers): where each request's prompt was prefilled (label
# `placement`: remote = a prefill worker, local = the decode worker itself), exported by the router;
# prompt blocks a decode worker already held at registration vs received over the wire (label `source`),
# exported by decode workers; failed KV transfers by the sender's error code (label `reason`, one of
# KV_TRANSFER_FAILURE_REASONS), exported by prefill workers; streams resumed on another decode worker
# after theirs died (label `outcome`: resumed | exhausted = migrationLimit reached), by the router.
PREFILLS: Final = "splitserve_prefills_total"
PrefillPlacement = Literal["remote", "local"]
PREFILL_PLACEMENTS: Final[tuple[PrefillPlacement, ...]] = ("remote", "local")
KV_HANDOFF_BLOCKS: Final = "splitserve_kv_handoff_blocks_total"
KvHandoffSource = Literal["cached", "transferred"]
KV_HANDOFF_SOURCES: Final[tuple[KvHandoffSource, ...]] = ("cached", "transferred")
KV_TRANSFER_FAILURES: Final = "splitserve_kv_transfer_failures_total"
# The transfer's ErrorCode names, lower case (transfer/frames.py): unavailable = no connection or it broke.
KV_TRANSFER_FAILURE_REASONS: Final = (
    "protocol",
    "checksum",
    "limit",
    "rejected",
    "timeout",
    "internal",
    "shutdown",
    "unavailable",
)
MIGRATIONS: Final = "splitserve_migrations_total"
MigrationOutcome = Literal["resumed", "exhausted"]
MIGRATION_OUTCOMES: Final[tuple[MigrationOutcome, ...]] = ("resumed", "exhausted")
# Seconds from process start to serving (weights loaded): the autoscaler's first start-up estimate.
STARTUP_SECONDS: Final = "splitserve_startup_seconds"

# What the autoscaler decided, exported by the operator (and by `splitserve up`'s autoscaler), per pool
# and worker role, with the pool's namespace as `pool_namespace` (a scrape adds the exporter's own
# `namespace`): replicas it wants, replicas it counted serving (exporting metrics), and the Unix time
# of its last change of replicas, an info-style series whose `reason` label says why (one per role).
AUTOSCALER_LABELS: Final = ("pool_namespace", "pool", "role")
AUTOSCALER_DESIRED_REPLICAS: Final = "splitserve_autoscaler_desired_replicas"
AUTOSCALER_READY_REPLICAS: Final = "splitserve_autoscaler_ready_replicas"
AUTOSCALER_LAST_SCALE: Final = "splitserve_autoscaler_last_scale_timestamp_seconds"  # + label `reason`


def step_seconds(stage: WorkerRole) -> str:
    """Histogram of one forward of `stage` (prefill chunk, or the decode batch)."""
    return f"splitserve_{stage}_step_seconds"


def stage_tokens(stage: WorkerRole) -> str:
    """Tokens computed by `stage`: prompt tokens for prefill, sampled tokens for decode."""
    return f"splitserve_{stage}_tokens_total"


# Which roles export each series: a role exports only what it measures, so a query without a `role`
# filter is not diluted by zeros (a router's KV usage, a decode worker's TTFT). Unlisted: every role.
_CLIENT: Final = frozenset({"router", "both"})
_ENGINE: Final = frozenset({"prefill", "decode", "both"})
_TRANSFER: Final = frozenset({"prefill", "decode"})
SERIES_ROLES: Final[dict[str, frozenset[str]]] = {
    **dict.fromkeys((TTFT, ITL, E2E_LATENCY, PROMPT_TOKENS, GENERATION_TOKENS, REQUESTS), _CLIENT),
    **dict.fromkeys((KV_TRANSFER_SECONDS, KV_TRANSFER_BYTES), _TRANSFER),
    **dict.fromkeys((PREFILLS, MIGRATIONS), frozenset({"router"})),
    KV_HANDOFF_BLOCKS: frozenset({"decode"}),
    KV_TRANSFER_FAILURES: frozenset({"prefill"}),
    **dict.fromkeys(
        (
            REQUESTS_RUNNING,
            REQUESTS_WAITING,
            KV_CACHE_USAGE,
            KV_CACHE_CAPACITY_TOKENS,
            KV_CACHE_BLOCKS,
            PREEMPTIONS,
            PREFIX_CACHE_QUERIES,
            PREFIX_CACHE_HITS,
            KV_TIER_USAGE_BYTES,
            KV_OFFLOAD_BYTES,
            KV_DISK_ERRORS,
            STARTUP_SECONDS,
        ),
        _ENGINE,
    ),
    **{
        name: frozenset({stage, "both"})
        for stage in WORKER_ROLES
        for name in (step_seconds(stage), stage_tokens(stage))
    },
}


def exported_by(metric: str, role: str) -> bool:
    """Whether a process of `role` (router, prefill, decode, both) exports `metric`."""
    roles = SERIES_ROLES.get(metric)
    return roles is None or role in roles


OUTCOME_SUCCESS: Final = "success"
OUTCOME_CLIENT_ERROR: Final = "client_error"  # 4xx: bad input
OUTCOME_SERVER_ERROR: Final = "server_error"  # a worker failed the request
OUTCOME_CANCELLED: Final = "cancelled"  # the client went away
OUTCOMES: Final = (OUTCOME_SUCCESS, OUTCOME_CLIENT_ERROR, OUTCOME_SERVER_ERROR, OUTCOME_CANCELLED)

# ---- vLLM-compatible series ---------------------------------------------------------------------
# The names, types, labels and buckets of vLLM's PrometheusStatLogger (vllm/v1/metrics/loggers.py,
# v0.11+: `vllm:inter_token_latency_seconds` replaced `vllm:time_per_output_token_seconds`), which
# KEDA recipes, endpoint pickers (llm-d, AIBrix) and vLLM dashboards read. Every vLLM series has the
# labels `model_name` (the served model name) and `engine` (the engine index: "0", one per process).
VLLM_LABELS: Final = ("model_name", "engine")
VLLM_TTFT: Final = "vllm:time_to_first_token_seconds"  # histogram
VLLM_ITL: Final = "vllm:inter_token_latency_seconds"  # histogram, one sample per token gap
VLLM_TPOT: Final = "vllm:request_time_per_output_token_seconds"  # histogram, one sample per request
VLLM_E2E: Final = "vllm:e2e_request_latency_seconds"  # histogram
VLLM_RUNNING: Final = "vllm:num_requests_running"  # gauge
VLLM_WAITING: Final = "vllm:num_requests_waiting"  # gauge
VLLM_KV_USAGE: Final = "vllm:kv_cache_usage_perc"  # gauge, a fraction: 1 means 100 percent
VLLM_PROMPT_TOKENS: Final = "vllm:prompt_tokens"  # counter, exposed as vllm:prompt_tokens_total
VLLM_GENERATION_TOKENS: Final = "vllm:generation_tokens"  # counter, ..._total
VLLM_PREFIX_CACHE_QUERIES: Final = "vllm:prefix_cache_queries"  # counter, ..._total, in tokens
VLLM_PREFIX_CACHE_HITS: Final = "vllm:prefix_cache_hits"  # counter, ..._total: the device cache's hits
VLLM_REQUEST_SUCCESS: Final = "vllm:request_success"  # counter, ..._total, label `finished_reason`
VLLM_FINISHED_REASON_LABEL: Final = "finished_reason"
VLLM_FINISHED_REASONS: Final = ("stop", "length", "abort")  # str(vllm.v1.engine.FinishReason)
# The client-facing series come from the router (and `both`); the scheduler's from the engines.
FRONTEND_ROLES: Final = ("router", "both")
# fmt: off
VLLM_TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0,
)
VLLM_ITL_BUCKETS: Final = (  # also vLLM's request_time_per_output_token buckets
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
)
VLLM_E2E_BUCKETS: Final = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)
# fmt: on


def _with(own: tuple[float, ...], vllm: tuple[float, ...]) -> tuple[float, ...]:
    """Our edges plus vLLM's: the vLLM histogram is then ours read at vLLM's edges, exactly."""
    return tuple(sorted(set(own) | set(vllm)))


# Bucket edges resolve a 50 ms TTFT and a 5 ms ITL: histogram_quantile interpolates within a bucket, so
# the edges sit at and around the targets (decode ITL targets live at 5-10 ms); vLLM's are added.
# fmt: off
TTFT_BUCKETS: Final = _with((
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 60.0,
), VLLM_TTFT_BUCKETS)
ITL_BUCKETS: Final = _with((
    0.001, 0.0025, 0.005, 0.006, 0.007, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
), VLLM_ITL_BUCKETS)
E2E_BUCKETS: Final = _with(
    (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0), VLLM_E2E_BUCKETS
)
STEP_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
)
TRANSFER_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# fmt: on
