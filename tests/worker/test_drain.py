"""Scale-down that loses no stream: SIGTERM drains a decode worker (real processes on 127.0.0.1).

The official `openai` client streams greedy completions through the router; transformers' `generate()`
is the truth. `LocalPool.scale` does what a Deployment scale-down does: it picks the emptiest worker,
takes it out of discovery and sends SIGTERM; the worker turns not-ready, refuses new work (the router
retries it elsewhere) and finishes its streams before it exits.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types import Completion

from splitserve.local.pool import LocalProcess, emptiest
from splitserve.serving.internal_api import KV_PORT_HEADER
from splitserve.transfer.frames import (
    FrameType,
    checksum,
    encode_blocks_prefix,
    encode_frame,
    encode_header,
)
from tests.conftest import Reference, random_prompt
from tests.worker.test_e2e import MODEL, client, http_get, registration, start_pool, tiny_header

pytestmark = pytest.mark.slow
TOKENS = 200  # mid-stream when the scale-down starts; short of float drift against generate()


def test_emptiest_goes_first_whatever_the_age() -> None:
    old, new, unknown = (LocalProcess(n, 0, [], Path(n)) for n in ("old", "new", "unknown"))
    assert emptiest([old, new], [1.0, 4.0], 1) == [old]  # the older one, because it is emptier
    assert emptiest([old, new], [2.0, 2.0], 1) == [new]  # a tie: the newest
    assert emptiest([old, new, unknown], [0.0, 3.0, None], 2) == [unknown, old]


def open_stream(api: openai.OpenAI, seed: int) -> tuple[list[int], Iterator[Completion]]:
    prompt = random_prompt(12, seed=seed)
    stream = api.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        extra_body={"min_tokens": TOKENS, "return_token_ids": True},  # EOS masked, as generate() does
    )
    return prompt, iter(stream)


def read_all(first: Completion, rest: Iterator[Completion]) -> list[int] | str:
    """The stream's token ids, or the error that ended it."""
    ids: list[int] = []
    try:
        for chunk in (first, *rest):
            for choice in chunk.choices:
                ids += getattr(choice, "token_ids", None) or []
    except openai.APIError as error:
        return f"error: {error}"
    return ids


def first_difference(got: list[int] | str, want: list[int]) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )


def test_decode_scale_down_mid_stream_loses_nothing(
    tiny_model: Path, tmp_path: Path, reference: Reference
) -> None:
    pool = start_pool(tiny_model, tmp_path, prefill=1, decode=2)
    try:
        api = client(pool)
        early = [open_stream(api, seed) for seed in range(5)]
        firsts = [
            next(iterator) for _, iterator in early
        ]  # all five run: three on one worker, two on the other
        loads = {
            worker.name: (lambda load: load["running"] + load["waiting"])(
                json.loads(http_get(worker.url + "/load"))
            )
            for worker in pool.workers["decode"]
        }
        assert sorted(loads.values()) == [2, 3], loads  # unequal on purpose

        scaled = threading.Thread(target=lambda: asyncio.run(pool.scale("decode", 1)))
        scaled.start()
        # Three more while the worker drains: it refuses them (503) and the router retries elsewhere.
        late = [open_stream(api, seed) for seed in range(5, 8)]
        firsts += [next(iterator) for _, iterator in late]
        streams = early + late
        with ThreadPoolExecutor(len(streams)) as threads:
            results = list(
                threads.map(lambda pair: read_all(pair[0], pair[1][1]), zip(firsts, streams, strict=True))
            )
        scaled.join(timeout=120)
        assert not scaled.is_alive()

        failed = [result for result in results if isinstance(result, str)]
        assert failed == []
        expected = [reference.greedy(prompt, TOKENS, ignore_eos=True) for prompt, _ in streams]
        differ = [i for i, (got, want) in enumerate(zip(results, expected, strict=True)) if got != want]
        assert differ == [], [(i, first_difference(results[i], expected[i])) for i in differ]
        (survivor,) = pool.workers["decode"]
        assert loads[survivor.name] == 3  # the worker with fewer streams went
        leaving = next(p for p in tmp_path.glob("logs/decode-*.log") if p.stem != survivor.name)
        log = leaving.read_text()
        assert "draining" in log and "drained" in log and "drain deadline passed" not in log
    finally:
        asyncio.run(pool.stop())


def test_sigterm_mid_transfer_finishes_the_transfer_and_its_stream(tiny_model: Path, tmp_path: Path) -> None:
    """Half a KV cache is in, SIGTERM arrives: the worker refuses new work but takes the rest of
    this transfer and streams its tokens, then exits cleanly."""
    pool = start_pool(tiny_model, tmp_path, prefill=1, decode=1)
    try:
        (decode,) = pool.workers["decode"]
        lines = asyncio.run(transfer_across_sigterm(decode))
        assert all("error" not in line for line in lines), lines
        assert sum(len(line.get("token_ids", [])) for line in lines) == 4
        assert decode.process is not None and decode.process.wait(60) == 0
        log = decode.log_path.read_text()
        assert "drained" in log and "drain deadline passed" not in log
    finally:
        asyncio.run(pool.stop())


async def transfer_across_sigterm(decode: LocalProcess) -> list[dict[str, object]]:
    """Register, push two of four layers, SIGTERM, check the refusal, push the rest; the reply lines."""
    sampling = {"max_tokens": 4, "temperature": 0.0}
    header = tiny_header("mid-transfer")
    layer = bytes(header.num_tokens * header.token_nbytes)
    async with aiohttp.ClientSession() as session:
        reply = await registration(session, decode.url, "mid-transfer", sampling)
        _, writer = await asyncio.open_connection("127.0.0.1", int(reply.headers[KV_PORT_HEADER]))
        writer.write(encode_header(header))
        for index in range(2):
            writer.write(encode_blocks_prefix(index, len(layer), checksum(layer)) + layer)
        await writer.drain()

        assert decode.process is not None
        decode.process.send_signal(signal.SIGTERM)
        for _ in range(300):  # the signal's delivery gives nothing to await
            if (await session.get(decode.url + "/health")).status == 503:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("still ready 30 s after SIGTERM")
        assert (await session.get(decode.url + "/health?live=1")).status == 200  # alive: no restart
        new = {"request_id": "new", "prompt_token_ids": [5, 6, 7], "sampling": sampling}
        refused = await session.post(decode.url + "/internal/decode", json=new)
        assert refused.status == 503 and "draining" in await refused.text()

        for index in range(2, 4):
            writer.write(encode_blocks_prefix(index, len(layer), checksum(layer)) + layer)
        writer.write(encode_frame(FrameType.END))
        await writer.drain()
        lines = [json.loads(line) async for line in reply.content if line.strip()]
        writer.close()
        return lines
