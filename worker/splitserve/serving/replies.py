"""The OpenAI wire format of responses: whole replies, SSE chunks, usage.

Apart from the requests (protocol.py) because the two change for different reasons: requests are
about what a client may ask and how it is refused, responses about the exact bodies OpenAI clients
parse. Pure, no I/O: `Replies` renders one request's bodies, the frontend only writes them.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from splitserve.engine.params import FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def counted(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


# Present only when the client asked for them (return_token_ids), absent otherwise.
_TOKEN_IDS = Field(None, exclude_if=lambda value: value is None)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = _TOKEN_IDS


class CompletionResponse(BaseModel):
    """A whole completion, and (object "text_completion" too) each streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = _TOKEN_IDS


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant"} on a choice's first chunk, then {"content": ...}
    logprobs: None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = _TOKEN_IDS


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Replies:
    """The response bodies of one request in its endpoint's format: a whole reply, or SSE chunks."""

    def __init__(
        self, reply_id: str, model: str, *, chat: bool, prompt_tokens: int, include_usage: bool = False
    ) -> None:
        self._id, self._model, self._chat = reply_id, model, chat
        self._prompt_tokens, self._include_usage = prompt_tokens, include_usage
        self._created = int(time.time())
        self._opened: set[int] = set()  # chat choices whose first chunk (with the role) went out

    def usage(self, completion_tokens: int) -> Usage:
        return Usage.counted(self._prompt_tokens, completion_tokens)

    def whole(
        self,
        texts: list[str],
        finishes: list[FinishReason | None],
        completion_tokens: int,
        token_ids: list[list[int]] | None = None,
    ) -> str:
        """`token_ids` (one list per choice) only when the client asked for them."""
        head: dict[str, Any] = {
            "id": self._id,
            "created": self._created,
            "model": self._model,
            "usage": self.usage(completion_tokens),
        }
        ids: list[list[int] | None] = list(token_ids) if token_ids is not None else [None] * len(texts)
        results = list(enumerate(zip(texts, finishes, ids, strict=True)))
        if self._chat:
            return ChatCompletionResponse(
                **head,
                choices=[
                    ChatChoice(
                        index=i,
                        message=ChatResponseMessage(content=text),
                        finish_reason=finish,
                        token_ids=choice_ids,
                    )
                    for i, (text, finish, choice_ids) in results
                ],
            ).model_dump_json()
        return CompletionResponse(
            **head,
            choices=[
                CompletionChoice(index=i, text=text, finish_reason=finish, token_ids=choice_ids)
                for i, (text, finish, choice_ids) in results
            ],
        ).model_dump_json()

    def chunk(
        self,
        index: int,
        text: str,
        finish_reason: FinishReason | None,
        token_ids: list[int] | None = None,
        usage: Usage | None = None,
    ) -> bytes:
        """`usage`: this choice's counts so far, for vLLM's continuous_usage_stats."""
        head: dict[str, Any] = {"id": self._id, "created": self._created, "model": self._model}
        head["usage"] = usage
        chunk: CompletionResponse | ChatCompletionChunk
        if self._chat:
            delta = {} if index in self._opened else {"role": "assistant"}
            self._opened.add(index)
            if text or "role" in delta:
                delta["content"] = text
            chunk = ChatCompletionChunk(
                **head,
                choices=[
                    ChatChunkChoice(
                        index=index, delta=delta, finish_reason=finish_reason, token_ids=token_ids
                    )
                ],
            )
        else:
            chunk = CompletionResponse(
                **head,
                choices=[
                    CompletionChoice(index=index, text=text, finish_reason=finish_reason, token_ids=token_ids)
                ],
            )
        # With include_usage, OpenAI sends "usage": null on every chunk and the numbers in a last one.
        return sse(chunk.model_dump(exclude=None if self._include_usage else {"usage"}))

    def usage_chunk(self, completion_tokens: int) -> bytes:
        head: dict[str, Any] = {
            "id": self._id,
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": self.usage(completion_tokens),
        }
        chunk = ChatCompletionChunk(**head) if self._chat else CompletionResponse(**head)
        return sse(chunk.model_dump())


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
