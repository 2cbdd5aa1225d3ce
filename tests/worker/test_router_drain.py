"""The router process drains its own open streams on SIGTERM (real processes on 127.0.0.1).

What a rolling update or a scale-down of the router Deployment does: SIGTERM to the router while
greedy streams run through it. It turns not-ready (/health 503 "draining", still alive for the
liveness probe), refuses new requests with 503, lets every open stream finish (each identical to
transformers' `generate()`), then exits 0 without reaching its drain deadline.
"""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import Reference
from tests.worker.serving.test_drain_frontend import health
from tests.worker.test_drain import TOKENS, open_stream, read_all
from tests.worker.test_e2e import MODEL, client, start_pool

pytestmark = pytest.mark.slow
STREAMS = 4


def test_sigterm_to_the_router_finishes_its_open_streams_and_takes_no_new_ones(
    tiny_model: Path, tmp_path: Path, reference: Reference
) -> None:
    pool = start_pool(tiny_model, tmp_path, prefill=1, decode=1)
    try:
        router = pool.router
        assert router is not None and router.process is not None
        api = client(pool)
        streams = [open_stream(api, seed) for seed in range(STREAMS)]
        firsts = [next(iterator) for _, iterator in streams]  # every stream is open at the router

        router.process.send_signal(signal.SIGTERM)
        # Streams of TOKENS tokens take seconds; these answers come within milliseconds of the signal.
        assert asyncio.run(health(router.url)) == (503, "draining")  # out of the Service's endpoints
        assert asyncio.run(health(router.url, "/health?live=1")) == (200, "ready")  # but not restarted
        with pytest.raises(openai.APIStatusError) as refused:
            api.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
        assert refused.value.status_code == 503 and "draining" in str(refused.value)

        with ThreadPoolExecutor(STREAMS) as threads:
            results = list(
                threads.map(lambda pair: read_all(pair[0], pair[1][1]), zip(firsts, streams, strict=True))
            )
        assert [r for r in results if isinstance(r, str)] == []  # no stream cut or failed
        expected = [reference.greedy(prompt, TOKENS, ignore_eos=True) for prompt, _ in streams]
        assert results == expected
        assert router.process.wait(60) == 0
        log = router.log_path.read_text()
        assert "draining" in log and "drained" in log and "drain deadline passed" not in log
    finally:
        asyncio.run(pool.stop())
