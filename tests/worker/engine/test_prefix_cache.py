"""The device prefix cache: shared, reference-counted blocks kept after their request, LRU eviction,
and greedy output still identical to `generate()` whatever part of a prompt came from the cache."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.engine.blocks import BlockAllocator, NoFreeBlocksError
from splitserve.engine.forward import Engine
from splitserve.serving.metrics import Metrics
from tests.conftest import Reference, random_prompt
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, hand_off, request
from tests.worker.engine.test_paging import ENDLESS, LONG, make_runtime, preemptions


def hits(metrics: Metrics, tier: str = "device") -> float:
    labels = {"pool": "test", "role": metrics.role, "tier": tier}
    return metrics.registry.get_sample_value("splitserve_prefix_cache_hits_total", labels) or 0.0


def queries(metrics: Metrics) -> float:
    labels = {"pool": "test", "role": metrics.role}
    return metrics.registry.get_sample_value("splitserve_prefix_cache_queries_total", labels) or 0.0


def vllm(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model_name": "test", "engine": "0"})
    assert value is not None, name
    return value


# ---- the allocator's rules -----------------------------------------------------------------------


def test_cached_blocks_are_shared_and_counted_once_per_user() -> None:
    allocator = BlockAllocator(8)
    first = allocator.allocate(3)
    for block, content in zip(first, (11, 12, 13), strict=True):
        allocator.register(block, content)
    table, shared = allocator.allocate_prefixed(iter([11, 12, 99]), count=4)
    assert shared == 2 and table[:2] == first[:2] and len(set(table)) == 4
    allocator.release(first)
    assert allocator.num_used == 4  # the two shared blocks are still held by the second sequence
    allocator.release(table)
    assert allocator.num_free == 8 and allocator.num_cached_free == 3


def test_a_freed_cached_block_counts_as_free_and_a_hit_takes_it() -> None:
    allocator = BlockAllocator(4)
    table = allocator.allocate(2)
    allocator.register(table[0], 7)
    allocator.release(table)
    assert allocator.num_free == 4 and allocator.num_cached_free == 1
    with pytest.raises(NoFreeBlocksError):  # the revived block plus 3 new ones: 4 > 4 - 1 kept back
        allocator.allocate_prefixed(iter([7]), count=4, keep_free=1)
    assert allocator.num_cached_free == 1  # nothing taken
    again, shared = allocator.allocate_prefixed(iter([7]), count=4)
    assert shared == 1 and again[0] == table[0] and allocator.num_free == 0


def test_blank_blocks_go_first_then_cached_ones_least_recently_used_and_last_block_first() -> None:
    evicted: list[tuple[int, int]] = []
    allocator = BlockAllocator(5, on_evict=lambda block, content: evicted.append((block, content)))
    older, newer = allocator.allocate(2), allocator.allocate(2)
    for block, content in zip(older + newer, (1, 2, 3, 4), strict=True):
        allocator.register(block, content)
    allocator.release(older)
    allocator.release(newer)
    assert allocator.allocate(1)[0] not in older + newer  # the one blank block first
    taken = allocator.allocate(3)
    assert taken == [older[1], older[0], newer[1]]  # LRU sequence first, its tail block first
    assert evicted == [(older[1], 2), (older[0], 1), (newer[1], 4)]
    assert allocator.allocate_prefixed(iter([3, 4]), count=1) == ([newer[0]], 1)  # 3 survived


def test_a_second_copy_of_cached_content_stays_unhashed() -> None:
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(2)
    allocator.register(a, 5)
    allocator.register(b, 5)  # computed at the same time by another sequence
    allocator.release([a, b])
    assert allocator.num_cached_free == 1


# ---- the engine's output ---------------------------------------------------------------------------


async def test_a_prefix_hit_is_identical_to_generate_and_counted(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """A 50-token prompt, then one sharing its first 40 tokens, then the first again: 32 and 48 tokens
    come from the cache (whole blocks, the last prompt token always computed)."""
    first = random_prompt(50, seed=1)
    second = first[:40] + random_prompt(10, seed=2)
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=64, metrics=metrics)
    await runtime.start()
    try:
        outputs = [
            await asyncio.wait_for(collect(runtime.generate(request(p, rid=f"h{i}"))), 60)
            for i, p in enumerate((first, second, first))
        ]
    finally:
        await runtime.close()
    for prompt, (tokens, _) in zip((first, second, first), outputs, strict=True):
        assert tokens == reference.greedy(prompt, GREEDY.max_tokens)
    assert hits(metrics) == 32 + 48
    assert queries(metrics) == 150
    assert vllm(metrics, "vllm:prefix_cache_hits_total") == 80
    assert vllm(metrics, "vllm:prefix_cache_queries_total") == 150
    assert runtime.pool.allocator.num_cached_free > 0
    assert_no_leaks(runtime)


async def test_concurrent_requests_share_the_cached_prefix_blocks(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """Two streams with a common 64-token prefix run at once on the same cached blocks."""
    prefix = random_prompt(64, seed=3)
    prompts = [prefix + random_prompt(9, seed=4 + i) for i in range(2)]
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=64, metrics=metrics)
    await runtime.start()
    try:
        await asyncio.wait_for(collect(runtime.generate(request([*prefix, 5], rid="warm"))), 60)
        streams = [collect(runtime.generate(request(p, ENDLESS, rid=f"c{i}"))) for i, p in enumerate(prompts)]
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
    finally:
        await runtime.close()
    for prompt, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == reference.greedy(prompt, LONG, ignore_eos=True)
    assert hits(metrics) == 2 * 64
    assert_no_leaks(runtime)


async def test_an_evicted_prefix_is_recomputed_correctly(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """A 12-block pool: other prompts evict the first one's blocks; it then runs again from scratch."""
    first = random_prompt(60, seed=5)
    others = [random_prompt(60, seed=6 + i) for i in range(3)]
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=12, metrics=metrics)
    await runtime.start()
    try:
        for i, prompt in enumerate((first, *others)):
            await asyncio.wait_for(collect(runtime.generate(request(prompt, rid=f"e{i}"))), 60)
        assert hits(metrics) == 0
        tokens, _ = await asyncio.wait_for(collect(runtime.generate(request(first, rid="again"))), 60)
    finally:
        await runtime.close()
    assert tokens == reference.greedy(first, GREEDY.max_tokens)
    assert hits(metrics) == 0  # evicted, least recently used first
    assert_no_leaks(runtime)


async def test_prefill_workers_skip_the_cached_part_and_the_handoff_stays_exact(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    prefix = random_prompt(48, seed=9)
    prompts = [prefix + random_prompt(7, seed=10 + i) for i in range(2)]
    metrics = Metrics("test", "prefill")
    prefill = make_runtime(engines[0], "prefill", blocks=64, metrics=metrics)
    decode = make_runtime(engines[1], "decode", blocks=64)
    await prefill.start()
    await decode.start()
    try:
        results = []
        for i, prompt in enumerate(prompts):
            req = request(prompt, rid=f"p{i}")
            await asyncio.wait_for(hand_off(prefill, decode, req), 60)
            results.append(await asyncio.wait_for(collect(decode.stream(req.request_id)), 60))
    finally:
        await prefill.close()
        await decode.close()
    for prompt, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == reference.greedy(prompt, GREEDY.max_tokens)
    assert hits(metrics) == 48
    assert decode.pool.allocator.num_cached > 0  # arrived caches join the decode worker's prefix cache
    assert_no_leaks(prefill, decode)


async def test_preempted_streams_reuse_their_own_cached_blocks(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """A preempted stream's blocks stay cached; when it is readmitted its prompt and output so far
    are found there (what is not evicted meanwhile) instead of recomputed, and the output is exact."""
    prompts = [random_prompt(10 + 4 * i, seed=200 + i) for i in range(8)]
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=14, metrics=metrics)
    await runtime.start()
    try:
        streams = [collect(runtime.generate(request(p, ENDLESS, rid=f"q{i}"))) for i, p in enumerate(prompts)]
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=180)
    finally:
        await runtime.close()
    for prompt, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == reference.greedy(prompt, LONG, ignore_eos=True)
    assert preemptions(metrics) > 0 and hits(metrics) > 0
    assert_no_leaks(runtime)


async def test_prefix_caching_off_keeps_nothing(engines: tuple[Engine, Engine], reference: Reference) -> None:
    prompt = random_prompt(40, seed=11)
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=16, metrics=metrics, prefix_caching=False)
    await runtime.start()
    try:
        for i in range(2):
            tokens, _ = await asyncio.wait_for(collect(runtime.generate(request(prompt, rid=f"o{i}"))), 60)
            assert tokens == reference.greedy(prompt, GREEDY.max_tokens)
    finally:
        await runtime.close()
    assert hits(metrics) == 0 and queries(metrics) == 0
    assert runtime.pool.allocator.num_cached == 0
    assert_no_leaks(runtime)


async def test_a_decode_worker_recomputes_preempted_streams_from_its_prefix_cache(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    """Arrived caches join the decode worker's prefix cache, so a preempted stream's recompute finds
    its prompt (and output) blocks there while they are not evicted; output stays exact."""
    prompts = [random_prompt(17 + 5 * i, seed=300 + i) for i in range(8)]
    metrics = Metrics("test", "decode")
    prefill = make_runtime(engines[0], "prefill", blocks=64)
    decode = make_runtime(engines[1], "decode", blocks=16, metrics=metrics)
    await prefill.start()
    await decode.start()
    try:
        requests = [request(p, ENDLESS, rid=f"d{i}") for i, p in enumerate(prompts)]
        await asyncio.wait_for(asyncio.gather(*(hand_off(prefill, decode, r) for r in requests)), 60)
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(decode.stream(r.request_id)) for r in requests)), timeout=180
        )
    finally:
        await prefill.close()
        await decode.close()
    for prompt, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == reference.greedy(prompt, LONG, ignore_eos=True)
    assert preemptions(metrics) > 0 and hits(metrics) > 0
    assert_no_leaks(prefill, decode)
