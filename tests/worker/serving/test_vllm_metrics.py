"""The `vllm:*` series: each exported with vLLM's type, label set and buckets, and agreeing with ours.

The router side is the real OpenAI frontend on loopback, driven by the official `openai` client and
scraped over HTTP; the engine side is a decode process's registry. What "vLLM's" means is written once
in splitserve.contract.names (from vllm/v1/metrics/loggers.py); the literals below restate it so that
a change there has to be made on purpose.
"""

from __future__ import annotations

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from transformers import PreTrainedTokenizerBase

from splitserve.contract import names
from splitserve.serving.frontend import build_openai_app
from splitserve.serving.metrics import Metrics
from tests.worker.conftest import Serve
from tests.worker.serving.scripted_backend import MAX_MODEL_LEN, MODEL, ScriptedBackend

LABELS = {"model_name", "engine"}
# name -> (type, extra label) as vLLM's PrometheusStatLogger declares them.
FRONTEND = {
    "vllm:time_to_first_token_seconds": ("histogram", None),
    "vllm:inter_token_latency_seconds": ("histogram", None),
    "vllm:request_time_per_output_token_seconds": ("histogram", None),
    "vllm:e2e_request_latency_seconds": ("histogram", None),
    "vllm:prompt_tokens": ("counter", None),
    "vllm:generation_tokens": ("counter", None),
    "vllm:request_success": ("counter", "finished_reason"),
}
ENGINE = {
    "vllm:num_requests_running": ("gauge", None),
    "vllm:num_requests_waiting": ("gauge", None),
    "vllm:kv_cache_usage_perc": ("gauge", None),
    "vllm:prefix_cache_queries": ("counter", None),
    "vllm:prefix_cache_hits": ("counter", None),
}
BUCKETS = {
    "vllm:time_to_first_token_seconds": [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ],
    "vllm:inter_token_latency_seconds": [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
        40.0, 80.0,
    ],
    "vllm:e2e_request_latency_seconds": [
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
        480.0, 960.0, 1920.0, 7680.0,
    ],
}  # fmt: skip
BUCKETS["vllm:request_time_per_output_token_seconds"] = BUCKETS["vllm:inter_token_latency_seconds"]


def families(text: str) -> dict[str, tuple[str, list[Sample]]]:
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def check(exported: dict[str, tuple[str, list[Sample]]], expected: dict[str, tuple[str, str | None]]) -> None:
    for name, (kind, extra) in expected.items():
        assert name in exported, f"{name} not exported"
        found, samples = exported[name]
        assert found == kind, f"{name}: {found}, vLLM has {kind}"
        for sample in samples:
            if sample.name.endswith("_created"):
                continue
            labels = set(sample.labels) - {"le"}
            assert labels == LABELS | ({extra} if extra else set()), f"{sample.name}: {sorted(labels)}"
            assert sample.labels["model_name"] == MODEL and sample.labels["engine"] == "0"
        if kind == "histogram":
            edges = [float(s.labels["le"]) for s in samples if s.name == f"{name}_bucket"]
            assert edges == [*BUCKETS[name], float("inf")], name


def value(exported: dict[str, tuple[str, list[Sample]]], sample_name: str, **labels: str) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    return sum(
        s.value
        for s in exported[family][1]
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_router_exports_vllms_request_series(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> None:
    metrics = Metrics(pool="chat", role="router", model_name=MODEL)
    app = build_openai_app(
        ScriptedBackend(tokenizer),
        tokenizer,
        served_model_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        metrics=metrics,
    )
    running = await serve(app)
    async with openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0) as client:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=4)  # finishes on length
        stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=200, stream=True)
        async for _ in stream:  # the whole script: finishes on stop
            pass
    async with aiohttp.ClientSession() as session, session.get(f"{running.url}/metrics") as response:
        exported = families(await response.text())
    check(exported, FRONTEND)
    assert not set(ENGINE) & set(exported)  # the router has no scheduler
    # Views of our series, not a second count: the two agree exactly.
    for ours, theirs in [
        ("splitserve_prompt_tokens_total", "vllm:prompt_tokens_total"),
        ("splitserve_generation_tokens_total", "vllm:generation_tokens_total"),
        ("splitserve_time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_count"),
        ("splitserve_inter_token_latency_seconds_count", "vllm:inter_token_latency_seconds_count"),
        ("splitserve_e2e_request_latency_seconds_sum", "vllm:e2e_request_latency_seconds_sum"),
    ]:
        assert value(exported, ours) == value(exported, theirs) > 0, theirs
    assert value(exported, "vllm:request_success_total", finished_reason="length") == 1
    assert value(exported, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(exported, "vllm:request_time_per_output_token_seconds_count") == 2
    assert value(exported, "vllm:time_to_first_token_seconds_count") == 2


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_engines_export_vllms_scheduler_gauges(role: str) -> None:
    metrics = Metrics(pool="chat", role=role, model_name=MODEL)
    metrics.requests_running.set(3)
    metrics.requests_waiting.set(2)
    metrics.kv_cache_usage.set(0.25)  # a fraction, as vLLM's "_perc" is: 1 means 100 percent
    metrics.record_prefix_cache(100, {"device": 48})
    metrics.record_prefix_cache(50, {"host": 16})  # vLLM's hits are the device cache's
    exported = families(metrics.exposition()[0].decode())
    check(exported, ENGINE)
    assert not set(FRONTEND) & set(exported)  # the router counts requests, once
    got = [
        value(exported, name + ("_total" if kind == "counter" else "")) for name, (kind, _) in ENGINE.items()
    ]
    assert got == [3.0, 2.0, 0.25, 150.0, 48.0]


def test_vllm_buckets_are_a_subset_of_ours() -> None:
    """What makes every vLLM bucket count exact: each vLLM edge is one of our edges."""
    for ours, theirs in [
        (names.TTFT_BUCKETS, names.VLLM_TTFT_BUCKETS),
        (names.ITL_BUCKETS, names.VLLM_ITL_BUCKETS),
        (names.E2E_BUCKETS, names.VLLM_E2E_BUCKETS),
    ]:
        assert set(theirs) <= set(ours)
