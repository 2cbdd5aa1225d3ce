"""A router over fake prefill/decode workers on loopback (fake_workers.py), driven by the official
`openai` client: the `start_router` fixture (conftest.py) and what its tests assert with."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from transformers import PreTrainedTokenizerBase

from splitserve.contract.names import MIGRATIONS, MigrationOutcome
from splitserve.serving.metrics import Metrics
from splitserve.serving.router import (
    BACKEND_KEY,
    RouterBackend,
    RouterSettings,
    build_router_app,
)
from tests.worker.conftest import Serve
from tests.worker.serving.fake_workers import expected_tokens

MODEL = "tiny"


StartRouter = Callable[..., Awaitable["Router"]]


class Router:
    def __init__(self, url: str, backend: RouterBackend, tokenizer: PreTrainedTokenizerBase) -> None:
        self.url, self.backend, self.tokenizer = url, backend, tokenizer

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=10)

    def expected(self, prompt: str, max_tokens: int) -> str:
        ids = expected_tokens(len(self.tokenizer.encode(prompt)), max_tokens)
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def urls(self, role: str) -> list[str]:
        return sorted(endpoint["url"] for endpoint in self.backend.snapshot()[role])

    def in_flight(self, role: str) -> int:
        return sum(endpoint["in_flight"] for endpoint in self.backend.snapshot()[role])

    def healthy(self, role: str) -> dict[str, bool]:
        return {endpoint["url"]: endpoint["healthy"] for endpoint in self.backend.snapshot()[role]}


@pytest.fixture
def start_router(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> StartRouter:
    """A router over the given worker URLs, with fast polling and short timeouts."""

    async def start(
        prefill: list[str] | None = None, decode: list[str] | None = None, **settings: Any
    ) -> Router:
        resolver = settings.pop("resolver", literal_resolver)
        options: dict[str, Any] = {
            "health_interval_s": 0.1,
            "discovery_interval_s": 0.1,
            "connect_timeout_s": 1.0,
            "first_token_timeout_s": 5.0,
            "idle_timeout_s": 5.0,
        } | settings
        config = RouterSettings(
            model=MODEL, max_model_len=512, prefill=prefill or [], decode=decode or [], **options
        )
        app = build_router_app(
            config, tokenizer=tokenizer, metrics=Metrics(pool="test", role="router"), resolver=resolver
        )
        running = await serve(app)
        return Router(running.url, app[BACKEND_KEY], tokenizer)

    return start


async def literal_resolver(host: str, port: int) -> list[str]:
    return [host]


def migrations(backend: RouterBackend, outcome: MigrationOutcome) -> float:
    """The router's MIGRATIONS counter of one outcome."""
    labels = {"pool": "test", "role": "router", "outcome": outcome}
    return backend.metrics.registry.get_sample_value(MIGRATIONS, labels) or 0.0


async def eventually(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
