"""The OpenAI frontend over a scripted backend, on loopback, with the official `openai` client:
generations, cancellation, health, models, metrics (errors: test_frontend_errors.py; usage and
token ids: test_frontend_usage.py)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from transformers import PreTrainedTokenizerBase

from splitserve.serving.frontend import build_openai_app
from splitserve.serving.http import serve_app
from splitserve.serving.metrics import Metrics
from tests.worker.conftest import Serve
from tests.worker.serving.scripted_backend import (
    MAX_MODEL_LEN,
    MODEL,
    SCRIPT,
    ScriptedBackend,
    Server,
    decode,
)


async def test_completion(server: Server, tokenizer: PreTrainedTokenizerBase) -> None:
    async with server.client() as client:
        reply = await client.completions.create(model=MODEL, prompt="The cat sat", max_tokens=5)
    assert reply.choices[0].text == decode(tokenizer, server.backend.script[:5])
    assert reply.choices[0].finish_reason == "length"
    prompt_len = len(tokenizer.encode("The cat sat"))
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_len, 5)
    (request,) = server.backend.requests
    assert request.request_id == reply.id and reply.id.startswith("cmpl-")
    assert list(request.prompt_token_ids) == tokenizer.encode("The cat sat")
    assert request.sampling.max_tokens == 5


async def test_completion_defaults_to_16_tokens_and_accepts_token_ids(server: Server) -> None:
    async with server.client() as client:
        reply = await client.completions.create(model=MODEL, prompt=[10, 11, 12])
    assert server.backend.requests[0].sampling.max_tokens == 16
    assert server.backend.requests[0].prompt_token_ids == (10, 11, 12)
    assert reply.usage is not None and reply.usage.completion_tokens == 16


async def test_completion_stream_with_usage(server: Server) -> None:
    async with server.client() as client:
        stream = await client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=100, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == SCRIPT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(server.backend.script)
    assert all("\ufffd" not in chunk.choices[0].text for chunk in chunks if chunk.choices)


async def test_chat(server: Server, tokenizer: PreTrainedTokenizerBase) -> None:
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    async with server.client() as client:
        reply = await client.chat.completions.create(model=MODEL, messages=messages)
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, max_completion_tokens=4
        )
        chunks = [chunk async for chunk in stream]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(rendered, add_special_tokens=False)
    assert reply.choices[0].message.content == SCRIPT and reply.choices[0].message.role == "assistant"
    assert reply.id.startswith("chatcmpl-")
    assert list(server.backend.requests[0].prompt_token_ids) == prompt
    assert server.backend.requests[0].sampling.max_tokens == MAX_MODEL_LEN - len(prompt)  # vLLM's default
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == decode(tokenizer, server.backend.script[:4])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.backend.requests[1].sampling.max_tokens == 4


async def test_sampling_options_reach_the_backend(server: Server) -> None:
    async with server.client() as client:
        await client.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=8,
            temperature=0.5,
            top_p=0.9,
            seed=7,
            stop=["zz", "yy"],
            user="someone",
            extra_body={"top_k": 20, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [9]},
        )
    sampling = server.backend.requests[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.5, 0.9, 20, 7)
    assert (sampling.stop, sampling.stop_token_ids) == (("zz", "yy"), (9,))
    assert (sampling.min_tokens, sampling.ignore_eos, sampling.max_tokens) == (2, True, 8)


async def test_batched_prompts_and_n(server: Server, tokenizer: PreTrainedTokenizerBase) -> None:
    async with server.client() as client:
        reply = await client.completions.create(
            model=MODEL, prompt=["one", "two three"], n=2, max_tokens=3, seed=100
        )
        stream = await client.completions.create(
            model=MODEL, prompt=["one", "two"], max_tokens=3, stream=True
        )
        streamed: dict[int, str] = {}
        async for chunk in stream:
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    assert {choice.text for choice in reply.choices} == {decode(tokenizer, server.backend.script[:3])}
    requests = server.backend.requests[:4]
    assert len({r.request_id for r in requests}) == 4
    assert [r.sampling.seed for r in requests] == [100, 101, 100, 101]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer.encode("one")) + len(tokenizer.encode("two three"))
    assert reply.usage.completion_tokens == 12
    assert streamed == {0: decode(tokenizer, server.backend.script[:3])} | {1: streamed[0]}


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_truncates_and_closes_the_backend(server: Server, stream: bool) -> None:
    async with server.client() as client:
        if stream:
            chunks = [
                c
                async for c in await client.completions.create(
                    model=MODEL, prompt="hi", max_tokens=100, stop=["world! How"], stream=True
                )
            ]
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            reply = await client.completions.create(
                model=MODEL, prompt="hi", max_tokens=100, stop="world! How"
            )
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert (text, finish) == ("Hello, ", "stop")
    request_id = server.backend.requests[0].request_id
    assert request_id in server.backend.aborted and request_id not in server.backend.completed


async def test_multibyte_stream_in_multi_token_chunks(
    serve: Serve, tokenizer: PreTrainedTokenizerBase
) -> None:
    backend = ScriptedBackend(tokenizer, "ÄÖÜ 世界 🙂🙂 ça", chunk=3)
    app = build_openai_app(
        backend,
        tokenizer,
        served_model_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        metrics=Metrics(pool="test", role="both"),
    )
    running = await serve(app)
    async with openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "ünïcödé"}], stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream]
    assert "".join(pieces) == "ÄÖÜ 世界 🙂🙂 ça"
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_generation(server: Server, stream: bool) -> None:
    server.backend.hang_after = 2
    body = {"model": MODEL, "prompt": "hi", "stream": stream}
    async with aiohttp.ClientSession() as session:
        if stream:
            async with session.post(server.url + "/v1/completions", json=body) as response:
                assert response.status == 200
                assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
        else:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(
                    server.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.5)
                )
    for _ in range(100):
        if server.outcome("cancelled"):
            break
        await asyncio.sleep(0.05)
    assert server.backend.aborted == {server.backend.requests[0].request_id}
    assert server.outcome("cancelled") == 1


async def test_a_stream_that_ended_with_done_is_a_success_whatever_the_client_does_next(
    server: Server,
) -> None:
    """The client closes the socket right after [DONE] while the backend streams are still closing."""
    server.backend.linger = asyncio.Event()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.url + "/v1/completions", json=body)
        received = b""
        while not received.endswith(b"data: [DONE]\n\n"):
            received += await response.content.readany()
        response.close()  # drops the connection
    for _ in range(100):
        if server.outcome("success") or server.outcome("cancelled"):
            break
        await asyncio.sleep(0.05)
    server.backend.linger.set()
    assert (server.outcome("success"), server.outcome("cancelled")) == (1, 0)


async def test_health_follows_the_backend(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/health") as response:
            assert response.status == 200
        server.backend.ready = False
        async with session.get(server.url + "/health") as response:
            assert response.status == 503


async def test_models(server: Server) -> None:
    async with server.client() as client:
        models = [model async for model in client.models.list()]
        assert [model.id for model in models] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("other")


async def test_metrics_after_traffic(server: Server) -> None:
    async with server.client() as client:
        stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=6, stream=True)
        assert len([chunk async for chunk in stream]) == 6
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=MODEL, prompt="")
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    labels = 'pool="test",role="router"'
    assert f"splitserve_time_to_first_token_seconds_count{{{labels}}} 1.0" in text
    assert f"splitserve_inter_token_latency_seconds_count{{{labels}}} 5.0" in text
    assert f"splitserve_e2e_request_latency_seconds_count{{{labels}}} 1.0" in text
    assert f"splitserve_generation_tokens_total{{{labels}}} 6.0" in text
    assert f"splitserve_prompt_tokens_total{{{labels}}} 2.0" in text  # "hi": 2 tokens
    assert 'splitserve_requests_total{outcome="success",pool="test",role="router"} 1.0' in text
    assert 'splitserve_requests_total{outcome="client_error",pool="test",role="router"} 1.0' in text


async def test_serve_app_stops_gracefully_on_sigterm() -> None:
    app = web.Application()
    cleaned = asyncio.Event()

    async def cleanup(app: web.Application) -> None:
        cleaned.set()

    app.on_cleanup.append(cleanup)
    server = asyncio.create_task(serve_app(app, host="127.0.0.1", port=0, shutdown_timeout=1.0))
    await asyncio.sleep(0.2)
    signal.raise_signal(signal.SIGTERM)  # the handler serve_app installed turns it into a clean stop
    await asyncio.wait_for(server, 5)
    assert cleaned.is_set()
