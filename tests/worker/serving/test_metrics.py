"""Each process exports only its role's series: no zero TTFT histograms on decode workers, no KV usage
on the router, so a query without a `role` filter is not diluted."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.contract import names
from splitserve.serving.metrics import Metrics

CLIENT = {
    names.TTFT,
    names.ITL,
    names.E2E_LATENCY,
    names.PROMPT_TOKENS,
    names.GENERATION_TOKENS,
    names.REQUESTS,
}
ENGINE = {
    names.REQUESTS_RUNNING,
    names.REQUESTS_WAITING,
    names.KV_CACHE_USAGE,
    names.KV_CACHE_CAPACITY_TOKENS,
    names.KV_CACHE_BLOCKS,
    names.PREEMPTIONS,
    names.PREFIX_CACHE_QUERIES,
    names.PREFIX_CACHE_HITS,
    names.KV_TIER_USAGE_BYTES,
    names.KV_OFFLOAD_BYTES,
    names.KV_DISK_ERRORS,
    names.STARTUP_SECONDS,
}
TRANSFER = {names.KV_TRANSFER_SECONDS, names.KV_TRANSFER_BYTES}
PREFILL = {names.step_seconds("prefill"), names.stage_tokens("prefill")}
DECODE = {names.step_seconds("decode"), names.stage_tokens("decode")}


def exported(role: str) -> set[str]:
    """splitserve_* names in the role's /metrics body, as Prometheus' own parser reads them (the vllm:
    views of them follow the same roles: test_vllm_metrics.py)."""
    body, _ = Metrics("pool", role).exposition()
    families = text_string_to_metric_families(body.decode())
    found = set()
    for family in families:  # samples keep the full name (`_total`), unlike the parsed family
        for sample in family.samples:
            if sample.name.startswith("splitserve_") and not sample.name.endswith("_created"):
                found.add(sample.name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum"))
    return found


@pytest.mark.parametrize(
    ("role", "series"),
    [
        ("router", CLIENT | {names.PREFILLS, names.MIGRATIONS}),
        ("prefill", ENGINE | TRANSFER | PREFILL | {names.KV_TRANSFER_FAILURES}),
        ("decode", ENGINE | TRANSFER | DECODE | {names.KV_HANDOFF_BLOCKS}),
        ("both", CLIENT | ENGINE | PREFILL | DECODE),
    ],
)
def test_each_role_exports_only_its_series(role: str, series: set[str]) -> None:
    assert exported(role) == series


def test_unexported_series_can_still_be_recorded() -> None:
    """Code shared between roles records without asking which role it runs in."""
    router = Metrics("pool", "router")
    router.kv_cache_usage.set(0.5)
    router.decode_step.observe(0.01)
    assert names.KV_CACHE_USAGE.encode() not in router.exposition()[0]
    assert router.registry.get_sample_value(names.TTFT + "_count", {"pool": "pool", "role": "router"}) == 0
