"""The real serving stack in one process: a prefill worker, a decode worker (with its KV port), a
router over them and a colocated `both` worker, each with its own engine on the tiny model.

The servers run on an event loop in a thread of their own, so that synchronous tests (hypothesis
drives its examples synchronously) can hit them with a fresh client loop per example.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from splitserve.contract.config import EngineConfig
from splitserve.contract.names import EngineRole
from splitserve.engine.forward import Engine
from splitserve.engine.loader import load_model
from splitserve.engine.model_info import load_tokenizer
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.frontend import build_openai_app
from splitserve.serving.http import RunningApp, start_app
from splitserve.serving.metrics import Metrics
from splitserve.serving.router import RouterSettings, build_router_app
from splitserve.serving.worker_app import (
    DecodeKVSink,
    LocalBackend,
    WorkerState,
    build_decode_app,
    build_prefill_app,
)
from splitserve.transfer.frames import KVLimits
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender

MODEL = "tiny"
MAX_MODEL_LEN = 256
_T = TypeVar("_T")


class LiveStack:
    """URLs of the four servers; `decode_kv_port` is where prefill workers push KV caches."""

    def __init__(self, tiny_model: Path) -> None:
        self.config = EngineConfig(
            model=str(tiny_model),
            served_model_name=MODEL,
            max_model_len=MAX_MODEL_LEN,
            kv_cache_bytes=64 << 20,
            kv_timeout_seconds=10,
            prefill_chunk_size=64,
            chunked_prefill=True,
            threads=1,
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-stack", daemon=True)
        self._running: list[RunningApp] = []
        self._runtimes: list[EngineRuntime] = []
        self._receiver: TcpKVReceiver | None = None
        self.urls: dict[str, str] = {}
        self.decode_kv_port = 0

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 120) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _worker(self, role: EngineRole) -> WorkerState:
        state = WorkerState(Metrics("fuzz", role))
        engine = Engine(await asyncio.to_thread(load_model, self.config))
        runtime = EngineRuntime(engine, self.config, role, state.metrics)
        await runtime.start()
        self._runtimes.append(runtime)
        state.runtime = runtime
        return state

    async def _start(self) -> None:
        tokenizer = await asyncio.to_thread(load_tokenizer, self.config.model)
        prefill = await self._worker("prefill")
        self._running.append(await start_app(build_prefill_app(prefill, TcpKVSender()), shutdown_timeout=1))
        decode = await self._worker("decode")
        self._receiver = TcpKVReceiver("127.0.0.1", 0, DecodeKVSink(decode), KVLimits())
        await self._receiver.start()
        self.decode_kv_port = self._receiver.port
        self._running.append(
            await start_app(build_decode_app(decode, self.decode_kv_port), shutdown_timeout=1)
        )
        settings = RouterSettings(
            model=self.config.model,
            served_model_name=MODEL,
            max_model_len=MAX_MODEL_LEN,
            prefill=[self._running[0].url],
            decode=[self._running[1].url],
        )
        router = build_router_app(settings, tokenizer=tokenizer, metrics=Metrics("fuzz", "router"))
        self._running.append(await start_app(router, shutdown_timeout=1))
        both = await self._worker("both")
        backend = LocalBackend(both)
        app = build_openai_app(
            backend, tokenizer, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, metrics=both.metrics
        )
        self._running.append(await start_app(app, shutdown_timeout=1))
        self.urls = dict(
            zip(("prefill", "decode", "router", "both"), (r.url for r in self._running), strict=True)
        )

    async def _stop(self) -> None:
        for running in reversed(self._running):
            await running.close()
        if self._receiver is not None:
            await self._receiver.close()
        for runtime in self._runtimes:
            await runtime.close()

    @contextmanager
    def serving(self) -> Iterator[LiveStack]:
        self._thread.start()
        try:
            self.run(self._start())
            yield self
        finally:
            self.run(self._stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
