"""The OpenAI wire format of requests: validation, sampling resolution, error bodies (replies.py: responses).

Pure logic, no I/O, so every rule is testable without a server. Requests are parsed strictly (a
string where a number belongs is a 400, not a silent cast), unknown fields are refused the way
OpenAI refuses them, and options that would change the meaning of the output (logprobs, penalties,
tools...) are accepted only at their neutral value: a request we cannot honour fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitserve.contract import errors
from splitserve.engine.params import SamplingParams
from splitserve.serving.extensions import (
    CHAT_NEUTRAL,
    COMPLETION_NEUTRAL,
    VllmChatExtensions,
    VllmCompletionExtensions,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 128  # prompts × n in one request: each choice is a generation of its own


class ProtocolError(Exception):
    """A request the API refuses; rendered as an OpenAI error body with `status`."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    # vLLM's extension: with include_usage, every chunk also carries its choice's usage so far.
    continuous_usage_stats: bool = False


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _CommonRequest(_Strict):
    """Fields both endpoints share: vLLM's sampling extras included, unsupported options neutral-only."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI documents it for abuse tracking
    # vLLM's extension: each choice (and each streamed chunk) carries its output token ids, so a
    # client can count tokens exactly, e.g. to measure inter-token latency.
    return_token_ids: bool = False
    # Accepted only at their neutral values (see _NEUTRAL).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None


class CompletionRequest(_CommonRequest, VllmCompletionExtensions):
    prompt: Any = Field(description="A string, token ids, or a list of either (a batch).")
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ChatCompletionRequest(_CommonRequest, VllmChatExtensions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # meaningless without tools


def _is_zero(value: Any) -> bool:
    return value is None or value == 0


# Unsupported options, each with the predicate "this value changes nothing".
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": _is_zero,
    "frequency_penalty": _is_zero,
    "repetition_penalty": lambda v: v is None or v == 1,
    "logit_bias": lambda v: not v,
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": _is_zero,
    "echo": lambda v: not v,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
}


_R = TypeVar("_R", bound=_CommonRequest)


def parse_completion_request(body: bytes) -> CompletionRequest:
    request = _parse(CompletionRequest, body, COMPLETION_NEUTRAL)
    if request.best_of is not None and request.best_of != request.n:
        raise ProtocolError("best_of other than n is not supported", param="best_of")
    return request


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    request = _parse(ChatCompletionRequest, body, CHAT_NEUTRAL)
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise ProtocolError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
    return request


def _parse(model: type[_R], body: bytes, extensions: dict[str, Callable[[Any], bool]]) -> _R:
    try:
        request = model.model_validate_json(body)
    except ValidationError as exc:
        raise _protocol_error(exc) from None
    for name, neutral in {**_NEUTRAL, **extensions}.items():
        if name in request.model_fields_set and not neutral(getattr(request, name)):
            raise ProtocolError(f"{name} is not supported by this server", param=name)
    if not 1 <= request.n <= MAX_CHOICES:
        raise ProtocolError(f"n must be between 1 and {MAX_CHOICES}", param="n")
    if request.stream_options is not None and not request.stream:
        raise ProtocolError("stream_options is only allowed with stream=true", param="stream_options")
    return request


def _protocol_error(exc: ValidationError) -> ProtocolError:
    first = exc.errors()[0]
    kind, loc = first["type"], first["loc"]
    param = errors.location(first) or None
    if kind == "json_invalid":
        return ProtocolError(f"malformed JSON body: {first['msg']}")
    if kind == "model_type" and not loc:
        return ProtocolError("the request body must be a JSON object")
    if kind == "extra_forbidden":
        return ProtocolError(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return ProtocolError(f"{param} is required", param=param)
    return ProtocolError(f"{param}: {errors.message(first)}", param=param)


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """Normalise `prompt` into a batch of texts and/or token-id lists, each non-empty."""
    if isinstance(prompt, str) or _is_token_list(prompt):
        batch: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        batch = prompt
    else:
        raise ProtocolError(
            "prompt must be a non-empty string, a list of token ids, or a list of those", param="prompt"
        )
    if any(len(item) == 0 for item in batch):
        raise ProtocolError("prompt must not be empty", param="prompt")
    return batch


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template expects them; text-only content, no tool turns."""
    out = []
    for index, message in enumerate(messages):
        if message.role not in ("system", "developer", "user", "assistant"):
            raise ProtocolError(
                f"messages[{index}].role {message.role!r} is not supported", param=f"messages.{index}.role"
            )
        out.append({"role": message.role, "content": _text_content(message.content, index)})
        if message.name is not None:
            out[-1]["name"] = message.name
    return out


def _text_content(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if isinstance(content, str):
        return content
    parts = content or []
    if content is None or not all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise ProtocolError(
            f"messages[{index}].content must be a string or a list of text parts",
            param=f"messages.{index}.content",
        )
    return "".join(part["text"] for part in parts)


def sampling_params(
    request: _CommonRequest,
    *,
    prompt_len: int,
    max_model_len: int,
    default_max_tokens: int | None,
    choice: int = 0,
) -> SamplingParams:
    """Resolve one choice's sampling; `default_max_tokens=None` means "the rest of the context".

    With n > 1 and a seed, choice i gets seed + i (vLLM's rule), so choices differ but reproduce.
    """
    requested = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        requested = request.max_completion_tokens
    max_tokens = requested if requested is not None else default_max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
        if max_tokens <= 0:
            raise _context_error(prompt_len, 1, max_model_len)
    elif max_tokens <= 0:
        raise ProtocolError("max_tokens must be at least 1", param="max_tokens")
    if prompt_len + max_tokens > max_model_len:
        raise _context_error(prompt_len, max_tokens, max_model_len)
    if request.min_tokens > max_tokens:
        raise ProtocolError(
            f"min_tokens ({request.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if any(not stop for stop in stops):
        raise ProtocolError("stop strings must not be empty", param="stop")
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "min_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
        "stop": tuple(stops),
        "stop_token_ids": tuple(request.stop_token_ids or ()),
        "seed": None if request.seed is None else request.seed + choice,
    }
    for name in ("temperature", "top_p", "top_k"):
        if getattr(request, name) is not None:
            fields[name] = getattr(request, name)
    try:
        return SamplingParams(**fields)
    except ValidationError as exc:
        raise _protocol_error(exc) from None


def _context_error(prompt_len: int, max_tokens: int, max_model_len: int) -> ProtocolError:
    return ProtocolError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
        "Please reduce the length of the prompt or completion.",
        param="max_tokens",
        code="context_length_exceeded",
    )
