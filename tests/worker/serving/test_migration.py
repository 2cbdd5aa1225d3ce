"""Streams that outlive their decode worker: the router resubmits prompt + tokens so far elsewhere.

Fake workers (test_router.py's) make the seam visible: a fake decode's answer is a function of the
prompt's length, so a resumed stream carries on exactly where the dead one stopped only if the
router resubmitted every token the client already has, and asked for just the rest.
"""

from __future__ import annotations

import asyncio

import openai

from tests.worker.conftest import Serve
from tests.worker.serving.fake_workers import FakeDecode, FakePrefill
from tests.worker.serving.router_harness import MODEL, StartRouter, migrations

TOKENS = 40


async def test_streams_of_a_dead_decode_worker_resume_on_another(
    serve: Serve, start_router: StartRouter
) -> None:
    prefill = await FakePrefill().start(serve)
    doomed, survivor = [await FakeDecode(token_delay=0.05).start(serve) for _ in range(2)]
    router = await start_router([prefill.url], [doomed.url, survivor.url])  # migration_limit: 1
    progress = [asyncio.Event() for _ in range(4)]

    async def consume(index: int, client: openai.AsyncOpenAI) -> tuple[str, str | None]:
        """The stream's text, and what is wrong with its usage (None: the original prompt, every token)."""
        usage_please = {"include_usage": True}
        stream = await client.completions.create(
            model=MODEL, prompt="stream", max_tokens=TOKENS, stream=True, stream_options=usage_please
        )
        text, usage = "", None
        async for chunk in stream:
            text += "".join(choice.text for choice in chunk.choices)
            if len(text) >= 2:
                progress[index].set()
            if chunk.usage is not None:
                usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        prompt_tokens = len(router.tokenizer.encode("stream"))
        return text, None if usage == (prompt_tokens, TOKENS) else f"usage {usage}"

    async with router.client() as client:
        streams = [asyncio.create_task(consume(i, client)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in progress)), 10)
        await doomed.die()
        results = await asyncio.wait_for(asyncio.gather(*streams), 20)
    assert results == [(router.expected("stream", TOKENS), None)] * 4
    moved = {r["request_id"]: r for r in survivor.registered if ".moved1" in r["request_id"]}
    on_doomed = {r["request_id"] for r in doomed.registered}
    assert 0 < len(on_doomed) < 4 and {i.split(".moved")[0] for i in moved} == on_doomed
    prompt = router.tokenizer.encode("stream")
    for body in moved.values():
        produced = len(body["prompt_token_ids"]) - len(prompt)
        assert body["prompt_token_ids"][: len(prompt)] == prompt and 0 < produced < TOKENS
        assert body["sampling"]["max_tokens"] == TOKENS - produced
    assert migrations(router.backend, "resumed") == len(on_doomed)
    assert migrations(router.backend, "exhausted") == 0
