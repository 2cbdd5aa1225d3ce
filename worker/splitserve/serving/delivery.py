"""Delivering one request's reply: the whole body once every choice is done, or SSE as tokens come.

Apart from the app (frontend.py), which plans the request and owns the choices' tasks: this side only
reads their events off the queue and writes them, and it is where the client-side latency (TTFT at
the first write, ITL between writes) and the request's outcome are measured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from splitserve.contract.names import (
    OUTCOME_CANCELLED,
    OUTCOME_CLIENT_ERROR,
    OUTCOME_SERVER_ERROR,
    OUTCOME_SUCCESS,
)
from splitserve.engine.params import FinishReason, GenerationError
from splitserve.serving.detokenize import Delta
from splitserve.serving.metrics import Metrics
from splitserve.serving.planning import Plan
from splitserve.serving.protocol import error_body
from splitserve.serving.replies import Replies, Usage, sse

log = logging.getLogger(__name__)

_DONE = b"data: [DONE]\n\n"


@dataclass
class ChoiceEvent:
    """What one choice's task hands the reply: a text delta, or the error that ends it."""

    index: int
    delta: Delta | None = None
    error: GenerationError | None = None


@dataclass
class ClientTiming:
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


def generation_error_body(error: GenerationError) -> dict[str, Any]:
    return error_body(error.message, type=error.kind, param=error.param, code=error.status)


async def collect(
    plan: Plan, replies: Replies, queue: asyncio.Queue[ChoiceEvent], timing: ClientTiming
) -> web.Response:
    """The whole reply once every choice has finished."""
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
    body = replies.whole(texts, finishes, completion_tokens, token_ids if plan.return_token_ids else None)
    return web.Response(body=body, content_type="application/json")


async def stream(
    request: web.Request,
    plan: Plan,
    replies: Replies,
    queue: asyncio.Queue[ChoiceEvent],
    timing: ClientTiming,
) -> web.StreamResponse:
    """SSE, opened at the first token, so a failure before it is still a plain HTTP error."""
    response: web.StreamResponse | None = None
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
                timing.outcome = outcome_of(event.error)
                await response.write(sse(generation_error_body(event.error)) + _DONE)
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


def outcome_of(error: GenerationError) -> str:
    return OUTCOME_CLIENT_ERROR if error.status < 500 else OUTCOME_SERVER_ERROR


async def _open_sse(request: web.Request, reply_id: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": reply_id}
    )
    await response.prepare(request)
    return response
