"""HTTP faces of a worker: the /internal routes of prefill and decode, and the `both` backend.

The server starts before the model loads so /health can say 503 ("loading") to probes and to
`splitserve up`; the routes answer 503 until `WorkerState.runtime` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from aiohttp import web
from pydantic import ValidationError

from splitserve.contract.errors import location, one_line
from splitserve.engine.kv_cache import KVLayout, SequenceKV
from splitserve.engine.params import GenerationChunk, GenerationError, GenerationRequest, check_vocabulary
from splitserve.engine.runtime import EngineRuntime
from splitserve.engine.streams import PrefillResult
from splitserve.serving.drain import LIVENESS_QUERY, Drain
from splitserve.serving.frontend import DEFAULT_MAX_BODY_BYTES, error_response
from splitserve.serving.internal_api import (
    CACHED_TOKENS_HEADER,
    KV_PORT_HEADER,
    NDJSON,
    PREFILL_HEADER,
    DecodeCall,
    PrefillCall,
    PrefillReply,
)
from splitserve.serving.metrics import Metrics
from splitserve.transfer.base import KVDestination, KVRejected, KVSender, KVTransferError, TransferStats
from splitserve.transfer.frames import KVHeader

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    metrics: Metrics
    runtime: EngineRuntime | None = None
    drain: Drain = field(default_factory=Drain)

    def ready_runtime(self) -> EngineRuntime:
        if self.runtime is None:
            raise GenerationError("the model is still loading", status=503, kind="service_unavailable")
        return self.runtime


STATE = web.AppKey("worker_state", WorkerState)


class LocalBackend:
    """`GenerationBackend` of the colocated `both` role: this process's own engine."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self.state.ready_runtime().generate(request)

    def is_ready(self) -> bool:
        return self.state.runtime is not None


def add_common_routes(app: web.Application, state: WorkerState) -> None:
    """/health, /load, /metrics: what probes, the router and Prometheus read from every worker."""

    async def health(request: web.Request) -> web.Response:
        if state.runtime is None:
            return web.json_response({"status": "loading"}, status=503)
        if state.drain.draining and LIVENESS_QUERY not in request.query:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok"})

    async def load(_: web.Request) -> web.Response:
        try:
            return web.json_response(state.ready_runtime().load().model_dump())
        except GenerationError as error:
            return error_response(error.status, error.message, type=error.kind, param=error.param)

    async def metrics(_: web.Request) -> web.Response:
        body, content_type = state.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/load", load)
    app.router.add_get("/metrics", metrics)


Body = TypeVar("Body", DecodeCall, PrefillCall)


async def _parse(request: web.Request, model: type[Body]) -> Body:
    """The body, validated with the same limits the OpenAI frontend applied (SamplingParams)."""
    try:
        return model.model_validate(await request.json())
    except ValidationError as error:
        param = location(error.errors()[0]) or None
        raise GenerationError(
            one_line(error), status=400, kind="invalid_request_error", param=param
        ) from error
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, absurd numbers or nesting
        raise GenerationError(f"malformed JSON: {error}", status=400, kind="invalid_request_error") from error


# ---- prefill ------------------------------------------------------------------------------------


async def ship_kv(
    sender: KVSender, target: str, request_id: str, result: PrefillResult, skip_tokens: int = 0
) -> TransferStats:
    """Send a prefilled prompt's cache (but its first `skip_tokens` tokens, which the decode worker
    holds) and first token to the decode worker at `target`, straight from its blocks (in frames of
    whole blocks of this worker's block size)."""
    layout = result.kv.layout
    header = KVHeader.for_blocks(
        request_id,
        result.first_token,
        result.kv.length,
        (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype),
        result.kv.pool.block_size,
        first_position=skip_tokens,
    )
    return await sender.send(target, header, result.kv)


def build_prefill_app(state: WorkerState, sender: KVSender) -> web.Application:
    """POST /internal/prefill: run the prompt, push its KV cache to the chosen decode worker."""

    async def prefill(request: web.Request) -> web.Response:
        try:
            call = await _parse(request, PrefillCall)
            runtime = state.ready_runtime()
            check_vocabulary(call.prompt_token_ids, call.sampling, runtime.engine.loaded.vocab_size)
            if call.skip_tokens >= len(call.prompt_token_ids):
                raise GenerationError(
                    f"skip_tokens ({call.skip_tokens}) must be below the prompt length "
                    f"({len(call.prompt_token_ids)}): the last token is always sent",
                    status=400,
                    kind="invalid_request_error",
                    param="skip_tokens",
                )
            generation = GenerationRequest(
                request_id=call.request_id, prompt_token_ids=call.prompt_token_ids, sampling=call.sampling
            )
            started = time.perf_counter()
            with state.drain.request(partial(runtime.fail, call.request_id)):
                async with runtime.prefill(generation) as result:
                    prefilled = time.perf_counter()
                    stats = await ship_kv(sender, call.kv_target, call.request_id, result, call.skip_tokens)
            state.metrics.kv_transfer_seconds.observe(stats.seconds)
            state.metrics.kv_transfer_bytes.inc(stats.bytes)
            reply = PrefillReply(
                first_token=result.first_token,
                prompt_len=len(call.prompt_token_ids),  # (the shipped blocks may be freed by now)
                prefill_seconds=prefilled - started,
                transfer_seconds=stats.seconds,
                kv_bytes=stats.bytes,
                sent_tokens=len(call.prompt_token_ids) - call.skip_tokens,
            )
            return web.json_response(reply.model_dump())
        except GenerationError as error:
            return error_response(error.status, error.message, type=error.kind, param=error.param)
        except KVTransferError as error:
            state.metrics.record_kv_transfer_failure(error.code.name.lower())
            message = f"KV transfer to the decode worker failed: {error}"
            return error_response(502, message, type="kv_transfer_error")

    app = web.Application(client_max_size=DEFAULT_MAX_BODY_BYTES)  # whatever the router admits
    add_common_routes(app, state)
    app.router.add_post("/internal/prefill", prefill)
    return app


# ---- decode -------------------------------------------------------------------------------------


def build_decode_app(state: WorkerState, kv_port: int) -> web.Application:
    """POST /internal/decode: register a request, then stream its tokens as NDJSON once KV arrives."""

    async def decode(request: web.Request) -> web.StreamResponse:
        with contextlib.ExitStack() as held:  # open for the drain until the last line is written
            try:
                call = await _parse(request, DecodeCall)
                runtime = state.ready_runtime()
                check_vocabulary(call.prompt_token_ids, call.sampling, runtime.engine.loaded.vocab_size)
                held.enter_context(state.drain.request(partial(runtime.fail, call.request_id)))
                placement = runtime.register(
                    call.request_id,
                    list(call.prompt_token_ids),
                    call.sampling,
                    local_max_tokens=call.local_prefill_max_tokens,
                    remote_available=call.remote_prefill,
                )
            except GenerationError as error:
                return error_response(error.status, error.message, type=error.kind, param=error.param)
            headers = {
                KV_PORT_HEADER: str(kv_port),
                CACHED_TOKENS_HEADER: str(placement.cached),
                PREFILL_HEADER: placement.prefill,
                "Content-Type": NDJSON,
            }
            response = web.StreamResponse(headers=headers)
            tokens = runtime.stream(call.request_id)
            try:
                await response.prepare(request)  # the router reads this as "registered"
                async for chunk in tokens:
                    await response.write(chunk.to_json() + b"\n")
            except GenerationError as error:
                line = {"error": {"message": error.message, "type": error.kind, "code": error.status}}
                await response.write(json.dumps(line).encode() + b"\n")
            finally:
                await tokens.aclose()  # aborts the request if the router went away
            await response.write_eof()
            return response

    app = web.Application(client_max_size=DEFAULT_MAX_BODY_BYTES)  # whatever the router admits
    add_common_routes(app, state)
    app.router.add_post("/internal/decode", decode)
    return app


class DecodeKVSink:
    """Where pushed KV caches land: the runtime's reservation for the request they belong to."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    async def open(self, header: KVHeader) -> KVDestination:
        try:
            runtime = self.state.ready_runtime()
            sent = KVLayout(header.num_layers, header.num_kv_heads, header.head_dim, header.dtype)
            reason = runtime.pool.layout.mismatch(sent)
            if reason is not None:
                raise KVRejected(reason)
            kv = await runtime.receive_kv(header.request_id, header.num_tokens, header.first_position)
        except GenerationError as error:
            raise KVRejected(error.message) from error
        return _Destination(runtime, header, kv, self.state.metrics)


class _Destination:
    """Blocks taken for one arriving cache: frames land in them after the prefix pinned at registration
    (a block size other than the sender's is fine, tokens go to their own slots); the engine sees them
    only at `commit`."""

    def __init__(self, runtime: EngineRuntime, header: KVHeader, kv: SequenceKV, metrics: Metrics) -> None:
        self.runtime, self.header, self.kv, self.metrics = runtime, header, kv, metrics
        self.started = time.perf_counter()
        self.cached_blocks = kv.pool.blocks_for(header.first_position)  # whole blocks: what was pinned

    def runs(self, layer: int, begin: int, end: int) -> list[memoryview]:
        return self.kv.runs(layer, begin, end)

    def commit(self) -> None:
        self.metrics.kv_transfer_seconds.observe(time.perf_counter() - self.started)
        self.metrics.kv_transfer_bytes.inc(self.header.sent_tokens * self.kv.layout.bytes_per_token)
        self.metrics.record_kv_handoff(self.cached_blocks, len(self.kv.block_table) - self.cached_blocks)
        self.runtime.kv_arrived(self.header.request_id, self.kv, self.header.first_token)

    def abort(self, reason: str) -> None:
        self.runtime.kv_failed(self.header.request_id, reason)
