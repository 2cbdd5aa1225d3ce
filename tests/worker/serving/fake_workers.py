"""Prefill and decode workers that speak the internal API for real (HTTP + a TCP KV port), minus the model.

The "KV cache" a fake prefill ships is one JSON line carrying the first token; the fake decode
waits for it on its KV port, then streams `first, first+1, ...`. Each fake records what it saw
(registrations, requests, disconnects) and can be told to misbehave.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from aiohttp import web

from splitserve.engine.params import REQUEST_FAULT
from splitserve.serving.http import RunningApp
from splitserve.serving.internal_api import CACHED_TOKENS_HEADER, KV_PORT_HEADER, PREFILL_HEADER
from tests.worker.conftest import Serve


def first_token(prompt_len: int) -> int:
    return 40 + prompt_len % 50


def expected_tokens(prompt_len: int, max_tokens: int) -> list[int]:
    return [first_token(prompt_len) + i for i in range(max_tokens)]


def _error(status: int, message: str, kind: str | None = None) -> web.Response:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class _FakeWorker:
    def __init__(self) -> None:
        self.running: RunningApp | None = None
        self.disconnected: set[str] = set()  # request ids whose connection went away mid-request
        self.health_delay = 0.0  # a worker whose loop is busy answers late
        self._active: dict[int, web.Request] = {}  # id() -> request: requests are not hashable

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.port

    def _app(self, route: str, handler: Any) -> web.Application:
        app = web.Application()
        app.add_routes(
            [web.post(route, handler), web.get("/health", self._health), web.get("/load", self._load)]
        )
        return app

    async def _health(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay)
        return web.json_response({"status": "ok"})

    async def _load(self, request: web.Request) -> web.Response:
        return web.json_response({"running": len(self._active), "waiting": 0, "kv_cache_usage": 0.0})

    async def die(self) -> None:
        """Like a killed process: every open connection reset, nothing listening any more."""
        for request in list(self._active.values()):
            if request.transport is not None:
                request.transport.abort()
        assert self.running is not None
        await self.running.close()


class FakeDecode(_FakeWorker):
    def __init__(
        self, *, token_delay: float = 0.0, kv_budget_tokens: int = 100_000, error_after: int | None = None
    ) -> None:
        super().__init__()
        self.token_delay, self.kv_budget_tokens, self.error_after = token_delay, kv_budget_tokens, error_after
        self.registered: list[dict[str, Any]] = []
        self.finished: set[str] = set()
        self.kv_port = 0
        self._kv_server: asyncio.Server | None = None
        self._waiting_for_kv: dict[str, asyncio.Future[int]] = {}

    async def start(self, serve: Serve, *, host: str = "127.0.0.1", port: int = 0) -> FakeDecode:
        self._kv_server = await asyncio.start_server(self._receive_kv, host, 0)
        self.kv_port = self._kv_server.sockets[0].getsockname()[1]
        app = self._app("/internal/decode", self._decode)
        app.on_cleanup.append(self._close_kv_port)
        self.running = await serve(app, host=host, port=port)
        return self

    async def _close_kv_port(self, app: web.Application) -> None:
        assert self._kv_server is not None
        self._kv_server.close()
        await self._kv_server.wait_closed()

    async def _receive_kv(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = json.loads(await reader.readline())
        waiter = self._waiting_for_kv.get(message["request_id"])
        if waiter is not None and not waiter.done():
            waiter.set_result(message["first_token"])
        writer.write(b"ok\n" if waiter is not None else b"unknown request\n")
        await writer.drain()
        writer.close()

    async def _decode(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request_id, max_tokens = body["request_id"], body["sampling"]["max_tokens"]
        prompt_len = len(body["prompt_token_ids"])
        if prompt_len + max_tokens > self.kv_budget_tokens:
            return _error(400, f"{prompt_len} + {max_tokens} tokens exceed the KV budget")
        self.registered.append(body)
        self._waiting_for_kv[request_id] = asyncio.get_running_loop().create_future()
        response = web.StreamResponse(
            headers={
                KV_PORT_HEADER: str(self.kv_port),
                CACHED_TOKENS_HEADER: "0",
                PREFILL_HEADER: "remote",
                "Content-Type": "application/x-ndjson",
            }
        )
        self._active[id(request)] = request
        try:
            await response.prepare(request)
            first = await asyncio.wait_for(self._waiting_for_kv[request_id], 10)
            for index in range(max_tokens):
                if self.error_after is not None and index == self.error_after:
                    line: dict[str, Any] = {
                        "error": {"message": "KV cache corrupted", "type": "server_error", "code": 500}
                    }
                    await response.write(json.dumps(line).encode() + b"\n")
                    break
                finish = "length" if index == max_tokens - 1 else None
                line = {"token_ids": [first + index], "finish_reason": finish}
                await response.write(json.dumps(line).encode() + b"\n")
                await asyncio.sleep(self.token_delay)
            else:
                self.finished.add(request_id)
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            self.disconnected.add(request_id)
            raise
        finally:
            self._active.pop(id(request), None)
            self._waiting_for_kv.pop(request_id, None)


PrefillMode = Literal["ok", "die", "hang", "reject", "fail", "fault"]


class FakePrefill(_FakeWorker):
    def __init__(self, mode: PrefillMode = "ok") -> None:
        super().__init__()
        self.mode: PrefillMode = mode
        self.requests: list[dict[str, Any]] = []

    async def start(self, serve: Serve, *, host: str = "127.0.0.1", port: int = 0) -> FakePrefill:
        self.running = await serve(self._app("/internal/prefill", self._prefill), host=host, port=port)
        return self

    async def _prefill(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self._active[id(request)] = request
        try:
            return await self._run(request, body)
        except asyncio.CancelledError:
            self.disconnected.add(body["request_id"])
            raise
        finally:
            self._active.pop(id(request), None)

    async def _run(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        if self.mode == "reject":
            return _error(400, "prompt token ids out of range")
        if self.mode == "fail":
            return _error(500, "CUDA error: out of memory")
        if self.mode == "fault":  # this request's sequence failed alone in its engine step
            return _error(500, "sampling failed: probability tensor contains nan", REQUEST_FAULT)
        if self.mode in ("die", "hang"):
            if self.mode == "die" and request.transport is not None:
                request.transport.abort()
            await asyncio.sleep(30)  # cancelled by the disconnect long before
        prompt_len = len(body["prompt_token_ids"])
        host, port = body["kv_target"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        kv_cache = {"request_id": body["request_id"], "first_token": first_token(prompt_len)}
        writer.write(json.dumps(kv_cache).encode() + b"\n")
        await writer.drain()
        answer = await reader.readline()
        writer.close()
        if answer != b"ok\n":
            return _error(500, f"KV delivery refused: {answer!r}")
        return web.json_response(
            {
                "first_token": first_token(prompt_len),
                "prompt_len": prompt_len,
                "prefill_seconds": 0.0,
                "transfer_seconds": 0.0,
                "kv_bytes": 0,
                "sent_tokens": prompt_len,
            }
        )
