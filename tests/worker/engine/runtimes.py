"""Helpers of the runtime suites: requests, draining streams, the in-process KV handoff, leak checks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from splitserve.engine.params import GenerationChunk, GenerationRequest, SamplingParams
from splitserve.engine.runtime import EngineRuntime

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def assert_no_leaks(*runtimes: EngineRuntime) -> None:
    """Every block is back in the pool and no stream is left behind."""
    for runtime in runtimes:
        assert runtime.pool.allocator.num_free == runtime.pool.num_blocks
        assert not runtime._streams


def request(prompt: list[int], sampling: SamplingParams = GREEDY, rid: str = "r") -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), sampling=sampling)


async def hand_off(prefill: EngineRuntime, decode: EngineRuntime, req: GenerationRequest) -> None:
    """What the KV transfer does, minus the socket: prefill, copy every layer's runs past the prefix the
    decode runtime holds already, announce arrival."""
    prompt_len = len(req.prompt_token_ids)
    held = decode.register(req.request_id, list(req.prompt_token_ids), req.sampling).cached
    async with prefill.prefill(req) as result:
        kv = await decode.receive_kv(req.request_id, prompt_len, held)
        for layer in range(result.kv.layout.num_layers):
            copy_runs(result.kv.runs(layer, held, prompt_len), kv.runs(layer, held, prompt_len))
        decode.kv_arrived(req.request_id, kv, result.first_token)


def copy_runs(source: list[memoryview], destination: list[memoryview]) -> None:
    """Copy bytes between two lists of runs that hold the same bytes split differently."""
    data, offset = b"".join(source), 0
    for run in destination:
        run[:] = data[offset : offset + len(run)]
        offset += len(run)
    assert offset == len(data)


async def collect(chunks: AsyncIterator[GenerationChunk]) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    finish = None
    async for chunk in chunks:
        tokens.extend(chunk.token_ids)
        finish = chunk.finish_reason
    return tokens, finish
