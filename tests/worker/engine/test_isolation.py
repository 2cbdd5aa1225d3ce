"""One sequence's failure is its own: the step's other sequences go on, identical to `generate()`.

The boundaries refuse the inputs used here (out-of-vocabulary ids, absurd temperatures); the engine
is handed them anyway, past validation, because it must survive whatever slips through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from splitserve.engine.forward import Engine
from splitserve.engine.params import REQUEST_FAULT, GenerationChunk, GenerationError, SamplingParams
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.metrics import Metrics
from tests.conftest import Reference, random_prompt
from tests.worker.engine.runtimes import assert_no_leaks, collect, request
from tests.worker.engine.test_runtime import engines, make_runtime

__all__ = ["engines"]  # the module-scoped fixture, shared with test_runtime

MAX_TOKENS = 24
# min_tokens masks EOS the way generate()'s min_new_tokens does: every stream runs its whole length.
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)


@pytest.fixture
async def both(engines: tuple[Engine, Engine]) -> AsyncIterator[EngineRuntime]:
    runtime = make_runtime(engines[0], "both", chunked_prefill=True)
    await runtime.start()
    yield runtime
    await runtime.close()


async def _poisoned_step(
    runtime: EngineRuntime, reference: Reference, poison: tuple[list[int], SamplingParams]
) -> GenerationError:
    """Three greedy streams decoding when the poisoned request joins their batch (chunked prefill
    interleaves it with their decode steps): they finish exactly as `generate()` would."""
    prompts = [random_prompt(6 + 5 * index, seed=40 + index) for index in range(3)]
    streams = [runtime.generate(request(prompt, GREEDY, rid=f"ok{i}")) for i, prompt in enumerate(prompts)]
    firsts = [await anext(stream) for stream in streams]  # every stream is in the decode batch now

    async def rest(stream: AsyncIterator[GenerationChunk]) -> list[int]:
        tokens, _ = await collect(stream)
        return tokens

    prompt, sampling = poison
    results = await asyncio.wait_for(
        asyncio.gather(
            collect(runtime.generate(request(prompt, sampling, rid="poison"))),
            *(rest(stream) for stream in streams),
            return_exceptions=True,
        ),
        timeout=120,
    )
    failure, *others = results
    for prompt_ids, first, tokens in zip(prompts, firsts, others, strict=True):
        assert isinstance(tokens, list), tokens
        assert [*first.token_ids, *tokens] == reference.greedy(prompt_ids, MAX_TOKENS, ignore_eos=True)
    assert isinstance(failure, GenerationError), failure
    assert_no_leaks(runtime)  # the failed sequence's blocks are back too
    return failure


async def test_a_sequence_that_breaks_the_forward_fails_alone(
    both: EngineRuntime, reference: Reference
) -> None:
    vocab = both.engine.loaded.vocab_size
    failure = await _poisoned_step(both, reference, ([5, 6, vocab + 10], GREEDY))
    assert failure.kind == REQUEST_FAULT and "engine step failed" in failure.message
    tokens, _ = await collect(both.generate(request([7, 8, 9], GREEDY, rid="after")))
    assert len(tokens) == MAX_TOKENS  # the engine keeps serving


async def test_a_row_that_cannot_be_sampled_fails_alone(both: EngineRuntime, reference: Reference) -> None:
    # Unvalidated: 1e-45 overflows logits / temperature to inf, softmax gives NaN.
    tiny = SamplingParams.model_construct(**{**GREEDY.model_dump(), "temperature": 1e-45})
    failure = await _poisoned_step(both, reference, ([5, 6, 7], tiny))
    assert failure.kind == REQUEST_FAULT and "sampling failed" in failure.message


async def test_running_gauge_drops_when_the_last_stream_is_cancelled(engines: tuple[Engine, Engine]) -> None:
    """No engine step follows the last stream's abort; the gauge must not keep showing it."""
    runtime = make_runtime(engines[0], "decode")
    await runtime.start()
    metrics = runtime.metrics
    assert isinstance(metrics, Metrics)

    def running() -> float | None:
        return metrics.registry.get_sample_value(
            "splitserve_requests_running", {"pool": "test", "role": "decode"}
        )

    try:
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        stream = runtime.generate(request(random_prompt(10, seed=3), long, rid="gone"))
        await anext(stream)
        assert running() == 1
        await stream.aclose()
        for _ in range(200):  # the engine confirms the abort between steps
            if not runtime._streams:
                break
            await asyncio.sleep(0.01)
        assert_no_leaks(runtime)
        assert running() == 0
    finally:
        await runtime.close()


async def test_a_lone_sequence_that_breaks_the_forward_is_its_own_fault(both: EngineRuntime) -> None:
    """Alone in its step, nothing to compare with: a probe forward shows the engine still works, so
    the failure is the request's (not retried elsewhere), and the worker serves the next request."""
    vocab = both.engine.loaded.vocab_size
    with pytest.raises(GenerationError) as failure:
        await collect(both.generate(request([5, 6, vocab + 10], GREEDY, rid="lone")))
    assert failure.value.kind == REQUEST_FAULT
    assert_no_leaks(both)  # the probe's block is back too
    tokens, _ = await collect(both.generate(request([7, 8, 9], GREEDY, rid="after")))
    assert len(tokens) == MAX_TOKENS
