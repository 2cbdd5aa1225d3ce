"""The OpenAI-compatible HTTP API over any `GenerationBackend`: the router's public face and `both`'s.

One request becomes one generation per choice (prompts × n). Each choice runs in a task of its own
that detokenizes and applies stop strings, then hands text deltas to the handler through a bounded
queue (a slow client therefore slows its backend stream down instead of buffering it here). The
handler owns every task: whatever way it ends (done, error, client gone and handler cancelled), the
tasks are cancelled and each closes its backend iterator, which aborts the generation and frees its
KV cache wherever it lives.

Metrics are what the client sees: TTFT when the first token is written, ITL between writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web

from splitserve.contract.names import (
    OUTCOME_CANCELLED,
    OUTCOME_CLIENT_ERROR,
    OUTCOME_SERVER_ERROR,
    OUTCOME_SUCCESS,
)
from splitserve.engine.params import (
    FinishReason,
    GenerationBackend,
    GenerationError,
    GenerationRequest,
    SamplingParams,
    check_vocabulary,
)
from splitserve.serving.detokenize import Delta, OutputStream
from splitserve.serving.drain import DRAIN_KEY, LIVENESS_QUERY, Drain
from splitserve.serving.metrics import Metrics
from splitserve.serving.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    chat_messages,
    completion_prompts,
    error_body,
    parse_chat_request,
    parse_completion_request,
    sampling_params,
)
from splitserve.serving.replies import Replies, Usage, sse

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEFAULT_MAX_BODY_BYTES = 32 << 20  # a full long-context prompt as JSON token ids, batched, fits
_DONE = b"data: [DONE]\n\n"
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


def _generation_error_body(error: GenerationError) -> dict[str, Any]:
    return error_body(error.message, type=error.kind, param=error.param, code=error.status)


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


@dataclass(frozen=True)
class _Plan:
    """A validated request: one GenerationRequest per choice, in choice-index order."""

    reply_id: str
    chat: bool
    choices: list[GenerationRequest]
    prompt_tokens: int  # counted once per prompt, however many choices share it
    stream: bool
    include_usage: bool
    continuous_usage: bool  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    return_token_ids: bool


@dataclass
class _Event:
    index: int
    delta: Delta | None = None
    error: GenerationError | None = None


@dataclass
class _Timing:
    """Client-side latency of one request, observed as tokens are written, and how it ended.

    `outcome` is settled the moment it is known (a stream's [DONE] written, say), not when the
    handler returns: a client that closes the socket right after [DONE] cancels the handler during
    its cleanup, and that request still succeeded.
    """

    metrics: Metrics
    arrival: float
    last_write: dict[int, float] = field(default_factory=dict)
    outcome: str = OUTCOME_CANCELLED
    # Per choice, for vLLM's per-request series: first write, tokens written, finish reason.
    first_write: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)

    def written(self, index: int, tokens: int, finish_reason: str | None = None) -> None:
        now = time.monotonic()
        if finish_reason is not None:
            self.finish_reasons[index] = finish_reason
        if tokens == 0:
            return
        previous = self.last_write.get(index)
        if not self.last_write:
            self.metrics.ttft.observe(now - self.arrival)
        elif previous is not None:
            for _ in range(tokens):  # k tokens in one write share the gap evenly
                self.metrics.itl.observe((now - previous) / tokens)
        self.last_write[index] = now
        self.first_write.setdefault(index, now)
        self.tokens[index] = self.tokens.get(index, 0) + tokens
        self.metrics.generation_tokens.inc(tokens)

    def finished(self) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        for index, first in self.first_write.items():
            self.metrics.vllm.request_timed(first, self.last_write[index], self.tokens[index])
        self.metrics.vllm.request_succeeded([self.finish_reasons.get(i) for i in sorted(self.finish_reasons)])


def _fail_into(queue: asyncio.Queue[_Event], error: GenerationError) -> None:
    """End a request from outside (the drain's deadline): its reply loop reads `error` next."""
    asyncio.get_running_loop().create_task(queue.put(_Event(0, error=error)))


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
        self._vocab_size = len(tokenizer)
        self._created = int(time.time())

    # ------------------------------------------------------------------------------------ routes

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
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

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._model:
            raise ProtocolError(
                f"The model `{model}` does not exist.",
                status=404,
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    # -------------------------------------------------------------------------------- validation

    async def _plan(self, request: web.Request, *, chat: bool) -> _Plan:
        body = await _read_json_body(request)
        parsed: CompletionRequest | ChatCompletionRequest
        if chat:
            parsed = parse_chat_request(body)
            self._check_model(parsed.model)
            prompts = [await asyncio.to_thread(self._render_chat, parsed)]
            default_max_tokens = None  # the rest of the context, as vLLM does for chat
        else:
            parsed = parse_completion_request(body)
            self._check_model(parsed.model)
            items = completion_prompts(parsed.prompt)
            if len(items) * parsed.n > MAX_CHOICES:
                raise ProtocolError(f"prompts × n must not exceed {MAX_CHOICES}", param="n")
            # Tokenizing a long prompt takes milliseconds: off the loop that relays other streams.
            prompts = await asyncio.to_thread(lambda: [self._tokenize(item) for item in items])
            default_max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        count = len(prompts) * parsed.n
        choices: list[GenerationRequest] = []
        for token_ids in prompts:
            for sample in range(parsed.n):
                sampling = sampling_params(
                    parsed,
                    prompt_len=len(token_ids),
                    choice=sample,
                    max_model_len=self._max_model_len,
                    default_max_tokens=default_max_tokens,
                )
                if sample == 0:  # every choice of a prompt has the same token ids
                    self._check_vocabulary(token_ids, sampling)
                request_id = reply_id if count == 1 else f"{reply_id}-{len(choices)}"
                choices.append(
                    GenerationRequest(request_id=request_id, prompt_token_ids=token_ids, sampling=sampling)
                )
        options = parsed.stream_options
        include_usage = options is not None and options.include_usage
        continuous_usage = include_usage and options is not None and options.continuous_usage_stats
        prompt_tokens = sum(len(token_ids) for token_ids in prompts)
        return _Plan(
            reply_id,
            chat,
            choices,
            prompt_tokens,
            parsed.stream,
            include_usage,
            continuous_usage,
            parsed.return_token_ids,
        )

    def _check_vocabulary(self, token_ids: tuple[int, ...], sampling: SamplingParams) -> None:
        try:
            check_vocabulary(token_ids, sampling, self._vocab_size)
        except GenerationError as error:
            raise ProtocolError(error.message, param=error.param) from None

    def _tokenize(self, item: str | list[int]) -> tuple[int, ...]:
        if isinstance(item, list):
            return tuple(item)
        token_ids = tuple(self._tokenizer.encode(item))
        if not token_ids:
            raise ProtocolError("prompt must not be empty", param="prompt")
        return token_ids

    def _render_chat(self, request: ChatCompletionRequest) -> tuple[int, ...]:
        """Template to text, then tokens without special-token insertion (the template has them)."""
        messages = chat_messages(request.messages)
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises its own errors for malformed conversations
            raise ProtocolError(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from exc
        return tuple(self._tokenizer.encode(str(text), add_special_tokens=False))

    # -------------------------------------------------------------------------------- generation

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        timing = _Timing(self._metrics, time.monotonic())
        try:
            try:
                plan = await self._plan(request, chat=chat)
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

    async def _run(self, request: web.Request, plan: _Plan, timing: _Timing) -> web.StreamResponse:
        queue: asyncio.Queue[_Event] = asyncio.Queue(maxsize=2 * len(plan.choices))
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
                    return await self._stream(request, plan, queue, timing)
                return await self._collect(plan, queue, timing)
            except GenerationError as error:  # nothing was sent yet: a plain error response
                log.warning(
                    "request failed",
                    extra={"request_id": plan.reply_id, "status": error.status, "error": error.message},
                )
                timing.outcome = _outcome_of(error)
                return web.json_response(_generation_error_body(error), status=error.status)
            finally:
                await _finish(tasks, graceful=timing.outcome == OUTCOME_SUCCESS)

    def _replies(self, plan: _Plan) -> Replies:
        return Replies(
            plan.reply_id,
            self._model,
            chat=plan.chat,
            prompt_tokens=plan.prompt_tokens,
            include_usage=plan.include_usage,
        )

    async def _produce(
        self, index: int, request: GenerationRequest, queue: asyncio.Queue[_Event], *, eager_tokens: bool
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
                    await queue.put(_Event(index, delta))
                if delta.finish_reason:
                    return
            raise GenerationError("the generation ended without a finish reason", status=502)
        except GenerationError as error:
            await queue.put(_Event(index, error=error))
        except Exception as exc:
            log.exception("backend failed", extra={"request_id": request.request_id})
            await queue.put(_Event(index, error=GenerationError(f"internal error: {exc}", status=500)))
        finally:
            await _aclose(chunks)

    async def _collect(self, plan: _Plan, queue: asyncio.Queue[_Event], timing: _Timing) -> web.Response:
        texts = [""] * len(plan.choices)
        token_ids: list[list[int]] = [[] for _ in plan.choices]
        finishes: list[FinishReason | None] = [None] * len(plan.choices)
        while any(finish is None for finish in finishes):
            event = await queue.get()
            if event.error is not None:
                raise event.error
            assert event.delta is not None
            timing.written(event.index, event.delta.tokens, event.delta.finish_reason)
            texts[event.index] += event.delta.text
            token_ids[event.index] += event.delta.token_ids
            finishes[event.index] = event.delta.finish_reason
        timing.finished()
        timing.outcome = OUTCOME_SUCCESS
        completion_tokens = sum(len(ids) for ids in token_ids)
        body = self._replies(plan).whole(
            texts, finishes, completion_tokens, token_ids if plan.return_token_ids else None
        )
        return web.Response(body=body, content_type="application/json")

    async def _stream(
        self, request: web.Request, plan: _Plan, queue: asyncio.Queue[_Event], timing: _Timing
    ) -> web.StreamResponse:
        """SSE, opened at the first token, so a failure before it is still a plain HTTP error."""
        response: web.StreamResponse | None = None
        replies = self._replies(plan)
        remaining = len(plan.choices)
        generated = [0] * len(plan.choices)
        try:
            while remaining:
                event = await queue.get()
                if event.error is not None:
                    if response is None:
                        raise event.error
                    log.warning(
                        "stream failed", extra={"request_id": plan.reply_id, "error": event.error.message}
                    )
                    timing.outcome = _outcome_of(event.error)
                    await response.write(sse(_generation_error_body(event.error)) + _DONE)
                    await response.write_eof()
                    return response
                if response is None:
                    response = await _open_sse(request, plan.reply_id)
                assert event.delta is not None
                ids = list(event.delta.token_ids) if plan.return_token_ids else None
                generated[event.index] += event.delta.tokens
                usage = None
                if plan.continuous_usage:  # vLLM counts per choice: its own prompt, its tokens so far
                    prompt = len(plan.choices[event.index].prompt_token_ids)
                    usage = Usage.counted(prompt, generated[event.index])
                await response.write(
                    replies.chunk(event.index, event.delta.text, event.delta.finish_reason, ids, usage)
                )
                timing.written(event.index, event.delta.tokens, event.delta.finish_reason)
                remaining -= event.delta.finish_reason is not None
            assert response is not None
            if plan.include_usage:
                await response.write(replies.usage_chunk(sum(generated)))
            await response.write(_DONE)
            timing.finished()
            timing.outcome = OUTCOME_SUCCESS  # whatever the client does from here
            await response.write_eof()
            return response
        except ConnectionResetError:  # the client went away between our writes
            return response or web.Response(status=499)


def _outcome_of(error: GenerationError) -> str:
    return OUTCOME_CLIENT_ERROR if error.status < 500 else OUTCOME_SERVER_ERROR


async def _open_sse(request: web.Request, reply_id: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": reply_id}
    )
    await response.prepare(request)
    return response


async def _read_json_body(request: web.Request) -> bytes:
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise ProtocolError(f"Content-Type must be application/json, not {content_type!r}", status=415)
    return await request.read()  # over client_max_size: aiohttp raises 413, rendered by the middleware


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
