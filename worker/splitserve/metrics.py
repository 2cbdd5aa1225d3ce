"""Prometheus metrics of every role. The names are a contract: the autoscaler and dashboards query them.

Every series carries `pool` (the InferencePool's name) and `role` (router, prefill, decode, both).
The router (and `both`, which is its own frontend) records what clients see; workers record their stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Bucket edges resolve a 50 ms TTFT and a 5 ms ITL (edges at and around those targets).
TTFT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.006,
    0.007,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)  # fine around 5-10 ms: decode ITL targets live there, and histogram_quantile interpolates within a bucket
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

LABELS = ("pool", "role")

# Outcomes of splitserve_requests_total.
OUTCOME_SUCCESS = "success"
OUTCOME_CLIENT_ERROR = "client_error"  # 4xx: bad input
OUTCOME_SERVER_ERROR = "server_error"  # a worker failed the request
OUTCOME_CANCELLED = "cancelled"  # the client went away


@dataclass
class Metrics:
    """All splitserve series of one process, in a registry of its own (tests run several per process)."""

    pool: str
    role: str
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        reg, labels = self.registry, LABELS
        values = {"pool": self.pool, "role": self.role}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(**values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(**values)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg).labels(**values)

        # What clients see (router, both).
        self.ttft = histogram(
            "splitserve_time_to_first_token_seconds",
            "Request arrival to first token sent, as the client sees it.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "splitserve_inter_token_latency_seconds",
            "Gap between consecutive tokens of one stream.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "splitserve_e2e_request_latency_seconds", "Request arrival to last token.", E2E_BUCKETS
        )
        self.prompt_tokens = counter("splitserve_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("splitserve_generation_tokens_total", "Tokens sent to clients.")
        self._requests = Counter(
            "splitserve_requests_total", "Finished requests by outcome.", (*labels, "outcome"), registry=reg
        )
        # What a worker's stage costs (prefill, decode, both).
        self.kv_transfer_seconds = histogram(
            "splitserve_kv_transfer_seconds",
            "Time to send (prefill) or receive (decode) one KV cache.",
            TRANSFER_BUCKETS,
        )
        self.kv_transfer_bytes = counter("splitserve_kv_transfer_bytes_total", "KV cache bytes moved.")
        self.requests_running = gauge("splitserve_requests_running", "Requests in the engine's batch.")
        self.requests_waiting = gauge(
            "splitserve_requests_waiting", "Requests queued for the engine (KV budget or batch full)."
        )
        self.kv_cache_usage = gauge(
            "splitserve_kv_cache_usage_ratio", "Reserved KV tokens over the KV budget, 0..1."
        )
        self.kv_cache_capacity_tokens = gauge(
            "splitserve_kv_cache_capacity_tokens", "KV budget in tokens (bytes / bytes per token)."
        )
        self.prefill_step = histogram(
            "splitserve_prefill_step_seconds", "Duration of one prefill forward (one chunk).", STEP_BUCKETS
        )
        self.decode_step = histogram(
            "splitserve_decode_step_seconds",
            "Duration of one decode step over the whole batch.",
            STEP_BUCKETS,
        )
        self.prefill_tokens = counter(
            "splitserve_prefill_tokens_total",
            "Prompt tokens this worker computed (capacity = rate / busy time).",
        )
        self.decode_tokens = counter(
            "splitserve_decode_tokens_total", "Tokens produced by decode steps (batch size = rate / steps)."
        )
        for outcome in (OUTCOME_SUCCESS, OUTCOME_CLIENT_ERROR, OUTCOME_SERVER_ERROR, OUTCOME_CANCELLED):
            self._requests.labels(**values, outcome=outcome)

    def request_finished(self, outcome: str) -> None:
        self._requests.labels(pool=self.pool, role=self.role, outcome=outcome).inc()

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
