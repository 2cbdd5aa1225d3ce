"""kill -9 a decode worker under eight greedy streams (real processes on 127.0.0.1, the official `openai`
client): with `routing.migration_limit: 1` every stream carries on elsewhere and equals `generate()`; with
0 the dead worker's streams end with an error event and the others are untouched."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.contract.config import RoutingConfig
from splitserve.contract.names import MIGRATIONS
from tests.conftest import Reference
from tests.worker.test_drain import TOKENS, first_difference, open_stream, read_all
from tests.worker.test_e2e import client, http_get, start_pool

pytestmark = pytest.mark.slow
STREAMS = 8


def migrations(router_url: str, outcome: str) -> float:
    """The router's MIGRATIONS counter of one outcome, from its /metrics."""
    lines = http_get(router_url + "/metrics").splitlines()
    wanted = [line for line in lines if line.startswith(MIGRATIONS + "{") and f'outcome="{outcome}"' in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in wanted)


@pytest.mark.parametrize("limit", [1, 0], ids=["migrate", "no-migration"])
def test_kill_9_of_a_decode_worker_mid_stream(
    tiny_model: Path, tmp_path: Path, reference: Reference, limit: int
) -> None:
    pool = start_pool(tiny_model, tmp_path, prefill=1, decode=2, routing=RoutingConfig(migration_limit=limit))
    try:
        api = client(pool)
        streams = [open_stream(api, seed) for seed in range(STREAMS)]
        firsts = [next(iterator) for _, iterator in streams]  # every stream is running on a decode worker
        victim = pool.workers["decode"][0]
        load = json.loads(http_get(victim.url + "/load"))
        on_victim = load["running"] + load["waiting"]
        assert 0 < on_victim < STREAMS, load
        victim.kill()
        with ThreadPoolExecutor(STREAMS) as threads:
            results = list(
                threads.map(lambda pair: read_all(pair[0], pair[1][1]), zip(firsts, streams, strict=True))
            )
        expected = [reference.greedy(prompt, TOKENS, ignore_eos=True) for prompt, _ in streams]
        failed = [result for result in results if isinstance(result, str)]
        survived = [
            (got, want) for got, want in zip(results, expected, strict=True) if not isinstance(got, str)
        ]
        differ = [first_difference(got, want) for got, want in survived if got != want]
        assert differ == [], differ
        if limit:
            assert failed == []
            assert migrations(pool.url, "resumed") == on_victim
        else:
            assert len(failed) == on_victim and all("failed mid-stream" in error for error in failed), failed
            assert migrations(pool.url, "exhausted") == on_victim
    finally:
        asyncio.run(pool.stop())
