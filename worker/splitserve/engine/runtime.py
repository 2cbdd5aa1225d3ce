"""The asyncio face of the engine: KV admission, per-request streams, and the engine thread's output.

Three ways in, one per role:
- `generate()` (both): prefill and decode here, stream tokens.
- `prefill()` (prefill): run the prompt, hand back the first token and the KV cache to ship.
- `register()` + `receive_kv()` (decode): a request announced by the router, then its KV cache
  arriving from a prefill worker; the sequence joins the running batch once it is in. Registration
  pins the prompt's leading blocks this worker's prefix cache holds (only the rest is sent), and
  prefills a short uncached rest here instead (conditional disaggregation: `Placement`).
KV blocks are taken by the engine thread (admission, growth) and by this loop (arriving caches);
the engine frees what it finishes, this loop what it shipped or what failed, and wakes the engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from splitserve.contract.config import EngineConfig
from splitserve.contract.names import EngineRole
from splitserve.engine.block_hash import cache_salt
from splitserve.engine.blocks import NoFreeBlocksError
from splitserve.engine.forward import Engine
from splitserve.engine.kv_cache import SequenceKV
from splitserve.engine.kv_quant import salt_name
from splitserve.engine.offload import KVTiers
from splitserve.engine.params import (
    REQUEST_FAULT,
    GenerationChunk,
    GenerationError,
    GenerationRequest,
    Load,
    SamplingParams,
)
from splitserve.engine.placement import Placement, choose_placement
from splitserve.engine.sampling import finish_reason
from splitserve.engine.scheduler import EngineLoop, EngineMetrics
from splitserve.engine.step import BatchPolicy, Emission, Sequence
from splitserve.engine.streams import PrefillResult, RequestStream

log = logging.getLogger(__name__)


class EngineRuntime:
    def __init__(
        self, engine: Engine, config: EngineConfig, role: EngineRole, metrics: EngineMetrics
    ) -> None:
        loaded = engine.loaded
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.max_model_len = loaded.max_model_len
        salt = cache_salt(config.model, config.revision, salt_name(loaded.layout.dtype, loaded.model.dtype))
        self.pool = engine.new_pool(
            config.block_size, config.kv_cache_bytes, salt if config.enable_prefix_caching else None
        )
        tiers = KVTiers.for_config(config, salt, self.pool.device, metrics)
        if tiers is not None:
            self.pool.keep_evicted_in(tiers)
        policy = BatchPolicy.for_role(
            role, config.prefill_chunk_size, config.chunked_prefill, loaded.max_model_len, config.max_num_seqs
        )
        self.engine_loop = EngineLoop(engine, self.pool, policy, metrics, self._from_engine_thread)
        self._streams: dict[str, RequestStream] = {}
        self._kv_waiters: collections.deque[tuple[SequenceKV, int, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.kv_cache_capacity_tokens.set(self.pool.capacity_tokens)
        metrics.record_kv_blocks(self.pool.num_blocks, 0)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine_loop.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.engine_loop.stop)

    def load(self) -> Load:
        """What /load reports and the router's least-loaded choice reads."""
        queued = self.engine_loop.queued
        in_engine = sum(1 for stream in self._streams.values() if stream.in_engine)
        admitting = sum(
            1
            for stream in self._streams.values()
            if not stream.in_engine
            and not stream.closed
            and (stream.kv is None or stream.kv_state == "expected")
        )
        return Load(running=in_engine - queued, waiting=admitting + queued, kv_cache_usage=self.pool.usage)

    def fail(self, request_id: str, error: GenerationError) -> None:
        """End one open request with `error` (its consumer sees it next); used past a drain deadline."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.closed:
            self._deliver(stream, error)

    # ---- both ---------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk]:
        stream = self._open(request.request_id, list(request.prompt_token_ids), request.sampling)
        try:
            self._submit(
                stream, Sequence(stream.request_id, stream.params, self._new_kv(stream), stream.prompt)
            )
            async for chunk in self._drain(stream):
                yield chunk
        finally:
            self._close(stream)

    # ---- prefill ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def prefill(self, request: GenerationRequest) -> AsyncIterator[PrefillResult]:
        """Run the prompt; its KV blocks stay taken until the block exits (after shipping them)."""
        stream = self._open(request.request_id, list(request.prompt_token_ids), request.sampling)
        stream.hold_kv = True
        try:
            kv = self._new_kv(stream)
            sequence = Sequence(
                stream.request_id, stream.params, kv, stream.prompt, decode_after_prefill=False
            )
            self._submit(stream, sequence)
            first = await self._next(stream)
            yield PrefillResult(first.token_ids[0], kv)
        finally:
            self._close(stream)

    # ---- decode -------------------------------------------------------------------------------

    def register(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        local_max_tokens: int = 0,
        remote_available: bool = True,
    ) -> Placement:
        """Announce a request; its leading whole blocks in this worker's prefix cache are pinned. A short
        rest (`choose_placement`) is prefilled here, chunked between decode steps; otherwise a prefill
        worker pushes the rest of the KV cache, and the request fails if it does not come in time. The
        prompt comes along either way, so that a preempted stream can be recomputed here."""
        stream = self._open(request_id, prompt, params)
        kv = self._new_kv(stream)
        cached = kv.pin_prefix(prompt)
        placement = choose_placement(len(prompt), cached, local_max_tokens, remote_available)
        if placement == "local":  # admission shares the same cached blocks again (just used: evicted last)
            kv.release()
            self._submit(stream, Sequence(request_id, stream.params, kv, stream.prompt))
        else:
            stream.kv_state = "expected"
            self._update_gauges()
            assert self._loop is not None
            self._loop.call_later(self.config.kv_timeout_seconds, self._kv_deadline, stream)
        return Placement(cached, placement)

    async def stream(self, request_id: str) -> AsyncGenerator[GenerationChunk]:
        stream = self._streams[request_id]
        try:
            async for chunk in self._drain(stream):
                yield chunk
        finally:
            self._close(stream)

    async def receive_kv(self, request_id: str, num_tokens: int, first_position: int) -> SequenceKV:
        """Take blocks for an arriving cache of tokens `first_position..num_tokens-1`, after the prefix
        pinned at registration (the two must meet exactly); waits (FIFO) while they are not free
        (back-pressure on TCP)."""
        stream = self._streams.get(request_id)
        if stream is None or stream.kv_state != "expected" or stream.closed or stream.failed:
            raise GenerationError(f"no request {request_id!r} is waiting for a KV cache", status=404)
        if num_tokens != len(stream.prompt):
            raise GenerationError(
                f"KV cache has {num_tokens} tokens, the request's prompt has {len(stream.prompt)}", status=400
            )
        kv = stream.kv
        assert kv is not None
        if first_position != kv.length:
            raise GenerationError(
                f"KV cache starts at token {first_position}, this worker holds the first {kv.length}",
                status=400,
            )
        stream.kv_state = "receiving"
        try:
            await self._take_blocks(kv, num_tokens)
        except asyncio.CancelledError:
            stream.kv_state = "expected"  # the transfer broke off; another one may still come
            kv.drop_unwritten()
            self._settle(stream)
            raise
        if stream.closed or stream.failed:
            self.kv_failed(request_id, "request was cancelled")
            raise GenerationError(f"request {request_id!r} was cancelled", status=499)
        return kv

    def kv_arrived(self, request_id: str, kv: SequenceKV, first_token: int) -> None:
        """Every layer is in: emit the first token (sampled by prefill) and join the decode batch."""
        stream = self._streams[request_id]
        stream.kv_state = "arrived"
        kv.advance(stream.prompt[kv.length :])  # its full blocks join this worker's prefix cache
        finish = finish_reason(stream.params, self.engine.loaded.eos_token_ids, first_token, 1)
        if finish is None and not (stream.closed or stream.failed):
            self._submit(stream, Sequence(request_id, stream.params, kv, stream.prompt, [first_token]))
        self._deliver(stream, GenerationChunk(token_ids=(first_token,), finish_reason=finish))
        self._settle(stream)

    def kv_failed(self, request_id: str, reason: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.kv_state = "arrived" if stream.kv_state == "receiving" else stream.kv_state
            self._deliver(stream, GenerationError(f"KV transfer failed: {reason}", status=502))
            self._settle(stream)

    # ---- plumbing -----------------------------------------------------------------------------

    def _open(self, request_id: str, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Refuse what can never fit; cap `max_tokens` at what the pool can hold for one sequence, so
        "no max_tokens" (the rest of the context window) is admitted without reserving anything."""
        if request_id in self._streams:
            raise GenerationError(f"request id {request_id!r} is already in use", status=409)
        blocks = self.pool.blocks_for(len(prompt))
        if blocks + self.engine_loop.watermark > self.pool.num_blocks:
            raise GenerationError(
                f"a prompt of {len(prompt)} tokens needs {blocks} KV blocks of {self.pool.block_size} "
                f"tokens; this worker's KV budget is {self.pool.num_blocks} blocks "
                f"({self.engine_loop.watermark} kept free)",
                status=400,
                kind="invalid_request_error",
            )
        room = self.pool.capacity_tokens - len(prompt)
        if params.max_tokens > room:
            params = params.model_copy(
                update={"max_tokens": room, "min_tokens": min(params.min_tokens, room)}
            )
        stream = RequestStream(request_id, prompt, params)
        self._streams[request_id] = stream
        self._update_gauges()
        return stream

    def _new_kv(self, stream: RequestStream) -> SequenceKV:
        stream.kv = self.pool.sequence()
        return stream.kv

    async def _take_blocks(self, kv: SequenceKV, tokens: int) -> None:
        """FIFO among arriving caches; the watermark is kept for the running streams, as at admission."""
        if not self._kv_waiters and self._try_take(kv, tokens):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (kv, tokens, future)
        self._kv_waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if entry in self._kv_waiters:
                self._kv_waiters.remove(entry)
            kv.drop_unwritten()  # granted and cancelled in the same tick: give the new blocks back
            raise

    def _try_take(self, kv: SequenceKV, tokens: int) -> bool:
        """Blocks for an arriving cache, within `max_num_seqs` (those sequences bypass admission)."""
        holding = sum(
            1
            for s in self._streams.values()
            if s.kv is not kv and (s.in_engine or (s.kv is not None and s.kv.block_table))
        )
        if holding >= self.config.max_num_seqs:
            return False
        keep_free = self.engine_loop.watermark if self.pool.allocator.num_used else 0
        try:
            kv.grow(tokens, keep_free=keep_free)
        except NoFreeBlocksError:
            return False
        self._update_gauges()
        return True

    def _grant_waiters(self) -> None:
        while self._kv_waiters:
            kv, tokens, future = self._kv_waiters[0]
            if not self._try_take(kv, tokens):
                return
            self._kv_waiters.popleft()
            if not future.done():
                future.set_result(None)

    def _submit(self, stream: RequestStream, sequence: Sequence) -> None:
        stream.in_engine = True
        self.engine_loop.add(sequence)
        self._update_gauges()

    def _deliver(self, stream: RequestStream, item: GenerationChunk | GenerationError) -> None:
        if not stream.failed:
            stream.failed = isinstance(item, GenerationError)
            stream.outbox.put_nowait(item)

    async def _next(self, stream: RequestStream) -> GenerationChunk:
        item = await stream.outbox.get()
        if isinstance(item, GenerationError):
            raise item
        return item

    async def _drain(self, stream: RequestStream) -> AsyncIterator[GenerationChunk]:
        while True:
            chunk = await self._next(stream)
            yield chunk
            if chunk.finish_reason is not None:
                return

    def _close(self, stream: RequestStream) -> None:
        """The consumer is done: abort in the engine if the sequence is still there, free the rest."""
        stream.closed = True
        if stream.in_engine:
            self.engine_loop.abort(stream.request_id)  # settled when the engine confirms
        self._settle(stream)

    def _settle(self, stream: RequestStream) -> None:
        """Free the KV once nobody writes or reads it; forget the stream once its consumer is gone.
        (The engine frees what it finishes itself; here go shipped, failed and cancelled caches.)"""
        kv = stream.kv
        if not stream.busy and kv is not None and kv.block_table and (stream.closed or not stream.keeps_kv):
            kv.release()
            self.engine_loop.wake()
            self._grant_waiters()
        if stream.closed and not stream.busy:
            self._streams.pop(stream.request_id, None)
        self._update_gauges()

    def _kv_deadline(self, stream: RequestStream) -> None:
        if stream.kv_state in ("expected", "receiving") and not stream.closed:
            self._deliver(
                stream,
                GenerationError(
                    f"KV cache did not arrive within {self.config.kv_timeout_seconds:g}s", status=504
                ),
            )

    def _from_engine_thread(self, emissions: list[Emission]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_step, emissions)

    def _on_step(self, emissions: list[Emission]) -> None:
        for emission in emissions:
            stream = self._streams.get(emission.sequence.request_id)
            if stream is None:
                continue
            if emission.token is not None:
                self._deliver(stream, GenerationChunk((emission.token,), emission.finish))
            elif emission.error != "aborted":
                kind = REQUEST_FAULT if emission.request_fault else "server_error"
                self._deliver(
                    stream, GenerationError(emission.error or "engine error", status=500, kind=kind)
                )
            if emission.done:
                stream.in_engine = False
                self._settle(stream)
        self._grant_waiters()  # the engine may have freed blocks and batch slots

    def _update_gauges(self) -> None:
        load = self.load()
        self.metrics.requests_running.set(load.running)  # also when no step follows (last one left)
        self.metrics.requests_waiting.set(load.waiting)
        self.metrics.record_kv_blocks(self.pool.allocator.num_free, self.pool.allocator.num_used)
