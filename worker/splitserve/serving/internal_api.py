"""The router <-> worker protocol: request and reply bodies of the workers' /internal routes.

Decode: `POST /internal/decode` (DecodeCall) registers a request and answers at once with
`X-Splitserve-Kv-Port` and an NDJSON stream of GenerationChunk lines (or one final error line);
the first line comes when the KV cache has arrived. Closing the connection aborts the request.
Prefill: `POST /internal/prefill` (PrefillCall) answers PrefillReply once the KV cache has been
delivered to `kv_target`. Both: `GET /load` (Load), `GET /health`, `GET /metrics`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from splitserve.engine.params import Load, RequestId, SamplingParams

__all__ = ["KV_PORT_HEADER", "NDJSON", "DecodeCall", "Load", "PrefillCall", "PrefillReply"]

KV_PORT_HEADER = "X-Splitserve-Kv-Port"
NDJSON = "application/x-ndjson"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecodeCall(_Body):
    request_id: RequestId
    prompt_token_ids: tuple[int, ...] = Field(
        min_length=1, description="The prompt itself, so that a preempted stream can be recomputed."
    )
    sampling: SamplingParams


class PrefillCall(_Body):
    request_id: RequestId
    prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    sampling: SamplingParams
    kv_target: str = Field(pattern=r"^[^\s:]+:\d{1,5}$", description="host:port of the decode KV receiver")


class PrefillReply(_Body):
    first_token: int
    prompt_len: int
    prefill_seconds: float
    transfer_seconds: float
    kv_bytes: int
