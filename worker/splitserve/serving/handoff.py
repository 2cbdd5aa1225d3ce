"""One attempt at serving a request across the pools: a decode registration, at most one prefill call,
and the decode worker's NDJSON stream (`Handoff`); the router (router.py) retries, and migrates
streams, around it.

Split from router.py so that the backend's policy (which workers, how many attempts, when a stream
moves) reads apart from the wire work of one attempt. The exceptions here tell the router what happened:
`RetryError` (nothing reached the client, another attempt may work), `NoWorkerError` (no endpoint of a
role left to try), `StreamLostError` (migration.py: the decode worker died after the first token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

import aiohttp
from pydantic import ValidationError

from splitserve.contract.names import PREFILL_PLACEMENTS, PrefillPlacement, WorkerRole
from splitserve.engine.params import REQUEST_FAULT, GenerationChunk, GenerationError, GenerationRequest
from splitserve.serving.endpoints import Endpoint
from splitserve.serving.internal_api import (
    CACHED_TOKENS_HEADER,
    KV_PORT_HEADER,
    PREFILL_HEADER,
    DecodeCall,
    PrefillCall,
    PrefillReply,
)
from splitserve.serving.migration import StreamLostError

if TYPE_CHECKING:
    from splitserve.serving.router import RouterBackend

log = logging.getLogger(__name__)


class RetryError(Exception):
    """This handoff failed before any token; another one, avoiding the blamed workers, may succeed."""

    def __init__(
        self,
        message: str,
        *,
        prefill: Endpoint | None = None,
        decode: Endpoint | None = None,
        status: int = 502,
    ) -> None:
        super().__init__(message)
        self.message, self.prefill, self.decode, self.status = message, prefill, decode, status


class NoWorkerError(GenerationError):
    """Every endpoint of a role is unhealthy or already failed this request."""

    def __init__(self, role: WorkerRole) -> None:
        super().__init__(f"no healthy {role} worker available", status=503)


class DecodeLostError(Exception):
    """The decode worker's stream broke (connection reset, EOF before a finish)."""


class Handoff:
    """One attempt: a decode registration, one prefill call, the decode stream."""

    def __init__(self, backend: RouterBackend, request: GenerationRequest, request_id: str) -> None:
        self._backend, self._request, self._id = backend, request, request_id
        self._settings = backend.settings
        self._decode: Endpoint | None = None
        self._response: aiohttp.ClientResponse | None = None
        self._prefill_task: asyncio.Task[PrefillReply] | None = None
        self._got_token = False
        self._remote_offered = False  # the registration said a prefill worker is available

    async def open(self, avoid: dict[WorkerRole, set[str]]) -> GenerationChunk:
        """Register, prefill, and wait for the first token; raises RetryError when another try may work."""
        index = self._backend.placement
        hashes = index.hashes(self._request.prompt_token_ids)
        pick = index.chooser(hashes)
        decode = self._decode = self._backend.pools["decode"].acquire(avoid["decode"], pick)
        if decode is None:
            raise NoWorkerError("decode")
        index.remember(decode.url, hashes)
        kv_port, cached, placement = await self._register(decode, avoid["prefill"])
        prefill: asyncio.Task[PrefillReply] | None = None
        if placement == "remote":  # else the decode worker prefills the prompt itself
            host = f"[{decode.host}]" if ":" in decode.host else decode.host
            kv_target = f"{host}:{kv_port}"
            prefill = self._prefill_task = asyncio.create_task(
                self._prefill(kv_target, avoid["prefill"], cached)
            )
        first = asyncio.create_task(self.next_chunk(None, started=False))
        try:
            if prefill is not None:
                await asyncio.wait({prefill, first}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                if prefill is not None:
                    prefill.result()  # the prefill failed (raises), or the KV cache is on its way
                try:
                    await asyncio.wait_for(asyncio.shield(first), self._settings.first_token_timeout_s)
                except TimeoutError:
                    waited = self._settings.first_token_timeout_s
                    raise RetryError(
                        f"decode worker {decode.url} sent no first token within {waited:g}s",
                        decode=decode,
                        status=504,
                    ) from None
            try:
                chunk = first.result()
            except GenerationError:  # the decode worker gave up on it: a failed prefill is the likelier cause
                if prefill is None:
                    raise
                await asyncio.wait({prefill}, timeout=self._settings.connect_timeout_s)
                if prefill.done() and not prefill.cancelled():
                    with contextlib.suppress(GenerationError):
                        prefill.result()  # re-raises a RetryError
                raise
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
        self._got_token = True
        self._backend.metrics.record_prefill(placement)
        return chunk

    async def _register(self, decode: Endpoint, avoid_prefill: set[str]) -> tuple[int, int, PrefillPlacement]:
        """Register with `decode`: its KV port, the prompt tokens it holds, and where the prompt is
        prefilled (it decides: `local` when the uncached rest is short, or when no prefill worker is
        left to ask, which this call tells it)."""
        remote = self._remote_offered = any(
            e.healthy and e.url not in avoid_prefill for e in self._backend.pools["prefill"].endpoints
        )
        body = DecodeCall(
            request_id=self._id,
            prompt_token_ids=self._request.prompt_token_ids,
            sampling=self._request.sampling,
            local_prefill_max_tokens=self._settings.routing.local_prefill_max_tokens,
            remote_prefill=remote,
        ).model_dump(mode="json")
        try:
            async with asyncio.timeout(self._settings.register_timeout_s):
                response = self._response = await self._backend.session.post(
                    decode.url + "/internal/decode",
                    json=body,
                    timeout=aiohttp.ClientTimeout(connect=self._settings.connect_timeout_s),
                )
                if response.status != 200:
                    await raise_worker_error(response, decode)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            decode.mark_unhealthy(repr(exc))
            raise RetryError(f"decode worker {decode.url} unreachable: {exc!r}", decode=decode) from exc
        headers = response.headers
        try:
            kv_port, cached = int(headers[KV_PORT_HEADER]), int(headers[CACHED_TOKENS_HEADER])
            placement = next(p for p in PREFILL_PLACEMENTS if p == headers[PREFILL_HEADER])
        except (KeyError, ValueError, StopIteration):
            raise GenerationError(
                f"decode worker {decode.url} sent no valid {KV_PORT_HEADER}, {CACHED_TOKENS_HEADER} or "
                f"{PREFILL_HEADER} header",
                status=502,
            ) from None
        return kv_port, cached, placement

    async def _prefill(self, kv_target: str, avoid: set[str], skip_tokens: int) -> PrefillReply:
        pool = self._backend.pools["prefill"]
        prefill = pool.acquire(avoid)
        if prefill is None:
            if self._remote_offered:  # the last one went down since the registration: the next try is local
                raise RetryError("no healthy prefill worker left", status=503)
            raise NoWorkerError("prefill")
        body = PrefillCall(
            request_id=self._id,
            prompt_token_ids=self._request.prompt_token_ids,
            sampling=self._request.sampling,
            kv_target=kv_target,
            skip_tokens=skip_tokens,
        ).model_dump(mode="json")
        try:
            async with (
                asyncio.timeout(self._settings.prefill_timeout_s),
                self._backend.session.post(
                    prefill.url + "/internal/prefill",
                    json=body,
                    timeout=aiohttp.ClientTimeout(connect=self._settings.connect_timeout_s),
                ) as response,
            ):
                if response.status != 200:
                    await raise_worker_error(response, prefill)
                result = PrefillReply.model_validate(await response.json())
        except (
            aiohttp.ClientError,
            ConnectionError,
            ValueError,
        ) as exc:  # ValidationError is a ValueError  # aiohttp's timeouts included
            prefill.mark_unhealthy(repr(exc))
            raise RetryError(f"prefill worker {prefill.url} failed: {exc!r}", prefill=prefill) from exc
        except TimeoutError:
            waited = self._settings.prefill_timeout_s
            raise GenerationError(f"prefill worker {prefill.url} took over {waited:g}s", status=504) from None
        finally:
            pool.release(prefill)
        log.debug("prefill done", extra={"request_id": self._id, **result.model_dump()})
        return result

    async def next_chunk(self, wait_s: float | None, *, started: bool) -> GenerationChunk:
        """The next NDJSON line of the decode stream as a chunk, or the worker's error."""
        assert self._response is not None and self._decode is not None
        decode = self._decode
        try:
            async with asyncio.timeout(wait_s):
                line = b""
                while not line.strip():
                    line = await self._response.content.readline()
                    if not line:
                        raise DecodeLostError("the stream ended before the request finished")
        except (aiohttp.ClientError, ConnectionError, DecodeLostError) as exc:
            decode.mark_unhealthy(repr(exc))
            if started:
                message = f"decode worker {decode.url} failed mid-stream: {exc}"
                raise StreamLostError(message, worker=decode.url) from exc
            raise RetryError(f"decode worker {decode.url} failed: {exc}", decode=decode) from exc
        except TimeoutError:
            raise GenerationError(
                f"decode worker {decode.url} sent nothing for {wait_s}s", status=504
            ) from None
        try:
            data = json.loads(line)
            if "error" in data:
                error = data["error"]
                status = int(error.get("code") or 502)
                kind = str(error.get("type") or "server_error")
                raise GenerationError(
                    str(error.get("message")), kind=kind, status=status if 400 <= status < 600 else 502
                )
            return GenerationChunk.from_json(data)
        except (ValueError, TypeError, AttributeError, ValidationError) as exc:
            raise GenerationError(
                f"decode worker {decode.url} sent an invalid line: {line[:200]!r}", status=502
            ) from exc

    @property
    def decode_url(self) -> str:
        assert self._decode is not None
        return self._decode.url

    def close(self) -> None:
        """Close both connections (aborting whatever still runs there) and release the decode slot.

        Synchronous on purpose: it runs while the request is being torn down, often in a task that is
        itself being cancelled, and an await here could be interrupted halfway and leak the slot.
        """
        prefill, self._prefill_task = self._prefill_task, None
        if prefill is not None:
            if not (self._got_token and not prefill.done()):  # once the KV cache arrived, let it answer
                prefill.cancel()
            self._backend.adopt(prefill)
        if self._response is not None:
            if self._response.content.at_eof():
                self._response.release()
            else:
                self._response.close()
            self._response = None
        if self._decode is not None:
            self._backend.pools["decode"].release(self._decode)
            self._decode = None


async def raise_worker_error(response: aiohttp.ClientResponse, endpoint: Endpoint) -> None:
    """A worker refused. 4xx is the request's fault, and so is a 5xx marked REQUEST_FAULT (it failed
    alone on a healthy worker, and would fail the same way on the next): returned as is. Any other
    429 or 5xx is worth a retry elsewhere."""
    message, kind, param = response.reason or "no reason given", "server_error", None
    with contextlib.suppress(Exception):
        error = (await response.json())["error"]
        message, kind = str(error["message"]), str(error.get("type") or kind)
        param = str(error["param"]) if error.get("param") else None
    if 400 <= response.status < 500 and response.status != 429:
        raise GenerationError(message, status=response.status, kind="invalid_request_error", param=param)
    if kind == REQUEST_FAULT:
        raise GenerationError(message, status=response.status, kind=REQUEST_FAULT)
    retry = f"{endpoint.role} worker {endpoint.url} answered {response.status}: {message}"
    if endpoint.role == "prefill":
        raise RetryError(retry, prefill=endpoint)
    raise RetryError(retry, decode=endpoint)
