"""A prefix found in the host or disk tier is copied back off the engine thread: running streams keep
decoding while it loads, an abort waits for the copy before its blocks are freed, and a load that
fails part-way is a miss from there on (recomputed, the output still exact)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from splitserve.contract.names import PrefixCacheTier
from splitserve.engine.disk_tier import DiskTier
from splitserve.engine.forward import Engine
from splitserve.engine.offload import KVTiers
from splitserve.engine.params import SamplingParams
from splitserve.engine.runtime import EngineRuntime
from splitserve.engine.tier_load import TierLoad, TierLoader, copy_back
from splitserve.serving.metrics import Metrics
from tests.conftest import Reference, random_prompt
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, request
from tests.worker.engine.test_kv_tiers import FIRST, OTHERS, disk_errors
from tests.worker.engine.test_paging import make_runtime
from tests.worker.engine.test_prefix_cache import hits
from tests.worker.serving.router_harness import eventually

RUNNER = random_prompt(20, seed=40)
STEPS = 30
# min_tokens masks EOS as generate()'s min_new_tokens does: the runner streams its whole length.
ENDLESS = SamplingParams(temperature=0.0, max_tokens=STEPS, min_tokens=STEPS)
WHILE_LOADING = 5  # decode tokens the runner must emit while the load is held up


class GatedRead:
    """Reads block files only once the test opens `gate` (a slow disk, deterministically), failing
    with an I/O error from read number `fail_from` on."""

    def __init__(self, fail_from: int | None = None) -> None:
        self.entered = threading.Event()  # a read is waiting at the gate
        self.gate = threading.Event()
        self.fail_from = fail_from
        self.reads = 0

    def __call__(self, path: Path) -> bytes:
        self.entered.set()
        self.gate.wait(timeout=120)  # past the tests' waits: a stall fails them rather than passing late
        self.reads += 1
        if self.fail_from is not None and self.reads >= self.fail_from:
            raise OSError("the tier's volume went away")
        return path.read_bytes()


def gated_runtime(engine: Engine, metrics: Metrics, directory: Path, read: GatedRead) -> EngineRuntime:
    """A 12-block `both` runtime whose evicted blocks go straight to a disk tier read through `read`."""
    runtime = make_runtime(engine, "both", blocks=12, metrics=metrics)
    salt = runtime.pool.salt or b""
    disk = DiskTier(directory, salt, 1 << 30, None, time.monotonic, metrics.record_kv_disk_error, read)
    runtime.pool.keep_evicted_in(KVTiers(0, None, disk, False, time.monotonic, metrics))
    return runtime


async def evict_first(runtime: EngineRuntime) -> None:
    """FIRST, then OTHERS, which push FIRST's full blocks off the device into the disk tier."""
    for i, prompt in enumerate((FIRST, *OTHERS)):
        await asyncio.wait_for(collect(runtime.generate(request(prompt, rid=f"t{i}"))), 60)


async def test_running_streams_keep_decoding_while_a_prefix_loads(
    engines: tuple[Engine, Engine], reference: Reference, tmp_path: Path
) -> None:
    metrics = Metrics("test", "both")
    read = GatedRead()
    runtime = gated_runtime(engines[0], metrics, tmp_path, read)
    await runtime.start()
    try:
        await evict_first(runtime)
        runner = runtime.generate(request(RUNNER, ENDLESS, rid="runner"))
        streamed = [(await asyncio.wait_for(anext(runner), 60)).token_ids[0]]
        again = asyncio.create_task(collect(runtime.generate(request(FIRST, rid="again"))))
        assert await asyncio.to_thread(read.entered.wait, 60)  # the load is under way, held at the gate
        for _ in range(WHILE_LOADING):
            streamed += (await asyncio.wait_for(anext(runner), 60)).token_ids
        assert not again.done() and not read.gate.is_set()  # all of that while the load was held up
        read.gate.set()
        rest, finish = await asyncio.wait_for(collect(runner), 60)
        tokens, _ = await asyncio.wait_for(again, 60)
    finally:
        read.gate.set()
        await runtime.close()
    assert streamed + rest == reference.greedy(RUNNER, STEPS, ignore_eos=True) and finish == "length"
    assert tokens == reference.greedy(FIRST, GREEDY.max_tokens)
    assert hits(metrics, "disk") == 48
    assert_no_leaks(runtime)


async def test_an_abort_during_the_load_frees_the_blocks_once_the_copy_stopped(
    engines: tuple[Engine, Engine], reference: Reference, tmp_path: Path
) -> None:
    metrics = Metrics("test", "both")
    read = GatedRead()
    runtime = gated_runtime(engines[0], metrics, tmp_path, read)
    await runtime.start()
    try:
        await evict_first(runtime)
        again = asyncio.create_task(collect(runtime.generate(request(FIRST, rid="again"))))
        assert await asyncio.to_thread(read.entered.wait, 60)
        again.cancel()  # the client is gone while the copy is held up
        with pytest.raises(asyncio.CancelledError):
            await again
        loads = runtime.engine_loop.loading
        await eventually(
            lambda: all(load.cancelled.is_set() for load in loads.values()), "the abort to land", 30
        )
        assert runtime.pool.allocator.num_used == 4  # held: the copy may still write into them
        read.gate.set()
        await eventually(lambda: not runtime._streams, "the abort to be confirmed", 30)
        assert read.reads == 1  # cancelled after the block in flight
        # The block that was copied stays cached on the device: the next request shares it.
        tokens, _ = await asyncio.wait_for(collect(runtime.generate(request(FIRST, rid="later"))), 60)
    finally:
        await runtime.close()
    assert tokens == reference.greedy(FIRST, GREEDY.max_tokens)
    assert hits(metrics, "device") == 16 and hits(metrics, "disk") == 16 + 32
    assert_no_leaks(runtime)


async def test_a_load_that_fails_part_way_recomputes_the_rest_exactly(
    engines: tuple[Engine, Engine], reference: Reference, tmp_path: Path
) -> None:
    metrics = Metrics("test", "both")
    read = GatedRead(fail_from=2)
    read.gate.set()
    runtime = gated_runtime(engines[0], metrics, tmp_path, read)
    await runtime.start()
    try:
        await evict_first(runtime)
        tokens, _ = await asyncio.wait_for(collect(runtime.generate(request(FIRST, rid="again"))), 60)
    finally:
        await runtime.close()
    assert tokens == reference.greedy(FIRST, GREEDY.max_tokens)
    assert hits(metrics, "disk") == 16  # the first block came back; the other two were recomputed
    assert disk_errors(metrics, "io_error") == 1
    assert_no_leaks(runtime)


class Listed:
    """A source holding some blocks by hash."""

    def __init__(self, blocks: dict[int, torch.Tensor]) -> None:
        self.blocks = blocks

    def take(self, content: int) -> tuple[torch.Tensor, PrefixCacheTier] | None:
        block = self.blocks.pop(content, None)
        return None if block is None else (block, "disk")


@pytest.mark.parametrize(
    ("held", "copied"),
    [
        ({1: torch.ones(2, 3), 2: torch.full((2, 3), 2.0)}, 2),
        ({1: torch.ones(2, 3), 3: torch.ones(2, 3)}, 1),  # block 2 is gone: the chain ends there
        ({1: torch.ones(2, 3), 2: torch.ones(3, 2)}, 1),  # another layout: recomputed, not reshaped
        ({1: torch.ones(2, 3), 2: torch.ones(2, 3, dtype=torch.int8)}, 1),  # another dtype: not cast
    ],
    ids=["all", "missing", "shape", "dtype"],
)
def test_copy_back_stops_at_the_first_block_that_cannot_come_back(
    held: dict[int, torch.Tensor], copied: int
) -> None:
    targets = [torch.zeros(2, 3), torch.zeros(2, 3)]  # stand-ins for [layers, 2, kv_heads, block, row]
    load = TierLoad(Listed(held), [1, 2], targets)
    copy_back(load)
    assert load.loaded == [1, 2][:copied] and load.hits(16) == ({"disk": 16 * copied} if copied else {})
    assert all(bool((target != 0).all()) == (i < copied) for i, target in enumerate(targets))


def test_a_cancelled_load_copies_nothing_more() -> None:
    load = TierLoad(Listed({1: torch.ones(2, 3)}), [1], [torch.zeros(2, 3)])
    load.cancelled.set()
    copy_back(load)
    assert load.loaded == [] and not bool(load.targets[0].any())


class Broken:
    def take(self, content: int) -> tuple[torch.Tensor, PrefixCacheTier] | None:
        raise RuntimeError("a bug in a tier")


def test_a_load_that_raises_still_reports_its_end() -> None:
    loader, ended = TierLoader(), threading.Event()
    load = TierLoad(Broken(), [1], [torch.zeros(2, 3)])
    loader.start(load, ended.set)
    assert ended.wait(timeout=30) and load.loaded == []
    loader.close()
