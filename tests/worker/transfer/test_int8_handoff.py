"""int8 KV over a real socket: the prefill worker ships its int8 rows (values and scales) as they are,
the decode worker lands them in blocks of another size, and greedy output is the one a single int8
worker computes; a prefill and a decode worker that store KV differently refuse the handoff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from splitserve.contract.config import EngineConfig
from splitserve.engine.forward import Engine
from splitserve.engine.loader import load_model
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.metrics import Metrics
from splitserve.serving.worker_app import DecodeKVSink, WorkerState, ship_kv
from splitserve.transfer.base import KVTransferError
from splitserve.transfer.frames import ErrorCode
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender
from tests.conftest import random_prompt
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, request
from tests.worker.transfer.test_handoff import make_runtime

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def float_engine(tiny_model: Path) -> Engine:
    return Engine(load_model(EngineConfig(model=str(tiny_model), threads=1)))


@contextlib.asynccontextmanager
async def running(prefill: EngineRuntime, decode: EngineRuntime) -> AsyncIterator[str]:
    """Both runtimes started and a real KV receiver in front of the decode one; yields its address."""
    receiver = TcpKVReceiver("127.0.0.1", 0, DecodeKVSink(WorkerState(Metrics("test", "decode"), decode)))
    await prefill.start()
    await decode.start()
    await receiver.start()
    try:
        yield f"127.0.0.1:{receiver.port}"
    finally:
        await receiver.close()
        await prefill.close()
        await decode.close()


async def test_int8_rows_cross_the_wire_and_decode_as_in_one_process(
    int8_engines: tuple[Engine, Engine],
) -> None:
    prompts = [random_prompt(length, seed=length) for length in (5, 17, 65, 300)]
    alone = make_runtime(int8_engines[0], "both", 16)
    await alone.start()
    try:
        expected = [
            (await collect(alone.generate(request(p, rid=f"a{i}"))))[0] for i, p in enumerate(prompts)
        ]
    finally:
        await alone.close()
    prefill, decode = make_runtime(int8_engines[0], "prefill", 16), make_runtime(int8_engines[1], "decode", 5)
    async with running(prefill, decode) as target:
        for i, prompt in enumerate(prompts):
            rid = f"s{i}"
            decode.register(rid, prompt, GREEDY)
            async with prefill.prefill(request(prompt, rid=rid)) as result:
                stats = await ship_kv(TcpKVSender(), target, rid, result)
            assert stats.bytes == len(prompt) * prefill.pool.layout.bytes_per_token  # int8 rows, as stored
            assert (await asyncio.wait_for(collect(decode.stream(rid)), 60))[0] == expected[i]
    assert_no_leaks(prefill, decode)


@pytest.mark.parametrize("int8_side", ["prefill", "decode"])
async def test_workers_storing_kv_differently_refuse_the_handoff(
    float_engine: Engine, int8_engines: tuple[Engine, Engine], int8_side: str
) -> None:
    prefill_engine, decode_engine = (
        (int8_engines[0], float_engine) if int8_side == "prefill" else (float_engine, int8_engines[1])
    )
    sent, held = ("int8", "float32") if int8_side == "prefill" else ("float32", "int8")
    prefill, decode = make_runtime(prefill_engine, "prefill", 16), make_runtime(decode_engine, "decode", 16)
    prompt = random_prompt(40, seed=11)
    async with running(prefill, decode) as target:
        decode.register("mixed", prompt, GREEDY)
        consumer = asyncio.create_task(collect(decode.stream("mixed")))
        with pytest.raises(KVTransferError, match=f"KV dtype {sent} vs {held}") as caught:
            async with prefill.prefill(request(prompt, rid="mixed")) as result:
                await ship_kv(TcpKVSender(), target, "mixed", result)
        assert caught.value.code == ErrorCode.REJECTED
        consumer.cancel()  # what the router does once the prefill call failed
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    assert_no_leaks(prefill, decode)
