"""A decode registration: the cached prefix it pins (and always gives back), and where the prompt is
prefilled. Local prompts run on the decode worker's own engine, chunked between its decode steps, and
match `generate()`."""

from __future__ import annotations

import asyncio

import pytest
import torch

from splitserve.engine.blocks import BlockAllocator
from splitserve.engine.forward import Engine
from splitserve.engine.kv_cache import KVLayout, KVPool
from splitserve.engine.params import GenerationError, SamplingParams
from splitserve.engine.runtime import choose_placement
from splitserve.serving.metrics import Metrics
from tests.conftest import Reference, random_prompt
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, request
from tests.worker.engine.test_paging import make_runtime

# ---- pure rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "cached", "local_max", "remote", "placement"),
    [
        (30, 0, 64, True, "local"),  # short and uncached
        (64, 0, 64, True, "local"),  # exactly the threshold
        (65, 0, 64, True, "remote"),
        (500, 448, 64, True, "local"),  # long, but only its last 52 tokens are missing here
        (500, 400, 64, True, "remote"),
        (500, 0, 0, False, "local"),  # no prefill worker left: whatever the length
        (1, 0, 0, True, "remote"),  # threshold 0: always remote while one is up
    ],
)
def test_placement_follows_the_uncached_rest(
    prompt_len: int, cached: int, local_max: int, remote: bool, placement: str
) -> None:
    assert choose_placement(prompt_len, cached, local_max, remote) == placement


def test_share_holds_the_cached_run_and_takes_no_fresh_block() -> None:
    allocator = BlockAllocator(8)
    first = allocator.allocate(3)
    for block, content in zip(first, (11, 12, 13), strict=True):
        allocator.register(block, content)
    allocator.release(first)  # cached and free
    assert allocator.share(iter([11, 12, 99, 13]), limit=8) == first[:2]  # stops at the first miss
    assert allocator.num_used == 2 and allocator.num_cached_free == 1
    assert allocator.share(iter([11, 12, 13]), limit=1) == first[:1]  # the last prompt token's block
    allocator.release(first[:1])
    allocator.release(first[:2])
    assert allocator.num_free == 8


@pytest.mark.parametrize(
    ("block", "prompt_len", "pinned"),
    [
        (16, 48, 32),  # 3 cached blocks, but the last token must be computed: 2 of them
        (16, 49, 48),
        (16, 80, 48),  # a longer prompt: what the cache has
        (5, 49, 45),
        (64, 49, 0),  # nothing whole before the last token
    ],
)
def test_pin_prefix_holds_whole_cached_blocks_before_the_last_token(
    block: int, prompt_len: int, pinned: int
) -> None:
    pool = KVPool(KVLayout(1, 1, 4, torch.float32), 32, block, torch.device("cpu"), salt=b"test")
    history = random_prompt(48, seed=1)
    writer = pool.sequence()
    writer.admit(history)
    writer.advance(history[writer.length :])
    writer.release()  # its full blocks stay cached
    prompt = (history + random_prompt(80, seed=2))[:prompt_len]
    kv = pool.sequence()
    assert kv.pin_prefix(prompt) == pinned == kv.length
    held = len(kv.block_table)
    kv.grow(prompt_len)  # the blocks an arriving cache lands in ...
    kv.drop_unwritten()  # ... given back when the transfer fails: the pinned prefix stays
    assert len(kv.block_table) == held == pool.allocator.num_used
    kv.release()
    assert pool.allocator.num_used == 0


# ---- runtimes ------------------------------------------------------------------------------------


async def test_local_prompts_match_generate_and_leave_no_block(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """A short prompt, and a long one when no prefill worker is available, prefilled by the decode
    runtime itself; the long one's successor reuses its cached blocks."""
    decode = make_runtime(engines[1], "decode", blocks=128)
    await decode.start()
    short, long = random_prompt(30, seed=30), random_prompt(300, seed=31)
    follow_up = long + random_prompt(20, seed=32)
    try:
        results = []
        for rid, prompt, remote in (("s", short, True), ("l", long, False), ("f", follow_up, True)):
            placement = decode.register(rid, prompt, GREEDY, local_max_tokens=64, remote_available=remote)
            assert placement.prefill == "local"
            results.append((placement.cached, await asyncio.wait_for(collect(decode.stream(rid)), 60)))
    finally:
        await decode.close()
    assert [cached for cached, _ in results] == [0, 0, 288]  # 18 whole blocks of the long prompt
    for prompt, (_, (tokens, _)) in zip((short, long, follow_up), results, strict=True):
        assert tokens == reference.greedy(prompt, GREEDY.max_tokens)
    assert_no_leaks(decode)


async def test_running_streams_keep_stepping_while_a_long_prompt_is_prefilled_locally(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """Every chunk of a 600-token local prompt (32-token chunks) shares its forward with the running
    stream's decode token: the stream is never stalled for the whole prompt."""
    metrics = Metrics("test", "decode")
    decode = make_runtime(engines[1], "decode", blocks=128, metrics=metrics)
    await decode.start()
    running_prompt, long = random_prompt(10, seed=40), random_prompt(600, seed=41)
    sampling = SamplingParams(temperature=0.0, max_tokens=80, min_tokens=80)
    labels = {"pool": "test", "role": "decode"}

    def decode_tokens() -> float:
        return metrics.registry.get_sample_value("splitserve_decode_tokens_total", labels) or 0.0

    try:
        decode.register("running", running_prompt, sampling, remote_available=False)
        running = decode.stream("running")
        first = [await anext(running)]
        before = decode_tokens()
        decode.register("long", long, GREEDY, remote_available=False)
        long_stream = decode.stream("long")
        long_first = await asyncio.wait_for(anext(long_stream), 60)
        during = decode_tokens() - before
        rest, _ = await asyncio.wait_for(collect(long_stream), 60)
        running_rest, _ = await asyncio.wait_for(collect(running), 60)
    finally:
        await decode.close()
    assert during >= 600 // 32  # one decode token of the running stream beside each prompt chunk
    assert [*long_first.token_ids, *rest] == reference.greedy(long, GREEDY.max_tokens)
    tokens = [token for chunk in first for token in chunk.token_ids] + running_rest
    assert tokens == reference.greedy(running_prompt, 80, ignore_eos=True)
    assert_no_leaks(decode)


async def test_a_pinned_prefix_is_given_back_on_every_failure_path(engines: tuple[Engine, Engine]) -> None:
    """Registered with a cached prefix, the request then: times out, is closed by its consumer, loses
    its transfer while waiting for blocks, or gets a failed transfer. Each time every block comes back."""
    decode = make_runtime(engines[1], "decode", blocks=16, kv_timeout_seconds=0.5)
    await decode.start()
    prompt = random_prompt(70, seed=50)
    try:
        await collect(decode.generate(request(prompt, rid="warm")))  # its blocks stay cached
        assert decode.register("late", prompt, GREEDY).cached == 64
        with pytest.raises(GenerationError) as late:
            await asyncio.wait_for(collect(decode.stream("late")), 10)
        assert late.value.status == 504
        assert_no_leaks(decode)

        decode.register("gone", prompt, GREEDY)
        assert decode.pool.allocator.num_used == 4
        consumer = asyncio.create_task(collect(decode.stream("gone")))
        await asyncio.sleep(0)  # it waits for the first token
        consumer.cancel()  # the router hung up before any KV came
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert_no_leaks(decode)

        decode.register("cut", prompt, GREEDY)
        others = decode.pool.allocator.allocate(decode.pool.allocator.num_free)  # no room for the rest
        waiting = asyncio.create_task(decode.receive_kv("cut", len(prompt), 64))
        await asyncio.sleep(0)  # it queues for blocks
        waiting.cancel()  # the sender gave up: another transfer may still come, onto the same prefix
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert decode.pool.allocator.num_used == len(others) + 4
        decode.pool.allocator.release(others)
        kv = await decode.receive_kv("cut", len(prompt), 64)
        assert len(kv.block_table) == 5 and decode.pool.allocator.num_used == 5
        decode.kv_failed("cut", "the sender went away mid-layer")
        with pytest.raises(GenerationError, match="KV transfer failed"):
            await collect(decode.stream("cut"))
        assert_no_leaks(decode)
    finally:
        await decode.close()
