"""The router over fake prefill/decode workers on loopback, driven by the official `openai` client:
the happy path, discovery, picking and readiness."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
from pathlib import Path

import aiohttp
import openai
import pytest
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from splitserve.engine.model_info import context_length
from splitserve.serving.endpoints import (
    SLOW_PROBES_TOLERATED,
    Endpoint,
    Seed,
    pick_least_loaded,
    probe,
    read_discovery_file,
)
from splitserve.serving.router import (
    RouterSettings,
)
from tests.worker.conftest import Serve
from tests.worker.serving.fake_workers import FakeDecode, FakePrefill
from tests.worker.serving.router_harness import MODEL, StartRouter, eventually


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
