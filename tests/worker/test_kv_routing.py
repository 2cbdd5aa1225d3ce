"""KV-aware routing over real workers (processes on 127.0.0.1) and a router in this process, whose index
the test can clear or falsify: a conversation's next turn goes to the decode worker holding its history
unless that worker is swamped by `overload_margin`, and whatever the index says, every turn equals
transformers' `generate()`."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from splitserve.contract.config import RoutingConfig
from splitserve.local.pool import LocalPool
from splitserve.serving.metrics import Metrics
from splitserve.serving.router import BACKEND_KEY, RouterBackend, RouterSettings, build_router_app
from tests.conftest import Reference, random_prompt
from tests.worker.conftest import Serve
from tests.worker.serving.router_harness import eventually
from tests.worker.test_e2e import MODEL, start_pool

pytestmark = pytest.mark.slow
ANSWER, USER = 8, 24
MARGIN = 2


@pytest.fixture(scope="module")
def pool(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPool]:
    pool = start_pool(tiny_model, tmp_path_factory.mktemp("pool"), prefill=1, decode=2)
    yield pool
    asyncio.run(pool.stop())


class Conversation:
    """A history resent whole every turn, as chat clients do; each answer checked against generate()."""

    def __init__(self, seed: int, reference: Reference) -> None:
        self.history, self.reference, self._rng = random_prompt(64, seed), reference, random.Random(seed)

    async def turn(self, api: openai.AsyncOpenAI) -> None:
        self.history += [self._rng.randrange(4, 300) for _ in range(USER)]
        reply = await api.completions.create(
            model=MODEL,
            prompt=self.history,
            max_tokens=ANSWER,
            temperature=0,
            extra_body={"min_tokens": ANSWER, "return_token_ids": True},
        )
        answer = list(getattr(reply.choices[0], "token_ids", None) or [])
        assert answer == self.reference.greedy(self.history, ANSWER, ignore_eos=True)
        self.history += answer


def idle(backend: RouterBackend) -> bool:
    """No sequence on any decode worker, by the router's count and by the workers' last /load."""
    return all(e["in_flight"] == e["reported_load"] == 0 for e in backend.snapshot()["decode"])


async def decode_tokens(session: aiohttp.ClientSession, pool: LocalPool) -> dict[str, float]:
    """Each decode worker's decode-step tokens so far: which one served a turn shows in the difference."""
    counts = {}
    for worker in pool.workers["decode"]:
        async with session.get(worker.url + "/metrics") as reply:
            body = await reply.text()
        lines = [line for line in body.splitlines() if line.startswith("splitserve_decode_tokens_total{")]
        counts[worker.url] = sum(float(line.rsplit(" ", 1)[1]) for line in lines)
    return counts


async def test_next_turns_follow_the_history_and_any_index_gives_the_same_answers(
    pool: LocalPool, serve: Serve, tokenizer: PreTrainedTokenizerBase, reference: Reference
) -> None:
    settings = RouterSettings(
        model=pool.config.model,
        served_model_name=MODEL,
        max_model_len=2048,
        prefill=[worker.url for worker in pool.workers["prefill"]],
        decode=[worker.url for worker in pool.workers["decode"]],
        routing=RoutingConfig(overload_margin=MARGIN),
    )
    app = build_router_app(settings, tokenizer=tokenizer, metrics=Metrics("test", "router"))
    backend: RouterBackend = app[BACKEND_KEY]
    router_url = (await serve(app)).url
    api = openai.AsyncOpenAI(base_url=router_url + "/v1", api_key="-", max_retries=0, timeout=60)
    chat, other = Conversation(1, reference), Conversation(2, reference)
    async with aiohttp.ClientSession() as session:

        async def served_by(conversation: Conversation) -> set[str]:
            """The decode workers that ran steps during the turn: its own, and any busy with other streams."""
            before = await decode_tokens(session, pool)
            await conversation.turn(api)
            after = await decode_tokens(session, pool)
            return {url for url in after if after[url] > before[url]}

        (home,) = await served_by(chat)
        away = next(worker.url for worker in pool.workers["decode"] if worker.url != home)
        assert await served_by(other) == {away}  # a new conversation: the idle worker
        for _ in range(2):
            assert await served_by(chat) == {home}
            assert await served_by(other) == {away}

        # Swamp the history's worker: long streams extending the same history follow it there until it
        # runs MARGIN more sequences than the other worker; then the next turn goes to the other one.
        long_streams = []
        for _ in range(MARGIN):
            body = {
                "model": MODEL,
                "prompt": [*chat.history, 5],
                "max_tokens": 1000,
                "min_tokens": 1000,
                "temperature": 0,
                "stream": True,
            }
            response = await session.post(router_url + "/v1/completions", json=body)
            assert response.status == 200 and (await response.content.readline()).startswith(b"data: ")
            long_streams.append(response)
        in_flight = {e["url"]: e["in_flight"] for e in backend.snapshot()["decode"]}
        assert in_flight == {home: MARGIN, away: 0}
        # The router's last /load poll of `away` may date from the other conversation's turn: wait until
        # it shows the worker idle, as it is.
        await eventually(
            lambda: all(e["reported_load"] == 0 for e in backend.snapshot()["decode"] if e["url"] == away),
            what="the idle worker's load polled",
        )
        assert away in await served_by(chat)  # `away` is idle but for this turn
        for response in long_streams:
            response.close()  # the client goes away: the router aborts the stream
        await eventually(lambda: idle(backend), "the aborted streams gone from the router's view", 10)

        # A wrong index (the history placed on the worker that never saw its latest turns) and a cleared
        # one (the least loaded worker) cost recomputation, never a different answer.
        index = backend.placement.index
        for url in (home, away):
            index.forget(url)
        index.record(home, backend.placement.hashes(other.history))
        assert await served_by(other) == {home}
        for url in (home, away):
            index.forget(url)
        await chat.turn(api)
        await other.turn(api)
