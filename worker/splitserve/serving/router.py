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
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from splitserve.contract.config import RoutingConfig
from splitserve.contract.names import (
    DEFAULT_DRAIN_SECONDS,
    PREFILL_PLACEMENTS,
    WORKER_ROLES,
    PrefillPlacement,
    WorkerRole,
)
from splitserve.engine.model_info import context_length, load_tokenizer
from splitserve.engine.params import REQUEST_FAULT, GenerationChunk, GenerationError, GenerationRequest
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
from splitserve.serving.http import serve_app
from splitserve.serving.internal_api import (
    CACHED_TOKENS_HEADER,
    KV_PORT_HEADER,
    PREFILL_HEADER,
    DecodeCall,
    PrefillCall,
    PrefillReply,
)
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


class _RetryError(Exception):
    """This handoff failed before any token; another one, avoiding the blamed workers, may succeed."""

    def __init__(
        self,
        message: str,
        *,
        prefill: Endpoint | None = None,
        decode: Endpoint | None = None,
        status: int = 502,
    ) -> None:
        super().__init__(message)
        self.message, self.prefill, self.decode, self.status = message, prefill, decode, status


class _NoWorkerError(GenerationError):
    """Every endpoint of a role is unhealthy or already failed this request."""

    def __init__(self, role: WorkerRole) -> None:
        super().__init__(f"no healthy {role} worker available", status=503)


class _DecodeLostError(Exception):
    """The decode worker's stream broke (connection reset, EOF before a finish)."""


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

    async def _open(self, request: GenerationRequest, lost: set[str]) -> tuple[_Handoff, GenerationChunk]:
        """A handoff that delivered its first chunk, retried with fresh workers (never the `lost` decode
        workers) while failures are worth another try."""
        avoid: dict[WorkerRole, set[str]] = {"prefill": set(), "decode": set(lost)}
        failure: _RetryError | None = None
        for attempt in range(self.settings.max_attempts):
            request_id = request.request_id if attempt == 0 else f"{request.request_id[:110]}.retry{attempt}"
            handoff = _Handoff(self, request, request_id)
            try:
                return handoff, await handoff.open(avoid)
            except _RetryError as retry:
                handoff.close()
                log.warning(
                    "handoff failed, retrying", extra={"request_id": request_id, "error": retry.message}
                )
                failure = retry
                for endpoint in (retry.prefill, retry.decode):
                    if endpoint is not None:
                        avoid[endpoint.role].add(endpoint.url)
                continue
            except _NoWorkerError as error:
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


class _Handoff:
    """One attempt: a decode registration, one prefill call, the decode stream."""

    def __init__(self, backend: RouterBackend, request: GenerationRequest, request_id: str) -> None:
        self._backend, self._request, self._id = backend, request, request_id
        self._settings = backend.settings
        self._decode: Endpoint | None = None
        self._response: aiohttp.ClientResponse | None = None
        self._prefill_task: asyncio.Task[PrefillReply] | None = None
        self._got_token = False
        self._remote_offered = False  # the registration said a prefill worker is available

    async def open(self, avoid: dict[WorkerRole, set[str]]) -> GenerationChunk:
        """Register, prefill, and wait for the first token; raises _RetryError when another try may work."""
        index = self._backend.placement
        hashes = index.hashes(self._request.prompt_token_ids)
        pick = index.chooser(hashes)
        decode = self._decode = self._backend.pools["decode"].acquire(avoid["decode"], pick)
        if decode is None:
            raise _NoWorkerError("decode")
        index.remember(decode.url, hashes)
        kv_port, cached, placement = await self._register(decode, avoid["prefill"])
        prefill: asyncio.Task[PrefillReply] | None = None
        if placement == "remote":  # else the decode worker prefills the prompt itself
            host = f"[{decode.host}]" if ":" in decode.host else decode.host
            kv_target = f"{host}:{kv_port}"
            prefill = self._prefill_task = asyncio.create_task(
                self._prefill(kv_target, avoid["prefill"], cached)
            )
        first = asyncio.create_task(self.next_chunk(None, started=False))
        try:
            if prefill is not None:
                await asyncio.wait({prefill, first}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                if prefill is not None:
                    prefill.result()  # the prefill failed (raises), or the KV cache is on its way
                try:
                    await asyncio.wait_for(asyncio.shield(first), self._settings.first_token_timeout_s)
                except TimeoutError:
                    waited = self._settings.first_token_timeout_s
                    raise _RetryError(
                        f"decode worker {decode.url} sent no first token within {waited:g}s",
                        decode=decode,
                        status=504,
                    ) from None
            try:
                chunk = first.result()
            except GenerationError:  # the decode worker gave up on it: a failed prefill is the likelier cause
                if prefill is None:
                    raise
                await asyncio.wait({prefill}, timeout=self._settings.connect_timeout_s)
                if prefill.done() and not prefill.cancelled():
                    with contextlib.suppress(GenerationError):
                        prefill.result()  # re-raises a _RetryError
                raise
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
        self._got_token = True
        self._backend.metrics.record_prefill(placement)
        return chunk

    async def _register(self, decode: Endpoint, avoid_prefill: set[str]) -> tuple[int, int, PrefillPlacement]:
        """Register with `decode`: its KV port, the prompt tokens it holds, and where the prompt is
        prefilled (it decides: `local` when the uncached rest is short, or when no prefill worker is
        left to ask, which this call tells it)."""
        remote = self._remote_offered = any(
            e.healthy and e.url not in avoid_prefill for e in self._backend.pools["prefill"].endpoints
        )
        body = DecodeCall(
            request_id=self._id,
            prompt_token_ids=self._request.prompt_token_ids,
            sampling=self._request.sampling,
            local_prefill_max_tokens=self._settings.routing.local_prefill_max_tokens,
            remote_prefill=remote,
        ).model_dump(mode="json")
        try:
            async with asyncio.timeout(self._settings.register_timeout_s):
                response = self._response = await self._backend.session.post(
                    decode.url + "/internal/decode",
                    json=body,
                    timeout=aiohttp.ClientTimeout(connect=self._settings.connect_timeout_s),
                )
                if response.status != 200:
                    await _raise_worker_error(response, decode)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            decode.mark_unhealthy(repr(exc))
            raise _RetryError(f"decode worker {decode.url} unreachable: {exc!r}", decode=decode) from exc
        headers = response.headers
        try:
            kv_port, cached = int(headers[KV_PORT_HEADER]), int(headers[CACHED_TOKENS_HEADER])
            placement = next(p for p in PREFILL_PLACEMENTS if p == headers[PREFILL_HEADER])
        except (KeyError, ValueError, StopIteration):
            raise GenerationError(
                f"decode worker {decode.url} sent no valid {KV_PORT_HEADER}, {CACHED_TOKENS_HEADER} or "
                f"{PREFILL_HEADER} header",
                status=502,
            ) from None
        return kv_port, cached, placement

    async def _prefill(self, kv_target: str, avoid: set[str], skip_tokens: int) -> PrefillReply:
        pool = self._backend.pools["prefill"]
        prefill = pool.acquire(avoid)
        if prefill is None:
            if self._remote_offered:  # the last one went down since the registration: the next try is local
                raise _RetryError("no healthy prefill worker left", status=503)
            raise _NoWorkerError("prefill")
        body = PrefillCall(
            request_id=self._id,
            prompt_token_ids=self._request.prompt_token_ids,
            sampling=self._request.sampling,
            kv_target=kv_target,
            skip_tokens=skip_tokens,
        ).model_dump(mode="json")
        try:
            async with (
                asyncio.timeout(self._settings.prefill_timeout_s),
                self._backend.session.post(
                    prefill.url + "/internal/prefill",
                    json=body,
                    timeout=aiohttp.ClientTimeout(connect=self._settings.connect_timeout_s),
                ) as response,
            ):
                if response.status != 200:
                    await _raise_worker_error(response, prefill)
                result = PrefillReply.model_validate(await response.json())
        except (
            aiohttp.ClientError,
            ConnectionError,
            ValueError,
        ) as exc:  # ValidationError is a ValueError  # aiohttp's timeouts included
            prefill.mark_unhealthy(repr(exc))
            raise _RetryError(f"prefill worker {prefill.url} failed: {exc!r}", prefill=prefill) from exc
        except TimeoutError:
            waited = self._settings.prefill_timeout_s
            raise GenerationError(f"prefill worker {prefill.url} took over {waited:g}s", status=504) from None
        finally:
            pool.release(prefill)
        log.debug("prefill done", extra={"request_id": self._id, **result.model_dump()})
        return result

    async def next_chunk(self, wait_s: float | None, *, started: bool) -> GenerationChunk:
        """The next NDJSON line of the decode stream as a chunk, or the worker's error."""
        assert self._response is not None and self._decode is not None
        decode = self._decode
        try:
            async with asyncio.timeout(wait_s):
                line = b""
                while not line.strip():
                    line = await self._response.content.readline()
                    if not line:
                        raise _DecodeLostError("the stream ended before the request finished")
        except (aiohttp.ClientError, ConnectionError, _DecodeLostError) as exc:
            decode.mark_unhealthy(repr(exc))
            if started:
                message = f"decode worker {decode.url} failed mid-stream: {exc}"
                raise StreamLostError(message, worker=decode.url) from exc
            raise _RetryError(f"decode worker {decode.url} failed: {exc}", decode=decode) from exc
        except TimeoutError:
            raise GenerationError(
                f"decode worker {decode.url} sent nothing for {wait_s}s", status=504
            ) from None
        try:
            data = json.loads(line)
            if "error" in data:
                error = data["error"]
                status = int(error.get("code") or 502)
                kind = str(error.get("type") or "server_error")
                raise GenerationError(
                    str(error.get("message")), kind=kind, status=status if 400 <= status < 600 else 502
                )
            return GenerationChunk.from_json(data)
        except (ValueError, TypeError, AttributeError, ValidationError) as exc:
            raise GenerationError(
                f"decode worker {decode.url} sent an invalid line: {line[:200]!r}", status=502
            ) from exc

    @property
    def decode_url(self) -> str:
        assert self._decode is not None
        return self._decode.url

    def close(self) -> None:
        """Close both connections (aborting whatever still runs there) and release the decode slot.

        Synchronous on purpose: it runs while the request is being torn down, often in a task that is
        itself being cancelled, and an await here could be interrupted halfway and leak the slot.
        """
        prefill, self._prefill_task = self._prefill_task, None
        if prefill is not None:
            if not (self._got_token and not prefill.done()):  # once the KV cache arrived, let it answer
                prefill.cancel()
            self._backend.adopt(prefill)
        if self._response is not None:
            if self._response.content.at_eof():
                self._response.release()
            else:
                self._response.close()
            self._response = None
        if self._decode is not None:
            self._backend.pools["decode"].release(self._decode)
            self._decode = None


async def _raise_worker_error(response: aiohttp.ClientResponse, endpoint: Endpoint) -> None:
    """A worker refused. 4xx is the request's fault, and so is a 5xx marked REQUEST_FAULT (it failed
    alone on a healthy worker, and would fail the same way on the next): returned as is. Any other
    429 or 5xx is worth a retry elsewhere."""
    message, kind, param = response.reason or "no reason given", "server_error", None
    with contextlib.suppress(Exception):
        error = (await response.json())["error"]
        message, kind = str(error["message"]), str(error.get("type") or kind)
        param = str(error["param"]) if error.get("param") else None
    if 400 <= response.status < 500 and response.status != 429:
        raise GenerationError(message, status=response.status, kind="invalid_request_error", param=param)
    if kind == REQUEST_FAULT:
        raise GenerationError(message, status=response.status, kind=REQUEST_FAULT)
    retry = f"{endpoint.role} worker {endpoint.url} answered {response.status}: {message}"
    if endpoint.role == "prefill":
        raise _RetryError(retry, prefill=endpoint)
    raise _RetryError(retry, decode=endpoint)


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
