"""Types shared by every role: what a generation asks for and what it yields.

Torch-free on purpose: the router and the operator import these without loading a model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length"]


class SamplingParams(BaseModel):
    """Per-request sampling, resolved by the frontend (max_tokens is always concrete here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="Tokens to generate, the first one included.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy (deterministic).")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 disables top-k.")
    seed: int | None = Field(None, description="Makes sampling reproducible across processes.")
    min_tokens: int = Field(0, ge=0, description="EOS and stop tokens are masked until this many.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks need fixed lengths).")
    stop: tuple[str, ...] = Field((), description="Stop strings, matched on detokenized text.")
    stop_token_ids: tuple[int, ...] = Field((), description="Extra token ids that end generation.")

    @field_validator("top_k")
    @classmethod
    def _zero_disables(cls, value: int) -> int:
        return -1 if value == 0 else value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationRequest(BaseModel):
    """A tokenized prompt on its way to an engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(min_length=1, max_length=128)
    prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    sampling: SamplingParams


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """New tokens of one request; `finish_reason` is set on the last chunk only.

    A plain dataclass, not a pydantic model: one is made per token on the hot path. Lines from
    another process go through `from_json`, which validates them.
    """

    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None

    def to_json(self) -> bytes:
        """One NDJSON line of the decode worker's stream."""
        return json.dumps({"token_ids": self.token_ids, "finish_reason": self.finish_reason}).encode()

    @classmethod
    def from_json(cls, data: object) -> GenerationChunk:
        """Validate a decoded line; ValueError for anything that is not a chunk."""
        if not isinstance(data, dict) or set(data) - {"token_ids", "finish_reason"}:
            raise ValueError(f"not a generation chunk: {data!r}")
        tokens, finish = data.get("token_ids", []), data.get("finish_reason")
        if not isinstance(tokens, list) or not all(type(token) is int for token in tokens):
            raise ValueError(f"token_ids must be a list of integers: {tokens!r}")
        if finish not in (None, "stop", "length"):
            raise ValueError(f"unknown finish_reason {finish!r}")
        return cls(tuple(tokens), finish)


class GenerationError(Exception):
    """A request failed; `status` is the HTTP status the client should see."""

    def __init__(self, message: str, *, status: int = 500, kind: str = "server_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind


class GenerationBackend(Protocol):
    """What the OpenAI frontend drives: a local engine (`both`) or the prefill/decode pools (router).

    Closing the iterator early (client gone, stop string matched) must abort the request and free
    its KV cache wherever it lives.
    """

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    def is_ready(self) -> bool: ...


class Load(BaseModel):
    """A worker's load as `GET /load` reports it; the router's least-loaded choice reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    running: int
    waiting: int
    kv_cache_usage: float
