"""Types shared by every role: what a generation asks for and what it yields.

Torch-free on purpose: the router and the operator import these without loading a model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

FinishReason = Literal["stop", "length"]


# Limits every boundary applies (the OpenAI API, the workers' internal API, the engine), defined once
# here so that a request the router admits is never refused downstream. README "Request limits".
MIN_TEMPERATURE = 1e-3
"""Smallest positive temperature. Logits are divided by it in float32: at 1e-3 a logit of 1e4 becomes
1e7, far from overflow (3.4e38), and the distribution is already indistinguishable from greedy.
Below ~1e-37 the division overflows to inf and softmax yields NaN."""
MAX_TEMPERATURE = 100.0
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32/int64 tensors; the vocabulary check is tighter
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # per stop string: the frontend holds back this much text while matching
MAX_STOP_TOKEN_IDS = 256
MAX_GENERATION_TOKENS = 2**31 - 1  # max_tokens, min_tokens, top_k; the context window is tighter
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit seed, what torch generators take


class SamplingParams(BaseModel):
    """Per-request sampling, resolved by the frontend (max_tokens is always concrete here).

    Every field is bounded (see the limits above): the same model validates the OpenAI request's
    resolved sampling and the internal API's bodies, so both boundaries refuse the same things.
    Token ids are checked against the vocabulary by whoever knows it (`check_vocabulary`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(
        16, ge=1, le=MAX_GENERATION_TOKENS, description="Tokens to generate, the first one included."
    )
    temperature: float = Field(
        1.0,
        ge=0.0,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        description=f"0 means greedy (deterministic); otherwise at least {MIN_TEMPERATURE:g}.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1, le=MAX_GENERATION_TOKENS, description="-1 or 0 disables top-k.")
    seed: int | None = Field(
        None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Makes sampling reproducible across processes."
    )
    min_tokens: int = Field(
        0, ge=0, le=MAX_GENERATION_TOKENS, description="EOS and stop tokens are masked until this many."
    )
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks need fixed lengths).")
    stop: tuple[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)], ...] = Field(
        (), max_length=MAX_STOP_STRINGS, description="Stop strings, matched on detokenized text."
    )
    stop_token_ids: tuple[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)], ...] = Field(
        (), max_length=MAX_STOP_TOKEN_IDS, description="Extra token ids that end generation."
    )

    @field_validator("top_k")
    @classmethod
    def _zero_disables(cls, value: int) -> int:
        return -1 if value == 0 else value

    @field_validator("temperature")
    @classmethod
    def _sane_temperature(cls, value: float) -> float:
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        maximum = info.data.get("max_tokens")  # validated first (declared first); absent if invalid
        if maximum is not None and value > maximum:
            raise ValueError(f"must not exceed max_tokens ({maximum})")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_vocabulary(prompt_token_ids: Iterable[int], params: SamplingParams, vocab_size: int) -> None:
    """Every token id of a request within `[0, vocab_size)`; GenerationError (400) naming the field.

    Called where the vocabulary is known: the OpenAI frontend (the tokenizer) and the workers (the
    model's embedding). An id past it would index outside the embedding or the logits.
    """
    for field, ids in (("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids)):
        if any(not 0 <= token < vocab_size for token in ids):
            raise GenerationError(
                f"{field}: token ids must be in [0, {vocab_size})",
                status=400,
                kind="invalid_request_error",
                param=field,
            )


RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
"""Printable ASCII without spaces: one byte a character, so any id fits the KV header's 128 bytes."""


class GenerationRequest(BaseModel):
    """A tokenized prompt on its way to an engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: RequestId
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


REQUEST_FAULT = "request_fault"
"""Error type of a request that failed on its own while the worker stayed fine (its sequence failed in
a step others passed): deterministic, so the router returns it instead of retrying another worker."""


class GenerationError(Exception):
    """A request failed; `status` is the HTTP status the client should see, `param` the field at fault."""

    def __init__(
        self, message: str, *, status: int = 500, kind: str = "server_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param


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
