"""The router over fake prefill/decode workers on loopback, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from splitserve.contract.config import RoutingConfig
from splitserve.contract.names import MIGRATIONS, MigrationOutcome
from splitserve.engine.model_info import context_length
from splitserve.serving.endpoints import (
    SLOW_PROBES_TOLERATED,
    Endpoint,
    Seed,
    pick_least_loaded,
    probe,
    read_discovery_file,
)
from splitserve.serving.metrics import Metrics
from splitserve.serving.router import (
    BACKEND_KEY,
    RouterBackend,
    RouterSettings,
    build_router_app,
)
from tests.worker.conftest import Serve
from tests.worker.serving.fake_workers import FakeDecode, FakePrefill, expected_tokens

MODEL = "tiny"
StartRouter = Callable[..., Awaitable["Router"]]


class Router:
    def __init__(self, url: str, backend: RouterBackend, tokenizer: PreTrainedTokenizerBase) -> None:
        self.url, self.backend, self.tokenizer = url, backend, tokenizer

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=10)

    def expected(self, prompt: str, max_tokens: int) -> str:
        ids = expected_tokens(len(self.tokenizer.encode(prompt)), max_tokens)
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def urls(self, role: str) -> list[str]:
        return sorted(endpoint["url"] for endpoint in self.backend.snapshot()[role])

    def in_flight(self, role: str) -> int:
        return sum(endpoint["in_flight"] for endpoint in self.backend.snapshot()[role])

    def healthy(self, role: str) -> dict[str, bool]:
        return {endpoint["url"]: endpoint["healthy"] for endpoint in self.backend.snapshot()[role]}


@pytest.fixture
def start_router(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> StartRouter:
    """A router over the given worker URLs, with fast polling and short timeouts."""

    async def start(
        prefill: list[str] | None = None, decode: list[str] | None = None, **settings: Any
    ) -> Router:
        resolver = settings.pop("resolver", _literal_resolver)
        options: dict[str, Any] = {
            "health_interval_s": 0.1,
            "discovery_interval_s": 0.1,
            "connect_timeout_s": 1.0,
            "first_token_timeout_s": 5.0,
            "idle_timeout_s": 5.0,
        } | settings
        config = RouterSettings(
            model=MODEL, max_model_len=512, prefill=prefill or [], decode=decode or [], **options
        )
        app = build_router_app(
            config, tokenizer=tokenizer, metrics=Metrics(pool="test", role="router"), resolver=resolver
        )
        running = await serve(app)
        return Router(running.url, app[BACKEND_KEY], tokenizer)

    return start


async def _literal_resolver(host: str, port: int) -> list[str]:
    return [host]


def migrations(backend: RouterBackend, outcome: MigrationOutcome) -> float:
    """The router's MIGRATIONS counter of one outcome."""
    labels = {"pool": "test", "role": "router", "outcome": outcome}
    return backend.metrics.registry.get_sample_value(MIGRATIONS, labels) or 0.0


async def eventually(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_happy_path(
    serve: Serve, start_router: StartRouter, tokenizer: PreTrainedTokenizerBase
) -> None:
    prefill, decode = await FakePrefill().start(serve), await FakeDecode().start(serve)
    router = await start_router([prefill.url], [decode.url])
    async with router.client() as client:
        reply = await client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5)
        stream = await client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, stream=True)
        streamed = "".join([chunk.choices[0].text async for chunk in stream])
        chat = await client.chat.completions.create(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        )
    assert reply.choices[0].text == router.expected("Hello there", 5)
    assert reply.choices[0].finish_reason == "length"
    assert streamed == router.expected("Hello there", 7)
    assert chat.choices[0].message.content
    registered, sent = decode.registered[0], prefill.requests[0]
    assert registered["request_id"] == sent["request_id"] == reply.id
    assert registered["prompt_token_ids"] == tokenizer.encode("Hello there")
    assert registered["sampling"]["max_tokens"] == 5
    assert sent["prompt_token_ids"] == tokenizer.encode("Hello there")
    assert sent["kv_target"] == f"127.0.0.1:{decode.kv_port}"
    assert decode.finished == {r["request_id"] for r in decode.registered}
    async with aiohttp.ClientSession() as session, session.get(router.url + "/health") as response:
        assert response.status == 200
    await eventually(lambda: router.in_flight("decode") == 0, "the decode slots freed")


async def test_decode_worker_death_fails_only_its_streams(serve: Serve, start_router: StartRouter) -> None:
    """With migration off (`migration_limit: 0`); test_migration.py has it on."""
    prefill = await FakePrefill().start(serve)
    doomed, survivor = [await FakeDecode(token_delay=0.05).start(serve) for _ in range(2)]
    no_migration = RoutingConfig(migration_limit=0)
    router = await start_router([prefill.url], [doomed.url, survivor.url], routing=no_migration)
    progress = [asyncio.Event() for _ in range(4)]

    async def consume(index: int, client: openai.AsyncOpenAI) -> tuple[str, str, str | None]:
        stream = await client.completions.create(model=MODEL, prompt="stream", max_tokens=40, stream=True)
        request_id, text = "", ""
        try:
            async for chunk in stream:
                request_id, text = chunk.id, text + chunk.choices[0].text
                if len(text) >= 2:
                    progress[index].set()
        except openai.APIError as error:
            return request_id, text, error.message
        return request_id, text, None

    async with router.client() as client:
        streams = [asyncio.create_task(consume(i, client)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in progress)), 10)
        await doomed.die()
        results = await asyncio.wait_for(asyncio.gather(*streams), 10)
        on_doomed = {r["request_id"] for r in doomed.registered}
        assert 0 < len(on_doomed) < 4
        for request_id, text, error in results:
            if request_id in on_doomed:
                assert error is not None and "failed mid-stream" in error and doomed.url in error
            else:
                assert (error, text) == (None, router.expected("stream", 40))
        assert router.healthy("decode") == {doomed.url: False, survivor.url: True}
        assert migrations(router.backend, "exhausted") == len(on_doomed)
        for _ in range(3):
            reply = await client.completions.create(model=MODEL, prompt="after", max_tokens=3)
            assert reply.choices[0].text == router.expected("after", 3)
    assert len(survivor.registered) == 4 - len(on_doomed) + 3


async def test_prefill_that_dies_mid_request_is_routed_around(
    serve: Serve, start_router: StartRouter
) -> None:
    dying, healthy = await FakePrefill("die").start(serve), await FakePrefill().start(serve)
    decode = await FakeDecode().start(serve)
    router = await start_router([dying.url, healthy.url], [decode.url])
    async with router.client() as client:
        for _ in range(3):
            reply = await client.completions.create(model=MODEL, prompt="retry me", max_tokens=4)
            assert reply.choices[0].text == router.expected("retry me", 4)
    assert dying.requests, "the dying worker should have been tried"
    assert any(".retry1" in r["request_id"] for r in healthy.requests)
    # Each failed handoff's decode registration was closed, so the decode worker freed it.
    retried = {r["request_id"] for r in dying.requests}
    await eventually(lambda: retried <= decode.disconnected, "the abandoned decode registrations closed")


async def test_prefill_that_refuses_connections_is_routed_around(
    serve: Serve, start_router: StartRouter
) -> None:
    gone, alive = await FakePrefill().start(serve), await FakePrefill().start(serve)
    decode = await FakeDecode().start(serve)
    router = await start_router([gone.url, alive.url], [decode.url], health_interval_s=60)
    assert router.healthy("prefill") == {gone.url: True, alive.url: True}
    await gone.die()  # the router has not noticed: its next poll is a minute away
    async with router.client() as client:
        for _ in range(2):
            reply = await client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
            assert reply.choices[0].text == router.expected("hello", 2)
    assert router.healthy("prefill") == {gone.url: False, alive.url: True}
    assert len(alive.requests) == 2


async def test_prefill_server_errors_are_retried_and_reported(
    serve: Serve, start_router: StartRouter
) -> None:
    failing = await FakePrefill("fail").start(serve)
    decode = await FakeDecode().start(serve)
    router = await start_router([failing.url], [decode.url])
    async with router.client() as client:
        with pytest.raises(openai.APIStatusError, match="out of memory") as caught:
            await client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert caught.value.status_code in (502, 503)
    assert len(failing.requests) == 1  # the only prefill worker is not asked twice


async def test_worker_4xx_is_returned_not_retried(serve: Serve, start_router: StartRouter) -> None:
    rejecting = await FakePrefill("reject").start(serve)
    decode = await FakeDecode(kv_budget_tokens=20).start(serve)
    router = await start_router([rejecting.url], [decode.url])
    async with router.client() as client:
        with pytest.raises(openai.BadRequestError, match="exceed the KV budget"):
            await client.completions.create(model=MODEL, prompt="hello", max_tokens=100)
        with pytest.raises(openai.BadRequestError, match="out of range"):
            await client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert len(rejecting.requests) == 1
    assert router.healthy("prefill") == {rejecting.url: True}


async def test_a_request_fault_is_returned_not_retried(serve: Serve, start_router: StartRouter) -> None:
    """A 5xx marked REQUEST_FAULT failed alone on a healthy worker: the next one would fail the same."""
    faulty = [await FakePrefill("fault").start(serve) for _ in range(2)]
    decode = await FakeDecode().start(serve)
    router = await start_router([worker.url for worker in faulty], [decode.url])
    async with router.client() as client:
        with pytest.raises(openai.InternalServerError, match="sampling failed") as caught:
            await client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert caught.value.status_code == 500
    assert sum(len(worker.requests) for worker in faulty) == 1
    assert set(router.healthy("prefill").values()) == {True}


async def test_decode_error_line_is_relayed(serve: Serve, start_router: StartRouter) -> None:
    prefill, decode = await FakePrefill().start(serve), await FakeDecode(error_after=2).start(serve)
    router = await start_router([prefill.url], [decode.url])
    async with router.client() as client:
        stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=10, stream=True)
        with pytest.raises(openai.APIError, match="KV cache corrupted"):
            async for _ in stream:
                pass
    assert router.healthy("decode") == {decode.url: True}  # a failed request is not a failed worker


async def test_client_disconnect_during_prefill_closes_both_connections(
    serve: Serve, start_router: StartRouter
) -> None:
    prefill, decode = await FakePrefill("hang").start(serve), await FakeDecode().start(serve)
    router = await start_router([prefill.url], [decode.url])
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(
                router.url + "/v1/completions",
                json={"model": MODEL, "prompt": "hi"},
                timeout=aiohttp.ClientTimeout(total=0.5),
            )
    request_id = prefill.requests[0]["request_id"]
    await eventually(
        lambda: request_id in prefill.disconnected and request_id in decode.disconnected,
        "both workers to see the disconnect",
    )
    await eventually(lambda: router.in_flight("decode") == 0, "the decode slot freed")


async def test_client_disconnect_mid_stream_closes_the_decode_stream(
    serve: Serve, start_router: StartRouter
) -> None:
    prefill, decode = await FakePrefill().start(serve), await FakeDecode(token_delay=0.1).start(serve)
    router = await start_router([prefill.url], [decode.url])
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 50, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(router.url + "/v1/completions", json=body) as response,
    ):
        assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
    request_id = decode.registered[0]["request_id"]
    await eventually(lambda: request_id in decode.disconnected, "the decode worker to see the disconnect")
    assert request_id not in decode.finished


async def test_discovery_file_adds_and_removes_endpoints(
    serve: Serve, start_router: StartRouter, tmp_path: Path
) -> None:
    prefill = await FakePrefill().start(serve)
    first, second = await FakeDecode().start(serve), await FakeDecode().start(serve)
    path = tmp_path / "workers.json"
    versions = itertools.count(1)

    def write(data: str) -> None:  # a distinct mtime each time, however coarse the file system's clock
        path.write_text(data)
        stamp = 10**18 + next(versions) * 10**9
        os.utime(path, ns=(stamp, stamp))

    write(json.dumps({"prefill": [prefill.url], "decode": [first.url]}))
    router = await start_router(discovery_file=path)
    assert router.urls("decode") == [first.url] and router.backend.is_ready()
    write(json.dumps({"prefill": [prefill.url], "decode": [second.url]}))
    await eventually(lambda: router.urls("decode") == [second.url], "the new decode worker")
    await eventually(router.backend.is_ready, "the new decode worker to be probed")
    write("{not json")  # a half-written file keeps the last good endpoints
    await asyncio.sleep(0.3)
    assert router.urls("decode") == [second.url]
    async with router.client() as client:
        await client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert len(second.registered) == 1 and not first.registered


async def test_hostname_seed_expands_to_every_address_and_follows_scaling(
    serve: Serve, start_router: StartRouter
) -> None:
    prefill = await FakePrefill().start(serve)
    one = await FakeDecode(token_delay=0.05).start(serve)
    two = await FakeDecode(token_delay=0.05).start(serve, host="127.0.0.2", port=one.port)
    service = {"decode.pool.svc.cluster.local": ["127.0.0.1", "127.0.0.2"]}

    async def resolver(host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            return list(service[host])

    seed = f"http://decode.pool.svc.cluster.local:{one.port}"
    router = await start_router([prefill.url], [seed], resolver=resolver)
    assert router.urls("decode") == [one.url, two.url]
    async with router.client() as client:
        replies = await asyncio.gather(
            *(client.completions.create(model=MODEL, prompt="p", max_tokens=5) for _ in range(4))
        )
        assert {reply.choices[0].text for reply in replies} == {router.expected("p", 5)}
        assert one.registered and two.registered
        assert {r["kv_target"] for r in prefill.requests} == {
            f"127.0.0.1:{one.kv_port}",
            f"127.0.0.2:{two.kv_port}",
        }
        service["decode.pool.svc.cluster.local"] = ["127.0.0.2"]  # scaled down to one pod
        await eventually(lambda: router.urls("decode") == [two.url], "the scale-down")


async def test_not_ready_without_workers(start_router: StartRouter) -> None:
    router = await start_router(["http://127.0.0.1:9"], ["http://127.0.0.1:9"])
    assert not router.backend.is_ready()
    async with aiohttp.ClientSession() as session, session.get(router.url + "/health") as response:
        assert response.status == 503
    async with router.client() as client:
        with pytest.raises(openai.APIStatusError, match="no healthy decode worker") as caught:
            await client.completions.create(model=MODEL, prompt="hello")
    assert caught.value.status_code == 503


def test_least_loaded_pick() -> None:
    a, b, c = (
        Endpoint("decode", "10.0.0.1", 1),
        Endpoint("decode", "10.0.0.2", 1),
        Endpoint("decode", "10.0.0.3", 1),
    )
    for endpoint in (a, b, c):
        endpoint.healthy = True
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 1
    b.reported_load, c.reported_load = 5, 3
    assert pick_least_loaded([a, b, c], set()) is c
    assert pick_least_loaded([a, b, c], {c.url}) is b
    c.healthy = False
    b.last_pick, a.in_flight = 9, 1
    a.reported_load = 5
    assert pick_least_loaded([a, b, c], set()) is a  # a tie goes to the one picked longest ago
    assert pick_least_loaded([c], set()) is None


def test_settings_and_discovery_file_validation(tmp_path: Path) -> None:
    assert Seed.parse("decode.svc:8001") == Seed("decode.svc", 8001)
    assert Seed.parse("http://[::1]:8001") == Seed("::1", 8001)
    for bad in ("https://decode.svc", "http://decode.svc/v1", "http://decode.svc:port", "http://:80"):
        with pytest.raises(ValueError, match="expected http://HOST:PORT"):
            Seed.parse(bad)
    with pytest.raises(ValidationError, match="--discovery-file"):
        RouterSettings(model=MODEL, prefill=["http://a:1"])
    with pytest.raises(ValidationError, match="expected http"):
        RouterSettings(model=MODEL, prefill=["ftp://a:1"], decode=["http://b:2"])
    path = tmp_path / "workers.json"
    path.write_text('{"prefill": "http://a:1"}')
    with pytest.raises(ValueError, match="expected"):
        read_discovery_file(path)
    path.write_text('{"prefill": ["http://a:1"], "decode": ["b:2"]}')
    assert read_discovery_file(path) == {"prefill": [Seed("a", 1)], "decode": [Seed("b", 2)]}


async def test_slow_health_answers_are_tolerated_a_refused_one_is_not(serve: Serve) -> None:
    worker = await FakeDecode().start(serve)
    worker.health_delay = 0.3
    endpoint = Endpoint("decode", "127.0.0.1", worker.port, healthy=True)
    async with aiohttp.ClientSession() as session:
        for _ in range(SLOW_PROBES_TOLERATED - 1):
            await probe(session, endpoint, 0.05)
        assert endpoint.healthy
        await probe(session, endpoint, 0.05)
        assert not endpoint.healthy
        worker.health_delay = 0.0
        await probe(session, endpoint, 1.0)
        assert endpoint.healthy and endpoint.slow_probes == 0
        await worker.die()
        await probe(session, endpoint, 1.0)
        assert not endpoint.healthy


def test_context_window_comes_from_the_model_config(tiny_model: Path) -> None:
    assert context_length(str(tiny_model)) == 8192
