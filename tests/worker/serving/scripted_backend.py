"""The OpenAI frontend's test double and client: a backend that streams a fixed text, a server handle.

Shared by the frontend's tests (test_frontend*.py, with the `server` fixture of conftest.py) and by
the drain and vLLM-metrics tests, which build their own app around `ScriptedBackend`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
from transformers import PreTrainedTokenizerBase

from splitserve.engine.params import GenerationChunk, GenerationError, GenerationRequest
from splitserve.serving.metrics import Metrics

MODEL = "tiny"
MAX_MODEL_LEN = 256
MAX_BODY = 64 * 1024
SCRIPT = "Hello, world! How are you today? 世界 🙂"


class ScriptedBackend:
    """Yields the tokens of a fixed text, and records how every generation ended."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text: str = SCRIPT,
        *,
        chunk: int = 1,
        hang_after: int | None = None,
        fail_at: int | None = None,
    ) -> None:
        self.script: list[int] = tokenizer.encode(text)
        self.chunk, self.hang_after, self.fail_at = chunk, hang_after, fail_at
        self.ready = True
        self.requests: list[GenerationRequest] = []
        self.aborted: set[str] = set()
        self.completed: set[str] = set()
        self.linger: asyncio.Event | None = None  # set: closing a generation waits for it

    def is_ready(self) -> bool:
        return self.ready

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        limit = min(request.sampling.max_tokens, len(self.script))
        finish = "length" if request.sampling.max_tokens <= len(self.script) else "stop"
        try:
            for start in range(0, limit, self.chunk):
                if self.fail_at is not None and start >= self.fail_at:
                    raise GenerationError("decode worker 10.0.0.7 died", status=503, kind="server_error")
                if self.hang_after is not None and start >= self.hang_after:
                    await asyncio.sleep(30)  # until the client's disconnect cancels us
                end = min(start + self.chunk, limit)
                yield GenerationChunk(
                    token_ids=tuple(self.script[start:end]), finish_reason=finish if end == limit else None
                )
            self.completed.add(request.request_id)
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.add(request.request_id)
            raise
        finally:
            if self.linger is not None:
                await self.linger.wait()


class Server:
    def __init__(self, backend: ScriptedBackend, url: str, metrics: Metrics) -> None:
        self.backend, self.url, self.metrics = backend, url, metrics

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=10)

    def outcome(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "splitserve_requests_total", {"pool": "test", "role": "router", "outcome": outcome}
        )
        return value or 0.0

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(self.url + path, json=body) as response:
            return response.status, await response.json()


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))
