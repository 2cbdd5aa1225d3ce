"""The OpenAI frontend's refusals and failures: every bad request an OpenAI error body that disturbs
nothing else, a backend failure before the first token a plain HTTP error, after it an error event."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from tests.worker.serving.scripted_backend import (
    MAX_BODY,
    MAX_MODEL_LEN,
    MODEL,
    Server,
    decode,
)

BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 300}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 1e-45}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [346]}, 400, "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [-5]}, 400, "stop_token_ids.0"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["y" * 2000]}, 400, "stop.0"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "min_tokens": 20}, 400, "min_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        400,
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "tools",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        400,
        "logprobs",
    ),
    # vLLM's extensions that need machinery we do not have, or change the text, refused by name.
    ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "object"}}, 400, "guided_json"),
    ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ("/v1/completions", {"prompt": "hi", "min_p": 0.1}, 400, "min_p"),
    ("/v1/completions", {"prompt": "hi", "kv_transfer_params": {"remote": "x"}}, 400, "kv_transfer_params"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": "tenant-a"}, 400, "cache_salt"),
    ("/v1/completions", {"prompt": "hi", "add_special_tokens": False}, 400, "add_special_tokens"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ x }}"},
        400,
        "chat_template",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True},
        400,
        "add_special_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, 400, "echo"),
    (
        "/v1/completions",
        {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
        400,
        "stream_options.continuous_usage_stats",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
async def test_bad_request_gets_an_openai_error_and_disturbs_nothing(
    server: Server, path: str, body: Any, status: int, param: str | None
) -> None:
    got, error = await server.post(path, body)
    assert got == status, error
    assert error["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["error"]["message"] and error["error"]["param"] == param
    assert not server.backend.requests
    assert server.outcome("client_error") == 1
    async with server.client() as client:
        reply = await client.completions.create(model=MODEL, prompt="still fine", max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("data", "headers", "status"),
    [
        (b'{"model": "tiny", "prompt": ', {"Content-Type": "application/json"}, 400),
        (b'{"model": "tiny", "prompt": "hi"}', {"Content-Type": "text/plain"}, 415),
        (b'{"prompt": "' + b"x" * (MAX_BODY + 1) + b'"}', {"Content-Type": "application/json"}, 413),
    ],
)
async def test_unparseable_bodies(server: Server, data: bytes, headers: dict[str, str], status: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/completions", data=data, headers=headers) as response:
            assert response.status == status
            assert (await response.json())["error"]["message"]
        async with session.get(server.url + "/v1/nothing-here") as response:
            assert response.status == 404 and (await response.json())["error"]["type"] == "not_found_error"
    assert server.outcome("client_error") == 1


async def test_openai_client_sees_errors(server: Server) -> None:
    async with server.client() as client:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.completions.create(model="other", prompt="hi")
        with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as caught:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=1000)
        assert "(2 in the prompt, 1000 in the completion)" in str(caught.value)


async def test_error_before_first_token_is_a_plain_http_error(server: Server) -> None:
    server.backend.fail_at = 0
    async with server.client() as client:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError, match="died") as caught:
                await client.completions.create(model=MODEL, prompt="hi", stream=stream)
            assert caught.value.status_code == 503
    assert server.outcome("server_error") == 2


async def test_error_mid_stream_is_an_error_event(server: Server, tokenizer: PreTrainedTokenizerBase) -> None:
    server.backend.fail_at = 3
    body = {"model": MODEL, "prompt": "hi", "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/v1/completions", json=body) as response,
    ):
        assert response.status == 200
        events = [line for line in (await response.text()).split("\n\n") if line]
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert [p["choices"][0]["text"] for p in payloads[:-1]] == [
        decode(tokenizer, [token]) for token in server.backend.script[:3]
    ]
    assert payloads[-1]["error"]["message"] == "decode worker 10.0.0.7 died"
    assert events[-1] == "data: [DONE]"
    async with server.client() as client:
        with pytest.raises(openai.APIError, match="died"):
            async for _ in await client.completions.create(model=MODEL, prompt="hi", stream=True):
                pass
    assert server.outcome("server_error") == 2
