"""Prometheus metrics of every role; names and buckets come from the contract the autoscaler queries.

Every series carries `pool` (the InferencePool's name) and `role` (router, prefill, decode, both).
The router (and `both`, which is its own frontend) records what clients see; workers record their stage.
Each process exports only its role's series (`names.exported_by`); the others are still recorded, into
a registry nobody scrapes, so code paths shared between roles need no role checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from splitserve.contract import names
from splitserve.contract.names import (
    E2E_BUCKETS,
    ITL_BUCKETS,
    METRIC_LABELS,
    OUTCOMES,
    STEP_BUCKETS,
    TRANSFER_BUCKETS,
    TTFT_BUCKETS,
    MigrationOutcome,
    OffloadDirection,
    PrefillPlacement,
    PrefixCacheTier,
)
from splitserve.serving.vllm_metrics import VllmSeries


@dataclass
class Metrics:
    """All splitserve series of one process, in a registry of its own (tests run several per process)."""

    pool: str
    role: str
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    unexported: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    model_name: str = ""  # the served model name, vLLM's `model_name` label; defaults to the pool
    vllm: VllmSeries = field(init=False)

    def __post_init__(self) -> None:
        labels = METRIC_LABELS
        values = {"pool": self.pool, "role": self.role}

        def reg(name: str) -> CollectorRegistry:
            return self.registry if names.exported_by(name, self.role) else self.unexported

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg(name)).labels(**values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg(name)).labels(**values)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg(name)).labels(**values)

        def counter_by(name: str, doc: str, label: str, choices: Iterable[str]) -> Counter:
            """A counter with one more label, each of whose values is exported from the start (at 0)."""
            series = Counter(name, doc, (*labels, label), registry=reg(name))
            for choice in choices:
                series.labels(**values, **{label: choice})
            return series

        # What clients see (router, both).
        self.ttft = histogram(
            names.TTFT,
            "Request arrival to first token sent, as the client sees it.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            names.ITL,
            "Gap between consecutive tokens of one stream.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(names.E2E_LATENCY, "Request arrival to last token.", E2E_BUCKETS)
        self.prompt_tokens = counter(names.PROMPT_TOKENS, "Prompt tokens of admitted requests.")
        self.generation_tokens = counter(names.GENERATION_TOKENS, "Tokens sent to clients.")
        self._requests = counter_by(names.REQUESTS, "Finished requests by outcome.", "outcome", OUTCOMES)
        # What a worker's stage costs (prefill, decode, both).
        self.kv_transfer_seconds = histogram(
            names.KV_TRANSFER_SECONDS,
            "Time to send (prefill) or receive (decode) one KV cache.",
            TRANSFER_BUCKETS,
        )
        self.kv_transfer_bytes = counter(names.KV_TRANSFER_BYTES, "KV cache bytes moved.")
        self.requests_running = gauge(names.REQUESTS_RUNNING, "Requests in the engine's batch.")
        self.requests_waiting = gauge(
            names.REQUESTS_WAITING, "Requests queued for the engine (KV budget or batch full)."
        )
        self.kv_cache_usage = gauge(names.KV_CACHE_USAGE, "KV blocks in use over all KV blocks, 0..1.")
        self.kv_cache_capacity_tokens = gauge(
            names.KV_CACHE_CAPACITY_TOKENS, "KV pool in tokens (blocks x block size)."
        )
        self._kv_cache_blocks = Gauge(
            names.KV_CACHE_BLOCKS,
            "KV blocks by state (free, used).",
            (*labels, "state"),
            registry=reg(names.KV_CACHE_BLOCKS),
        )
        self.record_kv_blocks(0, 0)  # both states exported from the start
        self.preemptions = counter(
            names.PREEMPTIONS, "Sequences whose KV blocks were freed to let others grow (recomputed later)."
        )
        self.prefix_cache_queries = counter(
            names.PREFIX_CACHE_QUERIES, "Tokens looked up in the prefix cache when a sequence is admitted."
        )
        self._prefix_cache_hits = Counter(
            names.PREFIX_CACHE_HITS,
            "Tokens found in the prefix cache at admission (not computed), by tier.",
            (*labels, names.PREFIX_CACHE_TIER_LABEL),
            registry=reg(names.PREFIX_CACHE_HITS),
        )
        for tier in names.PREFIX_CACHE_TIERS:
            self._prefix_cache_hits.labels(**values, tier=tier)
        self._kv_tier_usage = Gauge(
            names.KV_TIER_USAGE_BYTES,
            "Bytes of evicted prefix-cache blocks held by each retention tier.",
            (*labels, names.PREFIX_CACHE_TIER_LABEL),
            registry=reg(names.KV_TIER_USAGE_BYTES),
        )
        self.record_kv_tier_usage({"host": 0, "disk": 0})  # exported from the start, tiers or not
        self._kv_offload_bytes = Counter(
            names.KV_OFFLOAD_BYTES,
            "KV bytes stored into a retention tier (device evictions, host to disk) or loaded back.",
            (*labels, names.PREFIX_CACHE_TIER_LABEL, "direction"),
            registry=reg(names.KV_OFFLOAD_BYTES),
        )
        for tier in ("host", "disk"):
            for direction in names.OFFLOAD_DIRECTIONS:
                self._kv_offload_bytes.labels(**values, tier=tier, direction=direction)
        self._kv_disk_errors = counter_by(
            names.KV_DISK_ERRORS,
            "Disk-tier block files that could not be read back (a miss, recomputed) or written.",
            "reason",
            names.KV_DISK_ERROR_REASONS,
        )
        # The pool sharing its KV: where prompts were prefilled (router), prompt blocks reused or received
        # at a handoff (decode), failed sends by reason (prefill).
        self._prefills = counter_by(
            names.PREFILLS,
            "Prompts prefilled, by placement: remote (a prefill worker) or local (the decode worker).",
            "placement",
            names.PREFILL_PLACEMENTS,
        )
        self._kv_handoff_blocks = counter_by(
            names.KV_HANDOFF_BLOCKS,
            "Prompt KV blocks of handed-off requests: already cached here, or received from prefill.",
            "source",
            names.KV_HANDOFF_SOURCES,
        )
        self._kv_transfer_failures = counter_by(
            names.KV_TRANSFER_FAILURES,
            "KV cache sends that failed, by the transfer's error code.",
            "reason",
            names.KV_TRANSFER_FAILURE_REASONS,
        )
        self.prefill_step = histogram(
            names.step_seconds("prefill"), "Duration of one prefill forward (one chunk).", STEP_BUCKETS
        )
        self.decode_step = histogram(
            names.step_seconds("decode"),
            "Duration of one decode step over the whole batch.",
            STEP_BUCKETS,
        )
        self.prefill_tokens = counter(
            names.stage_tokens("prefill"),
            "Prompt tokens this worker computed (capacity = rate / busy time).",
        )
        self.decode_tokens = counter(
            names.stage_tokens("decode"), "Tokens produced by decode steps (batch size = rate / steps)."
        )
        self.startup_seconds = gauge(
            names.STARTUP_SECONDS, "Seconds from process start to serving: imports, weights loaded, warm."
        )
        self._migrations = counter_by(
            names.MIGRATIONS,
            "Streams whose decode worker died mid-stream, by outcome: resumed on another decode worker, or "
            "failed because the request had moved migrationLimit times already.",
            "outcome",
            names.MIGRATION_OUTCOMES,
        )
        self.vllm = VllmSeries(self, self.model_name or self.pool)

    def record_kv_blocks(self, free: int, used: int) -> None:
        """Blocks free and in use, and their ratio (the usage gauge the autoscaler may read)."""
        self._kv_cache_blocks.labels(pool=self.pool, role=self.role, state="free").set(free)
        self._kv_cache_blocks.labels(pool=self.pool, role=self.role, state="used").set(used)
        self.kv_cache_usage.set(used / (free + used) if free + used else 0.0)

    def record_prefix_cache(self, queried: int, hits: Mapping[PrefixCacheTier, int]) -> None:
        """One admission's lookup: `queried` tokens, and those found in each tier."""
        self.prefix_cache_queries.inc(queried)
        for tier, tokens in hits.items():
            self.prefix_cache_hits(tier).inc(tokens)

    def record_kv_tier_usage(self, used: Mapping[PrefixCacheTier, int]) -> None:
        for tier, nbytes in used.items():
            self._kv_tier_usage.labels(pool=self.pool, role=self.role, tier=tier).set(nbytes)

    def record_kv_offload(self, tier: PrefixCacheTier, direction: OffloadDirection, nbytes: int) -> None:
        labels = {"pool": self.pool, "role": self.role, "tier": tier, "direction": direction}
        self._kv_offload_bytes.labels(**labels).inc(nbytes)

    def record_kv_disk_error(self, reason: str) -> None:
        self._kv_disk_errors.labels(pool=self.pool, role=self.role, reason=reason).inc()

    def record_prefill(self, placement: PrefillPlacement) -> None:
        self._prefills.labels(pool=self.pool, role=self.role, placement=placement).inc()

    def record_kv_handoff(self, cached: int, transferred: int) -> None:
        """One handed-off prompt's blocks (this worker's block size): pinned from its cache, received."""
        labels = {"pool": self.pool, "role": self.role}
        self._kv_handoff_blocks.labels(**labels, source="cached").inc(cached)
        self._kv_handoff_blocks.labels(**labels, source="transferred").inc(transferred)

    def record_kv_transfer_failure(self, reason: str) -> None:
        self._kv_transfer_failures.labels(pool=self.pool, role=self.role, reason=reason).inc()

    def prefix_cache_hits(self, tier: PrefixCacheTier) -> Counter:
        """The hit counter of one tier (vLLM's `prefix_cache_hits` is the device one)."""
        return self._prefix_cache_hits.labels(pool=self.pool, role=self.role, tier=tier)

    def record_migration(self, outcome: MigrationOutcome) -> None:
        self._migrations.labels(pool=self.pool, role=self.role, outcome=outcome).inc()

    def request_finished(self, outcome: str) -> None:
        self._requests.labels(pool=self.pool, role=self.role, outcome=outcome).inc()

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
