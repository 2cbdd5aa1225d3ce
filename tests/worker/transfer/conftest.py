"""Fixtures of the real-socket KV transfer tests: a recording sink and a receiver on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from splitserve.transfer.tcp import TcpKVReceiver
from tests.worker.transfer.tcp_harness import LIMITS, Sink


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    # Every transfer ended (the receivers are closed by now), and none kept a block it took.
    assert {rid: d.leaked_blocks for rid, d in sink.destinations.items()} == dict.fromkeys(
        sink.destinations, 0
    )


@pytest.fixture
async def receiver(sink: Sink) -> AsyncIterator[TcpKVReceiver]:
    server = TcpKVReceiver("127.0.0.1", 0, sink, LIMITS, idle_timeout=5.0, linger_seconds=2.0)
    await server.start()
    yield server
    await server.close()
