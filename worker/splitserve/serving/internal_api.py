"""The router <-> worker protocol: request and reply bodies of the workers' /internal routes.

Decode: `POST /internal/decode` (DecodeCall) registers a request and answers at once with
`X-Splitserve-Kv-Port`, `X-Splitserve-Cached-Tokens` (leading prompt tokens it already holds, pinned for
the request: the prefill worker need not send them) and `X-Splitserve-Prefill` (`local`: the decode
worker prefills the prompt itself, no prefill worker is to be called; `remote`: one must push the KV
cache), then an NDJSON stream of GenerationChunk lines (or one final error line);
the first line comes when the KV cache has arrived. Closing the connection aborts the request.
Prefill: `POST /internal/prefill` (PrefillCall) answers PrefillReply once the KV cache has been
delivered to `kv_target`. Both: `GET /load` (Load), `GET /health`, `GET /metrics`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from splitserve.engine.params import Load, RequestId, SamplingParams

__all__ = [
    "CACHED_TOKENS_HEADER",
    "KV_PORT_HEADER",
    "NDJSON",
    "PREFILL_HEADER",
    "DecodeCall",
    "Load",
    "PrefillCall",
    "PrefillReply",
]

KV_PORT_HEADER = "X-Splitserve-Kv-Port"
CACHED_TOKENS_HEADER = "X-Splitserve-Cached-Tokens"
PREFILL_HEADER = "X-Splitserve-Prefill"  # "local" | "remote" (contract.names.PrefillPlacement)
NDJSON = "application/x-ndjson"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecodeCall(_Body):
    request_id: RequestId
    prompt_token_ids: tuple[int, ...] = Field(
        min_length=1, description="The prompt itself, so that a preempted stream can be recomputed."
    )
    sampling: SamplingParams
    local_prefill_max_tokens: int = Field(
        0, ge=0, description="Prefill here when the prompt's uncached part is at most this many tokens."
    )
    remote_prefill: bool = Field(
        True, description="False: no prefill worker is available, prefill here whatever the length."
    )


class PrefillCall(_Body):
    request_id: RequestId
    prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    sampling: SamplingParams
    kv_target: str = Field(pattern=r"^[^\s:]+:\d{1,5}$", description="host:port of the decode KV receiver")
    skip_tokens: int = Field(
        0, ge=0, description="Leading prompt tokens the decode worker holds (its Cached-Tokens): not sent."
    )


class PrefillReply(_Body):
    first_token: int
    prompt_len: int
    prefill_seconds: float
    transfer_seconds: float
    kv_bytes: int
    sent_tokens: int = Field(ge=0, description="Prompt tokens whose KV was sent (past skip_tokens).")
