"""Per-request state of the engine's asyncio face (runtime.py): where a request's tokens go and who still
needs its KV blocks. Plain data, kept apart so that the runtime reads as the flows of the three roles.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from splitserve.engine.kv_cache import SequenceKV
from splitserve.engine.params import GenerationChunk, GenerationError, SamplingParams


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    kv: SequenceKV


KVState = Literal["none", "expected", "receiving", "arrived"]


@dataclass(eq=False)
class RequestStream:
    """One request as the runtime's event loop sees it; the runtime frees its KV once nothing needs it
    any more (`busy`, `keeps_kv`)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    outbox: asyncio.Queue[GenerationChunk | GenerationError] = field(default_factory=asyncio.Queue)
    kv: SequenceKV | None = None  # its blocks, once it has some (the engine grows them)
    in_engine: bool = False  # the engine thread holds the sequence
    hold_kv: bool = False  # prefill: the KV outlives the engine's interest until it is shipped
    kv_state: KVState = "none"  # decode: where the pushed KV cache is
    closed: bool = False  # the consumer is gone
    failed: bool = False  # an error was delivered; nothing more will be

    @property
    def busy(self) -> bool:
        """Someone still writes into this stream's KV: the engine, or a transfer in flight."""
        return self.in_engine or self.kv_state == "receiving"

    @property
    def keeps_kv(self) -> bool:
        """Its blocks stay while the consumer is there: a prefill's cache until shipped, a decode
        registration's pinned prefix until the rest arrives (or the request fails)."""
        return self.hold_kv or (self.kv_state == "expected" and not self.failed)
