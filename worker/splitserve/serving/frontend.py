"""The OpenAI-compatible HTTP API over any `GenerationBackend`: the router's public face and `both`'s.

One request becomes one generation per choice (prompts × n). Each choice runs in a task of its own
that detokenizes and applies stop strings, then hands text deltas to the handler through a bounded
queue (a slow client therefore slows its backend stream down instead of buffering it here). The
handler owns every task: whatever way it ends (done, error, client gone and handler cancelled), the
tasks are cancelled and each closes its backend iterator, which aborts the generation and frees its
KV cache wherever it lives.

Metrics are what the client sees: TTFT when the first token is written, ITL between writes. Planning
a request is planning.py's, writing its reply (whole or SSE) delivery.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web

from splitserve.contract.names import OUTCOME_CLIENT_ERROR, OUTCOME_SERVER_ERROR, OUTCOME_SUCCESS
from splitserve.engine.params import GenerationBackend, GenerationError, GenerationRequest
from splitserve.serving.delivery import (
    ChoiceEvent,
    ClientTiming,
    collect,
    generation_error_body,
    outcome_of,
    stream,
)
from splitserve.serving.detokenize import OutputStream
from splitserve.serving.drain import DRAIN_KEY, LIVENESS_QUERY, Drain
from splitserve.serving.metrics import Metrics
from splitserve.serving.planning import Plan, RequestPlanner
from splitserve.serving.protocol import ProtocolError, error_body
from splitserve.serving.replies import Replies

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEFAULT_MAX_BODY_BYTES = 32 << 20  # a full long-context prompt as JSON token ids, batched, fits
CLEANUP_GRACE_S = 5.0  # how long finished generations may take to close their backend streams


def build_openai_app(
    backend: GenerationBackend,
    tokenizer: PreTrainedTokenizerBase,
    *,
    served_model_name: str,
    max_model_len: int,
    metrics: Metrics,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    drain: Drain | None = None,
) -> web.Application:
    """The OpenAI routes plus /health and /metrics. Serve it with `splitserve.serving.http.start_app`;
    `drain` (under DRAIN_KEY) is what `serve_app` runs on SIGTERM."""
    drain = drain if drain is not None else Drain()
    api = _OpenAIApi(backend, tokenizer, served_model_name, max_model_len, metrics, drain)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_openai_errors])
    app[DRAIN_KEY] = drain
    app.add_routes(
        [
            web.post("/v1/completions", api.completions),
            web.post("/v1/chat/completions", api.chat_completions),
            web.get("/v1/models", api.models),
            web.get("/v1/models/{model}", api.model),
            web.get("/health", api.health),
            web.get("/metrics", api.metrics),
        ]
    )
    return app


def error_response(
    status: int, message: str, *, type: str, param: str | None = None, code: str | int | None = None
) -> web.Response:
    return web.json_response(error_body(message, type=type, param=param, code=code), status=status)


@web.middleware
async def _openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every refusal, aiohttp's own (404, 405, 413) included, as an OpenAI error body."""
    try:
        return await handler(request)
    except ProtocolError as exc:
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = (
            "not_found_error"
            if exc.status == 404
            else ("invalid_request_error" if exc.status < 500 else "server_error")
        )
        return error_response(exc.status, exc.text or exc.reason, type=kind)
    except Exception:
        log.exception("unexpected error", extra={"path": request.path})
        return error_response(500, "internal server error", type="server_error")


def _fail_into(queue: asyncio.Queue[ChoiceEvent], error: GenerationError) -> None:
    """End a request from outside (the drain's deadline): its reply loop reads `error` next."""
    asyncio.get_running_loop().create_task(queue.put(ChoiceEvent(0, error=error)))


class _OpenAIApi:
    def __init__(
        self,
        backend: GenerationBackend,
        tokenizer: PreTrainedTokenizerBase,
        model: str,
        max_model_len: int,
        metrics: Metrics,
        drain: Drain,
    ) -> None:
        self._backend = backend
        self._drain = drain
        self._tokenizer = tokenizer
        self._model = model
        self._max_model_len = max_model_len
        self._metrics = metrics
        self._planner = RequestPlanner(tokenizer, model, max_model_len)
        self._created = int(time.time())

    # ------------------------------------------------------------------------------------ routes

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._planner.check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        if self._drain.draining and LIVENESS_QUERY not in request.query:
            return web.json_response({"status": "draining"}, status=503)
        ready = self._backend.is_ready()
        return web.json_response({"status": "ready" if ready else "not ready"}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self._model,
            "object": "model",
            "created": self._created,
            "owned_by": "splitserve",
            "root": self._model,
            "parent": None,
            "max_model_len": self._max_model_len,
        }

    # -------------------------------------------------------------------------------- generation

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        timing = ClientTiming(self._metrics, time.monotonic())
        try:
            try:
                plan = await self._planner.plan(request, chat=chat)
            except (ProtocolError, web.HTTPException):
                timing.outcome = OUTCOME_CLIENT_ERROR
                raise
            self._metrics.prompt_tokens.inc(plan.prompt_tokens)
            try:
                return await self._run(request, plan, timing)
            except Exception:
                timing.outcome = OUTCOME_SERVER_ERROR
                raise
        finally:
            self._metrics.request_finished(timing.outcome)

    async def _run(self, request: web.Request, plan: Plan, timing: ClientTiming) -> web.StreamResponse:
        queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue(maxsize=2 * len(plan.choices))
        tasks: list[asyncio.Task[None]] = []
        with contextlib.ExitStack() as held:  # open for the drain until the reply is complete
            try:
                held.enter_context(self._drain.request(partial(_fail_into, queue)))  # 503 once draining
                tasks = [
                    asyncio.create_task(
                        self._produce(index, choice, queue, eager_tokens=plan.return_token_ids)
                    )
                    for index, choice in enumerate(plan.choices)
                ]
                if plan.stream:
                    return await stream(request, plan, self._replies(plan), queue, timing)
                return await collect(plan, self._replies(plan), queue, timing)
            except GenerationError as error:  # nothing was sent yet: a plain error response
                log.warning(
                    "request failed",
                    extra={"request_id": plan.reply_id, "status": error.status, "error": error.message},
                )
                timing.outcome = outcome_of(error)
                return web.json_response(generation_error_body(error), status=error.status)
            finally:
                await _finish(tasks, graceful=timing.outcome == OUTCOME_SUCCESS)

    def _replies(self, plan: Plan) -> Replies:
        return Replies(
            plan.reply_id,
            self._model,
            chat=plan.chat,
            prompt_tokens=plan.prompt_tokens,
            include_usage=plan.include_usage,
        )

    async def _produce(
        self, index: int, request: GenerationRequest, queue: asyncio.Queue[ChoiceEvent], *, eager_tokens: bool
    ) -> None:
        """Drive one choice's backend stream; closing it early (stop string, cancel) aborts the generation."""
        output = OutputStream(
            self._tokenizer, request.prompt_token_ids, request.sampling, eager_tokens=eager_tokens
        )
        chunks = self._backend.generate(request)
        try:
            async for chunk in chunks:
                delta = output.add(chunk)
                if delta.text or delta.finish_reason or delta.token_ids:
                    await queue.put(ChoiceEvent(index, delta))
                if delta.finish_reason:
                    return
            raise GenerationError("the generation ended without a finish reason", status=502)
        except GenerationError as error:
            await queue.put(ChoiceEvent(index, error=error))
        except Exception as exc:
            log.exception("backend failed", extra={"request_id": request.request_id})
            await queue.put(ChoiceEvent(index, error=GenerationError(f"internal error: {exc}", status=500)))
        finally:
            await _aclose(chunks)


async def _finish(tasks: list[asyncio.Task[None]], *, graceful: bool) -> None:
    """End every choice's task. After success they are only closing their backend streams: let them,
    for a bounded time, rather than cancel that cleanup halfway. Otherwise cancel them at once."""
    try:
        if graceful:
            await asyncio.wait(tasks, timeout=CLEANUP_GRACE_S)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("closing a generation failed", exc_info=result)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
