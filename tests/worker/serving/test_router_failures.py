"""The router over fake workers that fail: deaths, refusals, errors and disconnects stay with the
requests they hit, retried where nothing reached the client yet."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from splitserve.contract.config import RoutingConfig
from tests.worker.conftest import Serve
from tests.worker.serving.fake_workers import FakeDecode, FakePrefill
from tests.worker.serving.router_harness import MODEL, StartRouter, eventually, migrations


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
