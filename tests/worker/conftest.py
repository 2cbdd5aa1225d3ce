"""Fixtures of the worker suites: the tiny offline model's tokenizer, and loopback servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
from aiohttp import web
from transformers import PreTrainedTokenizerBase

from splitserve.contract.config import EngineConfig
from splitserve.engine.model_info import load_tokenizer
from splitserve.serving.http import RunningApp, start_app

if TYPE_CHECKING:
    from splitserve.engine.forward import Engine


class Serve(Protocol):
    def __call__(
        self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0
    ) -> Awaitable[RunningApp]: ...


@pytest.fixture(scope="module")
def int8_engines(tiny_model: Path) -> tuple[Engine, Engine]:
    """Two engines on the tiny model's weights that store KV as int8 (a prefill and a decode side).
    The engine is imported here, as tests/conftest.py's tiny_model does, not when suites are collected."""
    from splitserve.engine.forward import Engine
    from splitserve.engine.loader import load_model

    config = EngineConfig(model=str(tiny_model), threads=1, kv_cache_dtype="int8")
    return Engine(load_model(config)), Engine(load_model(config))


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(tiny_model))


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start aiohttp apps on 127.0.0.1 (free ports) the way production serves them; stop at teardown."""
    running: list[RunningApp] = []

    async def start(app: web.Application, *, host: str = "127.0.0.1", port: int = 0) -> RunningApp:
        running.append(await start_app(app, host=host, port=port, shutdown_timeout=1.0))
        return running[-1]

    yield start
    for app in reversed(running):
        await app.close()
