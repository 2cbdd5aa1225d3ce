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
from splitserve.engine.params import GenerationError, SamplingParams
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.internal_api import Load
from splitserve.serving.metrics import Metrics
from tests.conftest import Reference, random_prompt
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, hand_off, request


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
    assert both.load().waiting == 0
    assert_no_leaks(both)


async def test_a_prompt_larger_than_the_pool_is_refused_and_max_tokens_is_not_reserved(
    engines: tuple[Engine, Engine],
) -> None:
    """Only the prompt has to fit: max_tokens past the pool is admitted (capped), a prompt past it is not."""
    bytes_per_block = 16 * engines[0].loaded.layout.bytes_per_token
    runtime = make_runtime(engines[0], "both", kv_cache_bytes=8 * bytes_per_block)
    await runtime.start()
    try:
        with pytest.raises(GenerationError) as error:
            await collect(runtime.generate(request(random_prompt(8 * 16, seed=1), rid="big")))
        assert error.value.status == 400 and "KV budget" in error.value.message
        endless = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
        tokens, finish = await collect(runtime.generate(request([5, 6, 7], endless, rid="long")))
        assert len(tokens) == 8 * 16 - 3 and finish == "length"  # the pool is the limit, not an error
        assert_no_leaks(runtime)
    finally:
        await runtime.close()


async def test_closing_a_stream_aborts_and_frees_its_kv(both: EngineRuntime) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    stream = both.generate(request(random_prompt(50, seed=7), long, rid="abandon"))
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(200):  # the engine confirms the abort between steps
        if not both._streams:
            break
        await asyncio.sleep(0.01)
    assert both.load() == Load(running=0, waiting=0, kv_cache_usage=0.0)
    assert_no_leaks(both)
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
        assert_no_leaks(prefill, decode)
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
        decode.register("late", random_prompt(10, seed=0), GREEDY)
        with pytest.raises(GenerationError) as error:
            await asyncio.wait_for(collect(decode.stream("late")), timeout=10)
        assert error.value.status == 504
        assert_no_leaks(decode)
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
