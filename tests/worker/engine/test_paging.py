"""The paged KV pool under pressure: block boundaries, preemption, small budgets, no leaks."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from transformers import PreTrainedTokenizerBase

from splitserve.contract.config import EngineConfig
from splitserve.contract.names import EngineRole
from splitserve.engine.forward import Engine
from splitserve.engine.params import GenerationError, SamplingParams
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.frontend import build_openai_app
from splitserve.serving.metrics import Metrics
from splitserve.serving.worker_app import LocalBackend, WorkerState
from tests.conftest import Reference, random_prompt
from tests.worker.conftest import Serve
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, hand_off, request

BLOCK = 16


def make_runtime(
    engine: Engine,
    role: EngineRole,
    blocks: int,
    metrics: Metrics | None = None,
    max_num_seqs: int = 64,
    prefix_caching: bool = True,
    **settings: Any,
) -> EngineRuntime:
    """A runtime whose pool has exactly `blocks` blocks of BLOCK tokens (`settings`: more EngineConfig)."""
    config = EngineConfig(
        model="tiny",
        prefill_chunk_size=32,
        chunked_prefill=True,
        block_size=BLOCK,
        kv_cache_bytes=blocks * BLOCK * engine.loaded.layout.bytes_per_token,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix_caching,
        **settings,
    )
    runtime = EngineRuntime(engine, config, role, metrics or Metrics("test", role))
    assert runtime.pool.num_blocks == blocks
    return runtime


def preemptions(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "splitserve_preemptions_total", {"pool": "test", "role": metrics.role}
    )
    return value or 0.0


LONG = 40
# min_tokens masks EOS as generate()'s min_new_tokens does (ignore_eos would let EOS be sampled).
ENDLESS = SamplingParams(temperature=0.0, max_tokens=LONG, min_tokens=LONG)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=77, max_tokens=LONG, min_tokens=LONG)


async def test_preemption_keeps_every_stream_identical_to_generate(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """8 streams of up to 5 blocks each in a 14-block pool: the latest admitted are preempted and
    recomputed; every greedy stream still equals `generate()`, the seeded one its unpressured self."""
    prompts = [random_prompt(10 + 4 * i, seed=200 + i) for i in range(8)]
    roomy = make_runtime(engines[0], "both", blocks=256)
    await roomy.start()
    try:
        seeded_alone, _ = await collect(roomy.generate(request(prompts[7], SEEDED, rid="alone")))
    finally:
        await roomy.close()
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=14, metrics=metrics)
    await runtime.start()
    try:
        samplings = [ENDLESS] * 7 + [SEEDED]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    collect(runtime.generate(request(p, s, rid=f"p{i}")))
                    for i, (p, s) in enumerate(zip(prompts, samplings, strict=True))
                )
            ),
            timeout=180,
        )
    finally:
        await runtime.close()
    for prompt, (tokens, finish) in zip(prompts[:7], results[:7], strict=True):
        assert tokens == reference.greedy(prompt, LONG, ignore_eos=True) and finish == "length"
    assert results[7][0] == seeded_alone
    assert preemptions(metrics) > 0
    assert_no_leaks(runtime)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 31, 32, 33, 64, 65, 3000])
async def test_prompts_on_and_off_block_boundaries_match_generate_through_the_handoff(
    engines: tuple[Engine, Engine], reference: Reference, length: int
) -> None:
    """Prefill in 32-token chunks into 16-token blocks, ship the blocks, decode: same as `generate()`."""
    prefill = make_runtime(engines[0], "prefill", blocks=256)
    decode = make_runtime(engines[1], "decode", blocks=256)
    await prefill.start()
    await decode.start()
    prompt = random_prompt(length, seed=length)
    try:
        await hand_off(prefill, decode, request(prompt, rid="b"))
        tokens, _ = await asyncio.wait_for(collect(decode.stream("b")), timeout=120)
    finally:
        await prefill.close()
        await decode.close()
    assert tokens == reference.greedy(prompt, GREEDY.max_tokens)
    assert_no_leaks(prefill, decode)


async def test_a_broken_transfer_frees_the_blocks_it_took(engines: tuple[Engine, Engine]) -> None:
    decode = make_runtime(engines[1], "decode", blocks=8)
    await decode.start()
    try:
        decode.register("cut", random_prompt(40, seed=4), GREEDY)
        await decode.receive_kv("cut", 40, 0)
        assert decode.pool.allocator.num_used == 3
        decode.kv_failed("cut", "the sender went away mid-layer")
        with pytest.raises(GenerationError, match="KV transfer failed"):
            await collect(decode.stream("cut"))
        assert_no_leaks(decode)
    finally:
        await decode.close()


@pytest.mark.parametrize(("blocks", "max_num_seqs"), [(6, 64), (64, 1)], ids=["blocks", "max-num-seqs"])
async def test_arriving_caches_wait_for_room_instead_of_failing(
    engines: tuple[Engine, Engine], reference: Reference, blocks: int, max_num_seqs: int
) -> None:
    """A decode worker with room for one sequence at a time: the second cache waits for the first."""
    prompts = [random_prompt(60, seed=60), random_prompt(61, seed=61)]
    prefill = make_runtime(engines[0], "prefill", blocks=64)
    decode = make_runtime(engines[1], "decode", blocks=blocks, max_num_seqs=max_num_seqs)
    await prefill.start()
    await decode.start()
    try:
        requests = [request(p, rid=f"w{i}") for i, p in enumerate(prompts)]
        streams = [collect(decode.stream(r.request_id)) for r in requests]
        handoffs = asyncio.gather(*(hand_off(prefill, decode, r) for r in requests))
        results = await asyncio.wait_for(asyncio.gather(handoffs, *streams), timeout=120)
    finally:
        await prefill.close()
        await decode.close()
    assert [tokens for tokens, _ in results[1:]] == [reference.greedy(p, GREEDY.max_tokens) for p in prompts]
    assert_no_leaks(prefill, decode)


async def test_chat_without_max_tokens_is_admitted_into_a_small_budget_and_streams(
    engines: tuple[Engine, Engine],
    reference: Reference,
    tokenizer: PreTrainedTokenizerBase,
    serve: Serve,
) -> None:
    """No max_tokens means "the rest of the 8k context"; a 12-block pool admits it and streams."""
    runtime = make_runtime(engines[0], "both", blocks=12)
    await runtime.start()
    app = build_openai_app(
        LocalBackend(WorkerState(Metrics("test", "both"), runtime)),
        tokenizer,
        served_model_name="tiny",
        max_model_len=runtime.max_model_len,
        metrics=Metrics("test", "router"),
        max_body_bytes=1 << 20,
    )
    running = await serve(app)
    messages = [{"role": "user", "content": "Tell me about paged attention."}]
    client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            stream=True,
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    finally:
        await runtime.close()
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    expected = reference.greedy(prompt, 12 * BLOCK - len(prompt))
    assert text and text == tokenizer.decode(expected, skip_special_tokens=True)
    assert_no_leaks(runtime)
