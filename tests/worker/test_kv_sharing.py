"""The pool shares its KV, for real: router, prefill and decode workers as processes on 127.0.0.1.

A decode worker that holds a prompt's leading blocks gets only the missing ones over the wire; a
short uncached prompt is prefilled by the decode worker itself and never reaches a prefill worker;
with the prefill worker gone every prompt is prefilled there. The workers' /metrics are the witness,
transformers' `generate()` the truth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.contract import names
from splitserve.contract.config import RoutingConfig
from splitserve.local.pool import LocalPool
from tests.conftest import Reference, random_prompt
from tests.worker.test_e2e import MODEL, client, http_get, kv_blocks, start_pool

pytestmark = pytest.mark.slow
LOCAL_MAX = 64  # this pool's local_prefill_max_tokens
BLOCK = 16  # the workers' block size (EngineConfig's default)
BYTES_PER_TOKEN = 2 * 4 * 4 * 32 * 4  # the tiny model: K and V x 4 layers x 4 KV heads x 32 dims x fp32


@pytest.fixture(scope="module")
def pool(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPool]:
    routing = RoutingConfig(local_prefill_max_tokens=LOCAL_MAX)
    pool = start_pool(tiny_model, tmp_path_factory.mktemp("pool"), prefill=1, decode=1, routing=routing)
    yield pool
    asyncio.run(pool.stop())


def token_ids(pool: LocalPool, prompt: list[int], max_tokens: int = 12) -> list[int]:
    """A streamed greedy completion's token ids (compared as ids: the text of a few byte-level tokens
    depends on where the stream was cut)."""
    ids: list[int] = []
    for chunk in client(pool).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    ):
        for choice in chunk.choices:
            ids += getattr(choice, "token_ids", None) or []
    return ids


def series(url: str, name: str, label: str = "") -> float:
    """Sum of a metric's samples on a process's /metrics, only those whose labels contain `label`."""
    body = http_get(url + "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name) and label in line
    )


def readings(pool: LocalPool) -> dict[str, float]:
    prefill, decode, router = pool.workers["prefill"][0].url, pool.workers["decode"][0].url, pool.url
    return {
        "prefill_tokens": series(prefill, names.stage_tokens("prefill")),
        "sent": series(prefill, names.KV_TRANSFER_BYTES),
        "received": series(decode, names.KV_TRANSFER_BYTES),
        "cached": series(decode, names.KV_HANDOFF_BLOCKS, 'source="cached"'),
        "transferred": series(decode, names.KV_HANDOFF_BLOCKS, 'source="transferred"'),
        "remote": series(router, names.PREFILLS, 'placement="remote"'),
        "local": series(router, names.PREFILLS, 'placement="local"'),
    }


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in before}


def assert_no_block_held(pool: LocalPool) -> None:
    for worker in (*pool.workers["prefill"], *pool.workers["decode"]):
        if worker.exit_code() is None:
            assert kv_blocks(http_get(worker.url + "/metrics"))["used"] == 0


def test_a_shared_prefix_moves_only_the_missing_blocks(pool: LocalPool, reference: Reference) -> None:
    """Two prompts share 400 tokens (25 whole blocks); the second's 100 new tokens are more than the
    local threshold, so a prefill worker runs it, and sends only what the decode worker lacks."""
    prefix = random_prompt(400, seed=400)
    first, second = prefix + random_prompt(120, seed=401), prefix + random_prompt(100, seed=402)
    before = readings(pool)
    assert token_ids(pool, first) == reference.greedy(first, 12)
    middle = readings(pool)
    assert token_ids(pool, second) == reference.greedy(second, 12)
    one, two = moved(before, middle), moved(middle, readings(pool))
    assert one["remote"] == 1 and one["cached"] == 0 and one["transferred"] == 520 // BLOCK + 1
    assert one["sent"] == one["received"] == len(first) * BYTES_PER_TOKEN
    assert two["remote"] == 1 and two["local"] == 0
    assert two["cached"] == 400 // BLOCK and two["transferred"] == 500 // BLOCK + 1 - 400 // BLOCK
    assert two["sent"] == two["received"] == (len(second) - 400) * BYTES_PER_TOKEN  # not 500 tokens' worth
    assert two["prefill_tokens"] == len(second) - 400  # the prefill worker had the prefix cached too
    assert_no_block_held(pool)


def test_short_uncached_prompts_never_touch_the_prefill_worker(pool: LocalPool, reference: Reference) -> None:
    prompts = [random_prompt(length, seed=500 + length) for length in (1, 15, 16, 17, 40, LOCAL_MAX)]
    before = readings(pool)
    with ThreadPoolExecutor(len(prompts)) as threads:
        results = list(threads.map(lambda prompt: token_ids(pool, prompt), prompts))
    for prompt, ids in zip(prompts, results, strict=True):
        assert ids == reference.greedy(prompt, 12)
    delta = moved(before, readings(pool))
    assert delta["local"] == len(prompts) and delta["remote"] == 0
    assert delta["prefill_tokens"] == 0 and delta["sent"] == 0 and delta["received"] == 0
    assert_no_block_held(pool)


def test_with_the_prefill_worker_gone_every_prompt_is_prefilled_locally(
    pool: LocalPool, reference: Reference
) -> None:
    """Killed without a drain: the first requests may still be sent its way (the router has not
    noticed), fail there and are retried on the decode worker alone. (Last in this module: it leaves
    the pool without its prefill worker.)"""
    pool.workers["prefill"][0].kill()
    prompts = [random_prompt(length, seed=600 + length) for length in (200, 333, 30, 700)]
    local = series(pool.url, names.PREFILLS, 'placement="local"')
    with ThreadPoolExecutor(len(prompts)) as threads:
        results = list(threads.map(lambda prompt: token_ids(pool, prompt), prompts))
    for prompt, ids in zip(prompts, results, strict=True):
        assert ids == reference.greedy(prompt, 12)
    assert series(pool.url, names.PREFILLS, 'placement="local"') - local == len(prompts)
    assert_no_block_held(pool)
