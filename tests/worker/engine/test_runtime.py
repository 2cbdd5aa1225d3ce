"""The engine thread and its asyncio face, in one process: batching, KV admission, aborts, handoff."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from splitserve.contract.config import EngineConfig
from splitserve.contract.names import EngineRole
from splitserve.engine.forward import Engine
from splitserve.engine.loader import load_model
from splitserve.engine.params import GenerationChunk, GenerationError, GenerationRequest, SamplingParams
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.internal_api import Load
from splitserve.serving.metrics import Metrics
from tests.conftest import Reference, random_prompt

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> tuple[Engine, Engine]:
    """Two engines on the same weights, so a prefill and a decode runtime can run side by side."""
    config = EngineConfig(model=str(tiny_model), threads=1)
    return Engine(load_model(config)), Engine(load_model(config))


def make_runtime(engine: Engine, role: EngineRole, **settings: object) -> EngineRuntime:
    config = EngineConfig(model="tiny", prefill_chunk_size=32, **settings)  # type: ignore[arg-type]
    return EngineRuntime(engine, config, role, Metrics("test", role))


@pytest.fixture
async def both(engines: tuple[Engine, Engine]) -> AsyncIterator[EngineRuntime]:
    runtime = make_runtime(engines[0], "both", chunked_prefill=True)
    await runtime.start()
    yield runtime
    await runtime.close()


def request(prompt: list[int], sampling: SamplingParams = GREEDY, rid: str = "r") -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), sampling=sampling)


async def hand_off(prefill: EngineRuntime, decode: EngineRuntime, req: GenerationRequest) -> None:
    """What the KV transfer does, minus the socket: prefill, copy every layer, announce arrival."""
    prompt_len = len(req.prompt_token_ids)
    decode.register(req.request_id, prompt_len, req.sampling)
    async with prefill.prefill(req) as result:
        kv = await decode.receive_kv(req.request_id, prompt_len)
        for layer in range(result.kv.layout.num_layers):
            kv.load_layer(layer, result.kv.layer(layer).clone())
        decode.kv_arrived(req.request_id, kv, result.first_token)


async def collect(chunks: AsyncIterator[GenerationChunk]) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    finish = None
    async for chunk in chunks:
        tokens.extend(chunk.token_ids)
        finish = chunk.finish_reason
    return tokens, finish


async def test_concurrent_requests_batch_and_match_generate(
    both: EngineRuntime, reference: Reference
) -> None:
    prompts = [random_prompt(5 + 23 * i, seed=i) for i in range(10)]
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(both.generate(request(p, rid=f"r{i}"))) for i, p in enumerate(prompts))),
        timeout=120,
    )
    for prompt, (tokens, finish) in zip(prompts, results, strict=True):
        expected = reference.greedy(prompt, 12)
        assert tokens == expected
        assert finish == ("length" if len(expected) == 12 else "stop")
    assert both.budget.reserved_tokens == 0 and both.load().waiting == 0


async def test_requests_queue_when_the_kv_budget_is_full(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """Budget for two sequences, six requests: all finish, never more than two admitted at once."""
    engine = engines[0]
    per_request = 20 + GREEDY.max_tokens
    bytes_per_token = engine.loaded.layout.bytes_per_token
    original = engine.loaded.kv_budget_bytes
    engine.loaded.kv_budget_bytes = 2 * per_request * bytes_per_token
    try:
        runtime = make_runtime(engine, "both")
    finally:
        engine.loaded.kv_budget_bytes = original
    await runtime.start()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, runtime.budget.sequences)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    prompts = [random_prompt(20, seed=100 + i) for i in range(6)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(collect(runtime.generate(request(p, rid=f"q{i}"))) for i, p in enumerate(prompts))
            ),
            timeout=120,
        )
    finally:
        watcher.cancel()
        await runtime.close()
    assert [tokens for tokens, _ in results] == [reference.greedy(p, 12) for p in prompts]
    assert peak == 2
    assert runtime.budget.reserved_tokens == 0


async def test_request_larger_than_the_budget_is_refused(both: EngineRuntime) -> None:
    huge = SamplingParams(temperature=0.0, max_tokens=both.budget.capacity_tokens)
    with pytest.raises(GenerationError) as error:
        await collect(both.generate(request([5, 6, 7], huge)))
    assert error.value.status == 400 and "KV budget" in error.value.message


async def test_closing_a_stream_aborts_and_frees_its_kv(both: EngineRuntime) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    stream = both.generate(request(random_prompt(50, seed=7), long, rid="abandon"))
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(200):  # the engine confirms the abort between steps
        if both.budget.reserved_tokens == 0:
            break
        await asyncio.sleep(0.01)
    assert both.budget.reserved_tokens == 0 and both.load() == Load(running=0, waiting=0, kv_cache_usage=0.0)
    tokens, _ = await collect(both.generate(request([5, 6, 7], rid="after")))
    assert tokens  # the engine keeps serving


async def test_prefill_to_decode_handoff_in_process(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """Prefill on one runtime, ship the layers, decode on another: same tokens as `generate()`."""
    prefill, decode = make_runtime(engines[0], "prefill"), make_runtime(engines[1], "decode")
    await prefill.start()
    await decode.start()
    try:
        for index, length in enumerate((3, 70, 130)):
            prompt = random_prompt(length, seed=length)
            rid = f"h{index}"
            await hand_off(prefill, decode, request(prompt, rid=rid))
            tokens, _ = await asyncio.wait_for(collect(decode.stream(rid)), timeout=60)
            assert tokens == reference.greedy(prompt, 12)
        assert prefill.budget.reserved_tokens == 0 and decode.budget.reserved_tokens == 0
    finally:
        await prefill.close()
        await decode.close()


async def test_seeded_sampling_is_the_same_split_or_colocated(
    engines: tuple[Engine, Engine], both: EngineRuntime
) -> None:
    sampling = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    prompt = random_prompt(40, seed=9)
    colocated, _ = await collect(both.generate(request(prompt, sampling, rid="s1")))
    again, _ = await collect(both.generate(request(prompt, sampling, rid="s2")))
    assert colocated == again
    prefill, decode = make_runtime(engines[1], "prefill"), make_runtime(engines[1], "decode")
    await prefill.start()
    await decode.start()
    try:
        await hand_off(prefill, decode, request(prompt, sampling, rid="s3"))
        split, _ = await collect(decode.stream("s3"))
    finally:
        await prefill.close()
        await decode.close()
    assert split == colocated


async def test_kv_that_never_arrives_times_out(engines: tuple[Engine, Engine]) -> None:
    decode = make_runtime(engines[1], "decode", kv_timeout_seconds=0.2)
    await decode.start()
    try:
        decode.register("late", 10, GREEDY)
        with pytest.raises(GenerationError) as error:
            await asyncio.wait_for(collect(decode.stream("late")), timeout=10)
        assert error.value.status == 504
        assert decode.budget.reserved_tokens == 0 and not decode._streams
    finally:
        await decode.close()


@pytest.mark.parametrize(
    ("sampling", "check"),
    [
        (
            SamplingParams(temperature=0.0, max_tokens=5, min_tokens=5),
            lambda t, f: len(t) == 5 and f == "length",
        ),
        (SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), lambda t, f: len(t) == 30),
        (SamplingParams(temperature=0.0, max_tokens=1), lambda t, f: len(t) == 1 and f in ("length", "stop")),
    ],
)
async def test_stopping_rules(both: EngineRuntime, sampling: SamplingParams, check: object) -> None:
    tokens, finish = await collect(both.generate(request(random_prompt(9, seed=5), sampling)))
    assert callable(check) and check(tokens, finish)


async def test_stop_token_ids_end_generation(both: EngineRuntime, reference: Reference) -> None:
    prompt = random_prompt(15, seed=11)
    expected = reference.greedy(prompt, 12, ignore_eos=True)
    stop_at = expected[4]
    sampling = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,))
    tokens, finish = await collect(both.generate(request(prompt, sampling)))
    assert tokens == expected[: expected.index(stop_at) + 1] and finish == "stop"
