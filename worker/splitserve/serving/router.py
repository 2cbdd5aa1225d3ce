"""The router's `GenerationBackend`: one request = a decode worker, a prefill worker and a KV handoff.

Per request: register with a decode worker (`POST /internal/decode`, which answers at once with its KV
port, how many leading prompt tokens it already holds and where the prompt is to be prefilled, then
streams NDJSON tokens); unless it prefills the prompt itself (a short uncached rest, or no prefill worker
left: conditional disaggregation), ask the least loaded prefill worker to run the prompt and ship the KV
cache of the tokens the decode worker lacks (`POST /internal/prefill`); relay the decode stream. The
decode worker is the one whose cached prefix best outweighs its load (kv_index.py), or the least loaded
(`routing.strategy`).

Failure rules. Before the first token nothing reached the client, so a whole handoff is retried
(bounded) with fresh workers: a prefill worker that refuses or dies, a decode worker that refuses or
dies before its first token. Each retry registers a fresh decode request, so a half-sent KV cache
never meets a second one; when no prefill worker is left to try, the retry is prefilled on the decode
worker. 4xx answers, and 5xx marked REQUEST_FAULT, are the request's fault and are returned, not
retried. After the first token, a dying decode worker's streams move to other decode workers up to
`routing.migration_limit` times each (migration.py), or fail with a 502 (only those streams) once the
limit is reached. Closing the generator (client gone, stop string) closes both internal connections,
which aborts the work on both workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitserve.contract.config import RoutingConfig
from splitserve.contract.names import (
    DEFAULT_DRAIN_SECONDS,
    WORKER_ROLES,
    WorkerRole,
)
from splitserve.engine.model_info import context_length, load_tokenizer
from splitserve.engine.params import GenerationChunk, GenerationError, GenerationRequest
from splitserve.serving.drain import FLUSH_SECONDS, Drain
from splitserve.serving.endpoints import (
    Discovery,
    Endpoint,
    EndpointPool,
    Resolver,
    Seed,
    probe,
    resolve_all,
)
from splitserve.serving.frontend import build_openai_app
from splitserve.serving.handoff import Handoff, NoWorkerError, RetryError
from splitserve.serving.http import serve_app
from splitserve.serving.kv_index import DecodePlacement
from splitserve.serving.metrics import Metrics
from splitserve.serving.migration import StreamLostError, resumed_request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class RouterSettings(BaseModel):
    """Everything `splitserve router` is configured with; each timeout bounds one wait."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, description="Tokenizer source and default served model name.")
    revision: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = Field(None, ge=16, description="Defaults to the model config's positions.")
    pool: str = Field("default", description="`pool` label of the metrics.")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    prefill: list[str] = Field(default_factory=list, description="Prefill worker URLs (hostnames resolved).")
    decode: list[str] = Field(default_factory=list, description="Decode worker URLs (hostnames resolved).")
    discovery_file: Path | None = Field(None, description='JSON {"prefill": [urls], "decode": [urls]}.')
    discovery_interval_s: float = Field(3.0, gt=0, description="Hostnames and the file are re-read so often.")
    health_interval_s: float = Field(1.0, gt=0, description="How often each endpoint's /health is polled.")
    connect_timeout_s: float = Field(5.0, gt=0)
    register_timeout_s: float = Field(30.0, gt=0, description="Decode worker: registration answer.")
    prefill_timeout_s: float = Field(600.0, gt=0, description="Prefill worker: prompt run plus KV delivery.")
    first_token_timeout_s: float = Field(120.0, gt=0, description="Decode: first token after the prefill.")
    idle_timeout_s: float = Field(120.0, gt=0, description="Decode: longest silence mid-stream.")
    max_attempts: int = Field(3, ge=1, description="Handoffs tried per request before the first token.")
    drain_seconds: float = Field(
        DEFAULT_DRAIN_SECONDS, ge=0, description="On SIGTERM: how long open streams may run before they fail."
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="Placement: the engine config's `routing` block."
    )
    block_size: int = Field(16, ge=1, description="The workers' KV block: the router's index hashes these.")

    @model_validator(mode="after")
    def _check_workers(self) -> RouterSettings:
        for url in (*self.prefill, *self.decode):
            Seed.parse(url)
        if self.discovery_file is None and not (self.prefill and self.decode):
            raise ValueError("give --prefill and --decode worker URLs, or --discovery-file")
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class RouterBackend:
    """The prefill and decode pools behind the OpenAI frontend. `start()` before use, `close()` after."""

    def __init__(
        self, settings: RouterSettings, *, resolver: Resolver = resolve_all, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(pool=settings.pool, role="router", model_name=settings.name)
        self.placement = DecodePlacement(
            settings.routing, model=settings.model, revision=settings.revision, block_size=settings.block_size
        )
        self.pools: dict[WorkerRole, EndpointPool] = {role: EndpointPool(role) for role in WORKER_ROLES}
        seeds: dict[WorkerRole, list[Seed]] = {
            "prefill": [Seed.parse(u) for u in settings.prefill],
            "decode": [Seed.parse(u) for u in settings.decode],
        }
        self._discovery = Discovery(seeds, settings.discovery_file, resolver)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """One discovery and health round now (ready at once if workers are up), then keep polling."""
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        await self._discover()  # probes every endpoint it finds
        self._spawn(self._every(self.settings.discovery_interval_s, self._discover))
        self._spawn(self._every(self.settings.health_interval_s, lambda: self._probe(self._all_endpoints())))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def is_ready(self) -> bool:
        """Decode workers suffice: with no prefill worker up they prefill the prompts themselves."""
        return self.pools["decode"].any_healthy()

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every endpoint's state, for GET /router/endpoints and tests."""
        return {
            role: [
                {
                    "url": e.url,
                    "healthy": e.healthy,
                    "in_flight": e.in_flight,
                    "reported_load": e.reported_load,
                    "kv_cache_usage": e.kv_cache_usage,
                }
                for e in pool.endpoints
            ]
            for role, pool in self.pools.items()
        }

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _every(self, interval: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await action()
            except Exception:
                log.exception("router maintenance failed")

    def _all_endpoints(self) -> list[Endpoint]:
        return [endpoint for pool in self.pools.values() for endpoint in pool.endpoints]

    async def _discover(self) -> None:
        addresses = await self._discovery.addresses()
        added = [e for role, pool in self.pools.items() for e in pool.update(addresses[role])]
        self.placement.index.retain({endpoint.url for endpoint in self.pools["decode"].endpoints})
        await self._probe(added)

    async def _probe(self, endpoints: list[Endpoint]) -> None:
        limit_s = self.settings.connect_timeout_s
        await asyncio.gather(*(probe(self.session, endpoint, limit_s) for endpoint in endpoints))

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RouterBackend.start() was not called")
        return self._session

    # ---------------------------------------------------------------------------------- generation

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Relay one request's tokens; a decode worker lost mid-stream hands the rest to another
        (migration.py) up to `routing.migration_limit` times, unseen by the client."""
        produced: list[int] = []
        current, moves, lost = request, 0, set[str]()
        while True:
            handoff, chunk = await self._open(current, lost)
            try:
                if moves:
                    self.metrics.record_migration("resumed")
                while True:
                    produced += chunk.token_ids
                    yield chunk
                    if chunk.finish_reason is not None:
                        # The decode worker now caches the answer too: the conversation's next turn sends it.
                        everything = (*request.prompt_token_ids, *produced)
                        self.placement.remember(handoff.decode_url, self.placement.hashes(everything))
                        return
                    chunk = await handoff.next_chunk(self.settings.idle_timeout_s, started=True)
            except StreamLostError as error:
                self.placement.forget(error.worker)
                if moves >= self.settings.routing.migration_limit:
                    self.metrics.record_migration("exhausted")
                    raise
                moves += 1
                lost.add(error.worker)
                log.warning(
                    "decode stream lost, resuming on another worker",
                    extra={"request_id": request.request_id, "error": error.message, "tokens": len(produced)},
                )
                current = resumed_request(request, produced, moves)
            finally:
                handoff.close()

    async def _open(self, request: GenerationRequest, lost: set[str]) -> tuple[Handoff, GenerationChunk]:
        """A handoff that delivered its first chunk, retried with fresh workers (never the `lost` decode
        workers) while failures are worth another try."""
        avoid: dict[WorkerRole, set[str]] = {"prefill": set(), "decode": set(lost)}
        failure: RetryError | None = None
        for attempt in range(self.settings.max_attempts):
            request_id = request.request_id if attempt == 0 else f"{request.request_id[:110]}.retry{attempt}"
            handoff = Handoff(self, request, request_id)
            try:
                return handoff, await handoff.open(avoid)
            except RetryError as retry:
                handoff.close()
                log.warning(
                    "handoff failed, retrying", extra={"request_id": request_id, "error": retry.message}
                )
                failure = retry
                for endpoint in (retry.prefill, retry.decode):
                    if endpoint is not None:
                        avoid[endpoint.role].add(endpoint.url)
                continue
            except NoWorkerError as error:
                handoff.close()
                if failure is None:
                    raise
                raise GenerationError(
                    f"{failure.message}; {error.message} to retry on", status=failure.status
                ) from None
            except BaseException:
                handoff.close()
                raise
        assert failure is not None
        raise GenerationError(
            f"{failure.message} (gave up after {self.settings.max_attempts} attempts)", status=failure.status
        )

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Keep a prefill call that is finishing (or being cancelled) referenced until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())


BACKEND_KEY = web.AppKey("router_backend", RouterBackend)


def build_router_app(
    settings: RouterSettings,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    metrics: Metrics | None = None,
    resolver: Resolver = resolve_all,
) -> web.Application:
    """The router's whole HTTP app: the OpenAI API over a RouterBackend that starts and stops with it."""
    if tokenizer is None:
        tokenizer = load_tokenizer(settings.model, settings.revision)
    backend = RouterBackend(settings, resolver=resolver, metrics=metrics)
    app = build_openai_app(
        backend,
        tokenizer,
        served_model_name=settings.name,
        max_model_len=settings.max_model_len or context_length(settings.model, settings.revision),
        metrics=backend.metrics,
        drain=Drain(settings.drain_seconds),
    )
    app[BACKEND_KEY] = backend

    async def endpoints(request: web.Request) -> web.Response:
        return web.json_response(backend.snapshot())

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await backend.start()
        yield
        await backend.close()

    app.router.add_get("/router/endpoints", endpoints)
    app.cleanup_ctx.append(lifecycle)
    return app


async def run_router(settings: RouterSettings) -> None:
    """`splitserve router`: serve until SIGTERM/SIGINT."""
    app = build_router_app(settings)
    await serve_app(app, host=settings.host, port=settings.port, shutdown_timeout=FLUSH_SECONDS)
