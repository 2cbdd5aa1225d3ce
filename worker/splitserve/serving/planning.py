"""Request planning: an OpenAI request body -> one validated `GenerationRequest` per choice.

Apart from the app (frontend.py) and from delivering the reply (delivery.py): everything here happens
before a generation starts, and every failure is the client's (a `ProtocolError`, rendered as a 4xx).
The wire rules themselves are protocol.py's; this adds what needs the tokenizer and the model:
chat templates, tokenizing prompts, the context window and the vocabulary.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from splitserve.engine.params import GenerationError, GenerationRequest, SamplingParams, check_vocabulary
from splitserve.serving.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    chat_messages,
    completion_prompts,
    parse_chat_request,
    parse_completion_request,
    sampling_params,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Plan:
    """A validated request: one GenerationRequest per choice, in choice-index order."""

    reply_id: str
    chat: bool
    choices: list[GenerationRequest]
    prompt_tokens: int  # counted once per prompt, however many choices share it
    stream: bool
    include_usage: bool
    continuous_usage: bool  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    return_token_ids: bool


class RequestPlanner:
    """Plans requests for one served model: its name, context window and tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: str, max_model_len: int) -> None:
        self._tokenizer = tokenizer
        self._model = model
        self._max_model_len = max_model_len
        self._vocab_size = len(tokenizer)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self._model:
            raise ProtocolError(
                f"The model `{model}` does not exist.",
                status=404,
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    async def plan(self, request: web.Request, *, chat: bool) -> Plan:
        body = await _read_json_body(request)
        parsed: CompletionRequest | ChatCompletionRequest
        if chat:
            parsed = parse_chat_request(body)
            self.check_model(parsed.model)
            prompts = [await asyncio.to_thread(self._render_chat, parsed)]
            default_max_tokens = None  # the rest of the context, as vLLM does for chat
        else:
            parsed = parse_completion_request(body)
            self.check_model(parsed.model)
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
        return Plan(
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


async def _read_json_body(request: web.Request) -> bytes:
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise ProtocolError(f"Content-Type must be application/json, not {content_type!r}", status=415)
    return await request.read()  # over client_max_size: aiohttp raises 413, rendered by the middleware
