"""KV admission: first come first served, cancellation while waiting, the sequence cap."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.engine.kv_cache import KVBudget


async def test_a_waiting_long_request_is_not_overtaken_by_short_ones() -> None:
    budget = KVBudget(capacity_tokens=100, max_sequences=8)
    await budget.reserve(60)
    long_request = asyncio.create_task(budget.reserve(80))
    await asyncio.sleep(0)
    short_request = asyncio.create_task(budget.reserve(10))  # would fit now, but waits its turn
    await asyncio.sleep(0)
    assert not long_request.done() and not short_request.done()
    budget.release(60)
    await asyncio.wait_for(asyncio.gather(long_request, short_request), 1)
    assert budget.reserved_tokens == 90 and budget.sequences == 2
    assert budget.usage == pytest.approx(0.9)


async def test_cancelling_a_waiter_leaves_the_budget_and_lets_the_next_in() -> None:
    budget = KVBudget(capacity_tokens=100, max_sequences=8)
    await budget.reserve(50)
    blocked = asyncio.create_task(budget.reserve(90))
    await asyncio.sleep(0)
    behind = asyncio.create_task(budget.reserve(40))
    await asyncio.sleep(0)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    budget.release(50)  # the cancelled waiter is gone: the one behind it is admitted
    await asyncio.wait_for(behind, 1)
    assert budget.reserved_tokens == 40 and budget.sequences == 1


async def test_the_sequence_cap_and_requests_that_can_never_fit() -> None:
    budget = KVBudget(capacity_tokens=1000, max_sequences=1)
    await budget.reserve(1)
    second = asyncio.create_task(budget.reserve(1))
    await asyncio.sleep(0)
    assert not second.done()  # tokens fit, but the batch is full
    budget.release(1)
    await asyncio.wait_for(second, 1)
    with pytest.raises(ValueError, match="exceed the KV budget"):
        await budget.reserve(1001)
