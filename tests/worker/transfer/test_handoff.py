"""The KV handoff between two real runtimes in one process, over a real socket: the prefill worker's
`ship_kv` sends from its blocks, the decode worker's `DecodeKVSink` lands in its own (of another block
size, or the same), and greedy output stays `generate()`'s; broken transfers give their blocks back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from splitserve.contract.config import EngineConfig
from splitserve.contract.names import EngineRole
from splitserve.engine.forward import Engine
from splitserve.engine.loader import load_model
from splitserve.engine.params import GenerationError
from splitserve.engine.runtime import EngineRuntime
from splitserve.local.pool import free_port
from splitserve.serving.metrics import Metrics
from splitserve.serving.worker_app import DecodeKVSink, WorkerState, build_prefill_app, ship_kv
from splitserve.transfer.base import KVTransferError
from splitserve.transfer.frames import PREFIX, ErrorCode, KVHeader, encode_blocks_prefix, encode_header
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender
from tests.conftest import Reference, random_prompt
from tests.worker.conftest import Serve
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, request

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> tuple[Engine, Engine]:
    config = EngineConfig(model=str(tiny_model), threads=1)
    return Engine(load_model(config)), Engine(load_model(config))


def make_runtime(engine: Engine, role: EngineRole, block_size: int) -> EngineRuntime:
    config = EngineConfig(model="tiny", prefill_chunk_size=64, block_size=block_size, kv_cache_bytes=8 << 20)
    return EngineRuntime(engine, config, role, Metrics("test", role))


@dataclass
class Split:
    prefill: EngineRuntime
    decode: EngineRuntime
    receiver: TcpKVReceiver

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.receiver.port}"


@pytest.fixture(params=[16, 5, 64], ids=lambda size: f"decode-blocks-{size}")
async def split(engines: tuple[Engine, Engine], request: pytest.FixtureRequest) -> AsyncIterator[Split]:
    """Prefill in blocks of 16, decode in blocks of the parameter's size, a real KV receiver."""
    prefill = make_runtime(engines[0], "prefill", 16)
    decode = make_runtime(engines[1], "decode", request.param)
    receiver = TcpKVReceiver("127.0.0.1", 0, DecodeKVSink(WorkerState(Metrics("test", "decode"), decode)))
    await prefill.start()
    await decode.start()
    await receiver.start()
    try:
        yield Split(prefill, decode, receiver)
    finally:
        await receiver.close()
        await prefill.close()
        await decode.close()


async def test_greedy_output_matches_generate_across_block_sizes(split: Split, reference: Reference) -> None:
    """Prompts on and off both sides' block boundaries, shipped one after another and at once."""
    lengths = (1, 4, 5, 15, 16, 17, 64, 65, 300)
    prompts = {f"p{length}": random_prompt(length, seed=length) for length in lengths}

    async def one(rid: str, prompt: list[int]) -> list[int]:
        req = request(prompt, rid=rid)
        held = split.decode.register(rid, prompt, GREEDY).cached  # "alone" left p17's first blocks
        async with split.prefill.prefill(req) as result:
            await ship_kv(TcpKVSender(), split.target, rid, result, held)
        tokens, _ = await collect(split.decode.stream(rid))
        return tokens

    first = await one("alone", prompts["p17"])
    together = await asyncio.wait_for(asyncio.gather(*(one(rid, p) for rid, p in prompts.items())), 100)
    assert first == reference.greedy(prompts["p17"], 12)
    for prompt, tokens in zip(prompts.values(), together, strict=True):
        assert tokens == reference.greedy(prompt, 12)
    assert_no_leaks(split.prefill, split.decode)


async def raw_transfer(target: str, data: bytes) -> None:
    """Write `data` to the receiver and hang up without waiting (a sender that died mid-transfer)."""
    host, port = target.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("cut", ["begin-only", "mid-frame", "after-a-frame"])
async def test_a_truncated_transfer_frees_the_blocks_it_took(split: Split, cut: str) -> None:
    prompt = random_prompt(40, seed=4)
    split.decode.register("cut", prompt, GREEDY)
    layout = split.decode.engine.loaded.layout
    shape = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype)
    header = KVHeader.for_blocks("cut", 7, len(prompt), shape, 16, frame_bytes=1)  # one block per frame
    frame = encode_blocks_prefix(0, 16 * header.token_nbytes, 0) + bytes(16 * header.token_nbytes)
    tail = {"begin-only": b"", "mid-frame": frame[: PREFIX.size + 100], "after-a-frame": frame}[cut]
    await raw_transfer(split.target, encode_header(header) + tail)
    with pytest.raises(GenerationError, match="KV transfer failed"):
        await asyncio.wait_for(collect(split.decode.stream("cut")), 30)
    assert_no_leaks(split.decode)
    tokens, _ = await collect(split.decode.generate(request(prompt, rid="after")))
    assert tokens  # the worker keeps serving, with every block back


async def test_a_request_cancelled_while_its_cache_lands_frees_its_blocks(split: Split) -> None:
    prompt = random_prompt(40, seed=5)
    split.decode.register("gone", prompt, GREEDY)
    consumer = asyncio.create_task(collect(split.decode.stream("gone")))
    layout = split.decode.engine.loaded.layout
    shape = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype)
    header = KVHeader.for_blocks("gone", 7, len(prompt), shape, 16)
    host, port = split.target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(encode_header(header))
    await reader.readexactly(PREFIX.size)  # ACCEPT: the blocks are taken
    assert split.decode.pool.allocator.num_used > 0
    consumer.cancel()  # the client went away before the cache was in
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    writer.close()
    for _ in range(300):  # the receiver notices the closed connection on its own schedule
        if split.decode.pool.allocator.num_used == 0 and not split.decode._streams:
            break
        await asyncio.sleep(0.01)
    assert_no_leaks(split.decode)


async def test_only_the_missing_tokens_move_and_a_wrong_first_position_is_refused(
    split: Split, reference: Reference
) -> None:
    """A second prompt sharing 40 tokens with a first: the decode worker pins its cached whole blocks,
    the sender sends the rest only. A sender that disagrees on where the rest starts is refused before
    any block is taken, and the right transfer still lands after it."""
    prefix = random_prompt(40, seed=40)
    first, second = prefix + random_prompt(3, seed=41), prefix + random_prompt(30, seed=42)
    block = split.decode.pool.block_size
    sent: list[int] = []
    outputs = []
    for rid, prompt in (("first", first), ("second", second)):
        held = split.decode.register(rid, prompt, GREEDY).cached
        async with split.prefill.prefill(request(prompt, rid=rid)) as result:
            if held:
                with pytest.raises(KVTransferError) as refused:
                    await ship_kv(TcpKVSender(), split.target, rid, result, held - block)
                assert refused.value.code == ErrorCode.REJECTED and "holds the first" in refused.value.reason
            stats = await ship_kv(TcpKVSender(), split.target, rid, result, held)
        sent.append(stats.bytes // split.decode.engine.loaded.layout.bytes_per_token)
        outputs.append(await asyncio.wait_for(collect(split.decode.stream(rid)), 60))
    assert sent == [len(first), len(second) - 40 // block * block]
    for prompt, (tokens, _) in zip((first, second), outputs, strict=True):
        assert tokens == reference.greedy(prompt, 12)
    assert_no_leaks(split.prefill, split.decode)


async def test_the_prefill_app_counts_failed_sends_and_refuses_skipping_the_whole_prompt(
    split: Split, serve: Serve
) -> None:
    """Its /internal/prefill: a decode worker that is not there is a 502 counted as `unavailable`, one
    that does not expect the request as `rejected`; skip_tokens covering the whole prompt is a 400."""
    metrics = Metrics("test", "prefill")
    app = await serve(build_prefill_app(WorkerState(metrics, split.prefill), TcpKVSender()))
    nobody = f"127.0.0.1:{free_port()}"
    call = {"prompt_token_ids": [5, 6, 7], "sampling": {"max_tokens": 2, "temperature": 0.0}}
    cases = [("a", nobody, 0, 502), ("b", split.target, 0, 502), ("c", split.target, 3, 400)]
    async with aiohttp.ClientSession() as session:
        for rid, target, skip, status in cases:
            body = {**call, "request_id": rid, "kv_target": target, "skip_tokens": skip}
            async with session.post(app.url + "/internal/prefill", json=body) as reply:
                assert reply.status == status, await reply.text()
                if status == 400:
                    assert (await reply.json())["error"]["param"] == "skip_tokens"
    failures = {
        reason: metrics.registry.get_sample_value(
            "splitserve_kv_transfer_failures_total", {"pool": "test", "role": "prefill", "reason": reason}
        )
        for reason in ("unavailable", "rejected", "protocol")
    }
    assert failures == {"unavailable": 1.0, "rejected": 1.0, "protocol": 0.0}
    assert_no_leaks(split.prefill)
