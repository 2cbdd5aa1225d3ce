"""Draining the OpenAI frontend (router, `both`): not ready, no new work, open streams finish or fail
out loud at the deadline. Real HTTP on loopback, the official `openai` client."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from splitserve.serving.drain import Drain
from splitserve.serving.frontend import build_openai_app
from splitserve.serving.metrics import Metrics
from tests.worker.conftest import Serve
from tests.worker.serving.scripted_backend import MAX_MODEL_LEN, MODEL, ScriptedBackend


async def start(
    serve: Serve, tokenizer: PreTrainedTokenizerBase, backend: ScriptedBackend, drain: Drain
) -> str:
    metrics = Metrics(pool="test", role="router")
    app = build_openai_app(
        backend, tokenizer, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, metrics=metrics, drain=drain
    )
    return (await serve(app)).url


async def health(url: str, path: str = "/health") -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url + path) as reply:
        return reply.status, (await reply.json())["status"]


async def test_open_stream_fails_with_an_error_event_past_the_deadline(
    serve: Serve, tokenizer: PreTrainedTokenizerBase
) -> None:
    drain = Drain(seconds=0.5)
    backend = ScriptedBackend(tokenizer, hang_after=4)  # four tokens, then it hangs: outlives any drain
    url = await start(serve, tokenizer, backend, drain)
    assert await health(url) == (200, "ready")
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10) as client:
        stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=100, stream=True)
        chunks = aiter(stream)
        first = await anext(chunks)
        assert first.choices[0].text
        draining = asyncio.create_task(drain.run())
        assert await health(url) == (503, "draining")  # not ready
        assert await health(url, "/health?live=1") == (200, "ready")  # but alive: no restart mid-drain
        with pytest.raises(openai.APIStatusError) as refused:  # no new work
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert refused.value.status_code == 503 and "draining" in str(refused.value)
        with pytest.raises(openai.APIError, match="shut down after draining"):  # an error event, not a cut
            async for _ in chunks:
                pass
        assert await draining is False


async def test_drain_waits_for_streams_that_finish(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> None:
    backend = ScriptedBackend(tokenizer)
    drain = Drain(seconds=30)
    url = await start(serve, tokenizer, backend, drain)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10) as client:
        stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=100, stream=True)
        chunks = aiter(stream)
        text = (await anext(chunks)).choices[0].text
        draining = asyncio.create_task(drain.run())
        async for chunk in chunks:
            text += "".join(choice.text for choice in chunk.choices)
        assert await draining is True  # returned once the stream ended, long before 30 s
    assert text == tokenizer.decode(backend.script, skip_special_tokens=True)
