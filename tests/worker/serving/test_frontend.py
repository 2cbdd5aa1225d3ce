"""The OpenAI frontend over a scripted backend, on loopback, with the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from transformers import PreTrainedTokenizerBase

from splitserve.engine.params import GenerationChunk, GenerationError, GenerationRequest
from splitserve.serving.frontend import build_openai_app
from splitserve.serving.http import serve_app
from splitserve.serving.metrics import Metrics
from tests.worker.conftest import Serve

MODEL = "tiny"
MAX_MODEL_LEN = 256
MAX_BODY = 64 * 1024
SCRIPT = "Hello, world! How are you today? 世界 🙂"


class ScriptedBackend:
    """Yields the tokens of a fixed text, and records how every generation ended."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text: str = SCRIPT,
        *,
        chunk: int = 1,
        hang_after: int | None = None,
        fail_at: int | None = None,
    ) -> None:
        self.script: list[int] = tokenizer.encode(text)
        self.chunk, self.hang_after, self.fail_at = chunk, hang_after, fail_at
        self.ready = True
        self.requests: list[GenerationRequest] = []
        self.aborted: set[str] = set()
        self.completed: set[str] = set()
        self.linger: asyncio.Event | None = None  # set: closing a generation waits for it

    def is_ready(self) -> bool:
        return self.ready

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        limit = min(request.sampling.max_tokens, len(self.script))
        finish = "length" if request.sampling.max_tokens <= len(self.script) else "stop"
        try:
            for start in range(0, limit, self.chunk):
                if self.fail_at is not None and start >= self.fail_at:
                    raise GenerationError("decode worker 10.0.0.7 died", status=503, kind="server_error")
                if self.hang_after is not None and start >= self.hang_after:
                    await asyncio.sleep(30)  # until the client's disconnect cancels us
                end = min(start + self.chunk, limit)
                yield GenerationChunk(
                    token_ids=tuple(self.script[start:end]), finish_reason=finish if end == limit else None
                )
            self.completed.add(request.request_id)
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.add(request.request_id)
            raise
        finally:
            if self.linger is not None:
                await self.linger.wait()


class Server:
    def __init__(self, backend: ScriptedBackend, url: str, metrics: Metrics) -> None:
        self.backend, self.url, self.metrics = backend, url, metrics

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=10)

    def outcome(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "splitserve_requests_total", {"pool": "test", "role": "router", "outcome": outcome}
        )
        return value or 0.0

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(self.url + path, json=body) as response:
            return response.status, await response.json()


@pytest.fixture
def backend(tokenizer: PreTrainedTokenizerBase) -> ScriptedBackend:
    return ScriptedBackend(tokenizer)


@pytest.fixture
async def server(serve: Serve, backend: ScriptedBackend, tokenizer: PreTrainedTokenizerBase) -> Server:
    metrics = Metrics(pool="test", role="router")
    app = build_openai_app(
        backend,
        tokenizer,
        served_model_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        metrics=metrics,
        max_body_bytes=MAX_BODY,
    )
    running = await serve(app)
    return Server(backend, running.url, metrics)


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


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
