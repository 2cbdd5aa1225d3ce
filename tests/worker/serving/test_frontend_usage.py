"""The OpenAI frontend's usage and token ids: vLLM's return_token_ids and continuous_usage_stats,
the usage chunk, and vLLM's extensions at their neutral values."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from transformers import PreTrainedTokenizerBase

from splitserve.serving.frontend import build_openai_app
from splitserve.serving.metrics import Metrics
from tests.worker.conftest import Serve
from tests.worker.serving.scripted_backend import (
    MAX_MODEL_LEN,
    MODEL,
    ScriptedBackend,
    Server,
    decode,
)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_return_token_ids(server: Server, stream: bool) -> None:
    """vLLM's return_token_ids: every output token id reaches the client, one event per token."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 12, "return_token_ids": True, "stream": stream}
    expected = server.backend.script[:12]
    if not stream:
        status, reply = await server.post("/v1/completions", body)
        assert status == 200 and reply["choices"][0]["token_ids"] == expected
        return
    events = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/v1/completions", json=body) as reply,
    ):
        async for line in reply.content:
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:])["choices"][0]["token_ids"])
    assert events == [[token] for token in expected]


async def test_token_ids_absent_unless_asked(server: Server) -> None:
    status, reply = await server.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert status == 200 and "token_ids" not in reply["choices"][0]


async def sse_events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every `data:` event of a streamed reply but [DONE], which must come last."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as reply:
        assert reply.status == 200, await reply.text()
        lines = [line.strip() async for line in reply.content if line.strip()]
    assert lines[-1] == b"data: [DONE]"
    return [json.loads(line.removeprefix(b"data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_ascii_stream_has_one_event_per_token_with_continuous_usage(
    serve: Serve, tokenizer: PreTrainedTokenizerBase, path: str
) -> None:
    """guidellm's stream_options (vLLM's continuous_usage_stats): usage so far on every chunk."""
    text = "Hello, world! How are you today? The cat sat on the mat."
    backend = ScriptedBackend(tokenizer, text)
    metrics = Metrics(pool="test", role="both")
    app = build_openai_app(
        backend, tokenizer, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, metrics=metrics
    )
    running = await serve(app)
    prompt: dict[str, Any] = (
        {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = await sse_events(
        running.url + path, {**prompt, "max_tokens": 100, "stream": True, "stream_options": options}
    )
    *chunks, last = events
    tokens = len(backend.script)
    assert len(chunks) == tokens
    pieces = [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content")) for c in chunks]
    assert pieces == [decode(tokenizer, [token]) for token in backend.script]
    prompt_tokens = len(backend.requests[0].prompt_token_ids)
    assert [c["usage"] for c in chunks] == [
        {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        for n in range(1, tokens + 1)
    ]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == tokens
    samples = metrics.registry.get_sample_value(
        "splitserve_inter_token_latency_seconds_count", {"pool": "test", "role": "both"}
    )
    assert samples == tokens - 1


async def test_usage_is_on_the_last_chunk_only_without_continuous_usage_stats(server: Server) -> None:
    body = {"prompt": "Hi", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    *chunks, last = await sse_events(server.url + "/v1/completions", body)
    assert [chunk["usage"] for chunk in chunks] == [None] * 4
    assert last["usage"]["completion_tokens"] == 4


NEUTRAL_VLLM_FIELDS: dict[str, Any] = {
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
    "min_p": 0.0,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "cache_salt": None,
    "priority": 0,
    "guided_json": None,
    "bad_words": [],
    "logits_processors": None,
    "vllm_xargs": {},
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_vllm_extensions_at_their_neutral_values_are_accepted(
    server: Server, tokenizer: PreTrainedTokenizerBase, path: str
) -> None:
    if path == "/v1/completions":
        body: dict[str, Any] = {"prompt": "hi", "add_special_tokens": True}
    else:
        body = {"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": False}
        body |= {"add_generation_prompt": True, "continue_final_message": False, "echo": False}
        body |= {"include_reasoning": True, "documents": None, "chat_template_kwargs": None}
    status, reply = await server.post(path, {**body, **NEUTRAL_VLLM_FIELDS, "max_tokens": 4})
    assert status == 200, reply
    choice = reply["choices"][0]
    text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
    assert text == decode(tokenizer, server.backend.script[:4])


async def test_continuous_usage_counts_each_choice_on_its_own(server: Server) -> None:
    """As vLLM: with n > 1 a chunk's usage is its own choice's tokens so far, the last chunk the total."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"prompt": "Hi", "max_tokens": 5, "n": 2, "stream": True, "stream_options": options}
    *chunks, last = await sse_events(server.url + "/v1/completions", body)
    for index in (0, 1):
        counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"][0]["index"] == index]
        assert counts == [1, 2, 3, 4, 5]
    assert last["usage"]["completion_tokens"] == 10
