"""Process lifecycles of `splitserve worker` and `splitserve router`.

A worker listens first and loads the model second, so probes (and `splitserve up`) see 503 "loading"
instead of a refused connection, and weights never block the health endpoint. SIGTERM (how Kubernetes
stops a pod) drains in-flight requests for a bounded time, then stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Awaitable

from aiohttp import web

from splitserve import STARTED_AT
from splitserve.contract.config import EngineConfig
from splitserve.engine.forward import Engine
from splitserve.engine.loader import load_model
from splitserve.engine.model_info import context_length, load_tokenizer
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.drain import FLUSH_SECONDS, Drain
from splitserve.serving.frontend import build_openai_app
from splitserve.serving.http import start_app
from splitserve.serving.metrics import Metrics
from splitserve.serving.worker_app import (
    DecodeKVSink,
    LocalBackend,
    WorkerState,
    build_decode_app,
    build_prefill_app,
)
from splitserve.transfer.frames import KVLimits
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender

log = logging.getLogger(__name__)
# Share of the decode worker's event-loop thread an arriving KV cache may take while it lands (the engine
# shares its core): a 4,000-token cache stretches the decode steps it overlaps by about this much at
# most, and lands in about 1 / LANDING_SHARE times its CPU time (bench/results/kv_landing.json).
LANDING_SHARE = 0.2


def run_worker(config: EngineConfig, args: argparse.Namespace) -> int:
    asyncio.run(_serve_worker(config, args))
    return 0


def run_router(config: EngineConfig, args: argparse.Namespace) -> int:
    from splitserve.serving.router import RouterSettings, run_router

    settings = RouterSettings(
        model=config.model,
        revision=config.revision,
        served_model_name=config.served_model_name,
        max_model_len=config.max_model_len,
        pool=args.pool,
        host=args.host,
        port=args.port,
        prefill=_urls(args.prefill),
        decode=_urls(args.decode),
        discovery_file=args.discovery_file,
        drain_seconds=args.drain_seconds,
        routing=config.routing,
        block_size=config.block_size,
    )
    asyncio.run(run_router(settings))
    return 0


def _urls(flag: str) -> list[str]:
    return [url.strip() for url in flag.split(",") if url.strip()]


async def _serve_worker(config: EngineConfig, args: argparse.Namespace) -> None:
    role: str = args.role
    state = WorkerState(Metrics(args.pool, role, model_name=config.name), drain=Drain(args.drain_seconds))
    receiver: TcpKVReceiver | None = None
    app: web.Application
    if role == "prefill":
        app = build_prefill_app(state, TcpKVSender())
    elif role == "decode":
        app = build_decode_app(state, args.kv_port)
        limits = KVLimits(max_transfer_bytes=config.max_transfer_bytes)
        receiver = TcpKVReceiver(
            args.host, args.kv_port, DecodeKVSink(state), limits, landing_share=LANDING_SHARE
        )
    else:
        tokenizer = await asyncio.to_thread(load_tokenizer, config.model, config.revision)
        app = build_openai_app(
            LocalBackend(state),
            tokenizer,
            served_model_name=config.name,
            max_model_len=await asyncio.to_thread(
                context_length, config.model, config.revision, config.max_model_len
            ),
            metrics=state.metrics,
            drain=state.drain,
        )
    running = await start_app(app, host=args.host, port=args.port, shutdown_timeout=FLUSH_SECONDS)
    if receiver is not None:
        await receiver.start()
    log.info("listening, loading model", extra={"role": role, "url": running.url, "model": config.model})

    async def load() -> None:
        engine = Engine(await asyncio.to_thread(load_model, config))
        runtime = EngineRuntime(engine, config, role, state.metrics)  # type: ignore[arg-type]
        await runtime.start()
        state.runtime = runtime
        startup = time.monotonic() - STARTED_AT
        state.metrics.startup_seconds.set(startup)
        log.info("ready", extra={"role": role, "url": running.url, "startup_seconds": round(startup, 1)})

    try:
        await until_signal(load())
        await state.drain.run()  # not ready, no new work; open requests and KV transfers finish
    finally:
        await running.close()  # writes what the drain left (errors past its deadline), bounded
        if receiver is not None:
            await receiver.close()
        if state.runtime is not None:
            await state.runtime.close()


async def until_signal(startup: Awaitable[None]) -> None:
    """Run `startup`, then wait for SIGTERM/SIGINT; a signal during startup stops it too."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(startup)
    try:
        await asyncio.wait(
            [starting, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if starting.done():
            starting.result()  # a failed model load ends the process with its error
            await stop.wait()
        else:
            starting.cancel()
        log.info("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
