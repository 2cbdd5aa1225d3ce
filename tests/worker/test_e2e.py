"""The data plane for real: router, prefill and decode workers as processes on 127.0.0.1.

The official `openai` client is the client; transformers' `generate()` in this process is the truth.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import openai
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from splitserve.contract.config import EngineConfig, RoutingConfig
from splitserve.local.pool import LocalPool, free_port
from splitserve.serving.internal_api import KV_PORT_HEADER
from splitserve.transfer.frames import KVHeader, encode_blocks_prefix, encode_header
from tests.conftest import Reference, random_prompt, subprocess_env

pytestmark = pytest.mark.slow
MODEL = "tiny"


def start_pool(
    tiny_model: Path, workdir: Path, prefill: int, decode: int, routing: RoutingConfig | None = None
) -> LocalPool:
    """The pool; by default every prompt is prefilled on a prefill worker while one is up (these tests
    are about the handoff), `routing` to place short prompts on the decode worker."""
    config = EngineConfig(
        model=str(tiny_model),
        served_model_name=MODEL,
        max_model_len=2048,
        kv_cache_bytes=256 << 20,
        kv_timeout_seconds=20,
        routing=routing or RoutingConfig(local_prefill_max_tokens=0),
    )
    pool = LocalPool(
        "e2e",
        config,
        workdir,
        free_port(),
        threads={"prefill": 1, "decode": 1},
        progress=lambda _: None,
        env=subprocess_env(),
    )
    try:
        asyncio.run(pool.start(prefill=prefill, decode=decode))
    except BaseException:
        asyncio.run(pool.stop())
        raise
    return pool


@pytest.fixture(scope="module")
def pool(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPool]:
    pool = start_pool(tiny_model, tmp_path_factory.mktemp("pool"), prefill=1, decode=1)
    yield pool
    asyncio.run(pool.stop())


def client(pool: LocalPool) -> openai.OpenAI:
    return openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def complete(pool: LocalPool, prompt: list[int], stream: bool, max_tokens: int = 16) -> tuple[str, int]:
    """Greedy completion of token ids; (text, completion tokens) however it travelled."""
    api = client(pool)
    if not stream:
        reply = api.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert reply.usage is not None
        return reply.choices[0].text, reply.usage.completion_tokens
    text, usage = "", 0
    for chunk in api.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        text += "".join(choice.text for choice in chunk.choices)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, usage


def http_get(url: str) -> str:
    async def fetch() -> str:
        async with aiohttp.ClientSession() as session, session.get(url) as reply:
            return await reply.text()

    return asyncio.run(fetch())


def metric(url: str, name: str) -> float:
    """Sum of one metric's samples on a process's /metrics."""
    body = http_get(url + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_disaggregated_greedy_output_matches_generate(
    pool: LocalPool, reference: Reference, tokenizer: PreTrainedTokenizerBase, stream: bool
) -> None:
    """Ten concurrent requests of several prompt lengths: router -> prefill -> KV over TCP -> decode.
    48 tokens each, so that streams whose prompts finish prefill at different times still overlap in
    decode (with 16, a slow machine saw a mean batch of 1.47)."""
    prompts = [random_prompt(length, seed=length) for length in (1, 9, 40, 130, 300, 700, 2, 64, 255, 500)]
    steps_before = metric(pool.workers["decode"][0].url, "splitserve_decode_step_seconds_count")
    tokens_before = metric(pool.workers["decode"][0].url, "splitserve_decode_tokens_total")
    with ThreadPoolExecutor(len(prompts)) as threads:
        results = list(threads.map(lambda prompt: complete(pool, prompt, stream, max_tokens=48), prompts))
    for prompt, (text, count) in zip(prompts, results, strict=True):
        tokens = reference.greedy(prompt, 48)
        assert (text, count) == (expected_text(tokenizer, tokens), len(tokens))
    steps = metric(pool.workers["decode"][0].url, "splitserve_decode_step_seconds_count") - steps_before
    tokens = metric(pool.workers["decode"][0].url, "splitserve_decode_tokens_total") - tokens_before
    assert tokens / steps > 1.5, "decode steps should carry several sequences at once"


def test_block_boundaries_and_a_long_prompt_match_generate_and_free_every_block(
    pool: LocalPool, reference: Reference, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Prompts one short of, exactly on and one past 16-token block boundaries, and one of 1,900
    tokens, through router -> prefill -> KV over TCP -> decode; afterwards no worker holds a block."""
    prompts = [random_prompt(length, seed=length) for length in (15, 16, 17, 32, 33, 1900)]
    with ThreadPoolExecutor(len(prompts)) as threads:
        results = list(threads.map(lambda prompt: complete(pool, prompt, True, max_tokens=20), prompts))
    for prompt, (text, count) in zip(prompts, results, strict=True):
        tokens = reference.greedy(prompt, 20)
        assert (text, count) == (expected_text(tokenizer, tokens), len(tokens))
    for worker in (*pool.workers["prefill"], *pool.workers["decode"]):
        assert kv_blocks(http_get(worker.url + "/metrics"))["used"] == 0


def kv_blocks(exposition: str) -> dict[str, float]:
    """`splitserve_kv_cache_blocks` by state, from a worker's /metrics body."""
    blocks = {
        line.split('state="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith("splitserve_kv_cache_blocks{")
    }
    assert blocks["free"] > 0
    return blocks


def test_chat_completion_uses_the_chat_template(
    pool: LocalPool, reference: Reference, tokenizer: PreTrainedTokenizerBase
) -> None:
    messages = [{"role": "user", "content": "What is disaggregated prefill?"}]
    reply = client(pool).chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert reply.choices[0].message.content == expected_text(tokenizer, reference.greedy(list(prompt), 12))


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": MODEL, "prompt": "", "max_tokens": 4}, 400),
        ({"model": MODEL, "prompt": "hi " * 1200, "max_tokens": 4}, 400),  # past the 2048-token window
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400),
        ({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, 404),
        (b"{not json", 400),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": 1e-45}, 400),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [2**70]}, 400),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "stop": "y" * 200_000}, 400),
    ],
    ids=[
        "empty-prompt",
        "past-context",
        "max-tokens-zero",
        "max-tokens-type",
        "unknown-model",
        "bad-json",
        "tiny-temperature",
        "stop-id-past-vocabulary",
        "long-stop-string",
    ],
)
def test_bad_input_gets_an_openai_error_and_disturbs_nothing(
    pool: LocalPool, body: dict[str, object] | bytes, status: int
) -> None:
    async def post() -> tuple[int, dict[str, object]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                pool.url + "/v1/completions", data=data, headers={"Content-Type": "application/json"}
            ) as reply,
        ):
            return reply.status, await reply.json()

    got_status, payload = asyncio.run(post())
    assert got_status == status
    error = payload["error"]
    assert isinstance(error, dict) and error["message"] and error["type"]
    _, count = complete(pool, [5, 6, 7], stream=False, max_tokens=3)
    assert count >= 1


def test_killed_decode_worker_fails_only_its_own_streams(tiny_model: Path, tmp_path: Path) -> None:
    # Without migration (test_stream_migration.py has it on): the dead worker's streams end in an error.
    routing = RoutingConfig(local_prefill_max_tokens=0, migration_limit=0)
    pool = start_pool(tiny_model, tmp_path, prefill=1, decode=2, routing=routing)
    try:
        api = client(pool)
        streams = [
            api.completions.create(
                model=MODEL,
                prompt=random_prompt(20, seed=i),
                max_tokens=1500,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for i in range(6)
        ]
        iterators = [iter(stream) for stream in streams]
        for iterator in iterators:
            next(iterator)  # every stream is running
        victim, survivor = pool.workers["decode"]
        on_victim = json.loads(http_get(victim.url + "/load"))["running"]
        assert 1 <= on_victim <= 5
        victim.kill()

        def finish(iterator: Iterator[object]) -> str:
            try:
                for _ in iterator:
                    pass
            except openai.APIError as error:
                return f"error: {error}"
            return "done"

        with ThreadPoolExecutor(6) as threads:
            outcomes = list(threads.map(finish, iterators))
        assert sum(outcome.startswith("error") for outcome in outcomes) == on_victim
        assert all("decode worker" in outcome for outcome in outcomes if outcome.startswith("error"))
        for i in range(4):  # new requests go to the survivor
            assert complete(pool, random_prompt(8, seed=50 + i), stream=True, max_tokens=4)[1] == 4
        assert json.loads(http_get(survivor.url + "/load"))["running"] == 0
        assert kv_blocks(http_get(survivor.url + "/metrics"))["used"] == 0
    finally:
        asyncio.run(pool.stop())


def test_dead_prefill_worker_is_routed_around(tiny_model: Path, tmp_path: Path) -> None:
    pool = start_pool(tiny_model, tmp_path, prefill=2, decode=1)
    try:
        pool.workers["prefill"][0].kill()
        with ThreadPoolExecutor(6) as threads:
            results = list(
                threads.map(
                    lambda i: complete(pool, random_prompt(30, seed=i), stream=bool(i % 2), max_tokens=5),
                    range(6),
                )
            )
        assert [count for _, count in results] == [5] * 6
        for worker in (pool.workers["prefill"][1], pool.workers["decode"][0]):
            assert kv_blocks(http_get(worker.url + "/metrics"))["used"] == 0
    finally:
        asyncio.run(pool.stop())


async def test_malformed_kv_frames_are_rejected_and_the_decode_worker_keeps_serving(pool: LocalPool) -> None:
    decode = pool.workers["decode"][0]
    sampling = {"max_tokens": 4, "temperature": 0.0}
    async with aiohttp.ClientSession() as session:
        kv_port = int((await registration(session, decode.url, "probe", sampling)).headers[KV_PORT_HEADER])
        # 1. Garbage instead of a frame: an error reply, connection closed.
        assert b"SSKV" in await exchange(kv_port, b"GET / HTTP/1.1\r\n\r\n" * 4)
        # ... and a peer of the previous release (frame version 1) is told so.
        assert b"KV frame version 1, this side speaks 3" in await exchange(kv_port, b"SSKV\x01" + bytes(19))
        # 2. A registered request whose frame fails its checksum, or stops mid-frame: that request fails
        # and gives back the blocks it took, nothing else.
        for case in ("bad-checksum", "truncated"):
            reply = await registration(session, decode.url, case, {**sampling})
            header = tiny_header(case)
            layer = bytes(header.num_tokens * header.token_nbytes)
            frames = encode_header(header)  # a whole BEGIN frame
            if case == "bad-checksum":
                frames += encode_blocks_prefix(0, len(layer), crc=12345) + layer
            else:
                frames += encode_blocks_prefix(0, len(layer), crc=0) + layer[: len(layer) // 2]
            await exchange(kv_port, frames)
            line = json.loads(await asyncio.wait_for(reply.content.readline(), 30))
            assert "KV transfer failed" in line["error"]["message"]
            reply.close()
    _, count = complete(pool, [9, 10, 11], stream=True, max_tokens=3)
    assert count == 3
    async with aiohttp.ClientSession() as session, session.get(decode.url + "/metrics") as reply:
        assert kv_blocks(await reply.text())["used"] == 0  # the broken transfers gave their blocks back


def tiny_header(request_id: str) -> KVHeader:
    """BEGIN of a 3-token cache in the tiny model's layout, one frame per layer."""
    return KVHeader(
        request_id=request_id,
        first_token=5,
        num_tokens=3,
        num_layers=4,
        dtype=torch.float32,
        num_kv_heads=4,
        head_dim=32,
        block_size=16,
        blocks_per_frame=1,
    )


async def registration(
    session: aiohttp.ClientSession, url: str, request_id: str, sampling: dict[str, object]
) -> aiohttp.ClientResponse:
    body = {"request_id": request_id, "prompt_token_ids": [5, 6, 7], "sampling": sampling}
    reply = await session.post(url + "/internal/decode", json=body)
    assert reply.status == 200
    return reply


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to a KV receiver, half-close, and read whatever it answers (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.transport.write_eof() if writer.can_write_eof() else None
        deadline = time.monotonic() + 10
        answer = b""
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            answer += chunk
        return answer
    except (OSError, ConnectionError):
        return b""
    finally:
        writer.close()
