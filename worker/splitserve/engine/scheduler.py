"""Iteration-level continuous batching on a dedicated engine thread.

Between two forward passes, sequences join (a prompt to prefill, or a decode stream whose KV cache
arrived from a prefill worker) and leave (finished or aborted). Each step packs the decode tokens of
every running stream and/or a budget of prompt tokens into one forward (forward.py; what a step
carries is step.py's `plan_step`), samples, and hands the new tokens to the asyncio side in one
batch. The thread owns all engine state; the only way in is the command queue, the only way out is
`on_step`. The one thing it shares is the KV block pool, whose allocator is locked: the asyncio side
takes blocks for arriving caches and frees the caches it has shipped, then sends a wake-up so that
waiting sequences are admitted. A prefix found in the host or disk tier is copied back by a loader
thread (tier_load.py) while the others keep stepping; its end comes in as a command too.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from splitserve.contract.names import OffloadDirection, PrefixCacheTier
from splitserve.engine.blocks import NoFreeBlocksError
from splitserve.engine.forward import Engine, Work
from splitserve.engine.kv_cache import KVPool, SequenceKV
from splitserve.engine.sampling import SamplingError, SamplingRow, finish_reason, sample
from splitserve.engine.step import BatchPolicy, Emission, Sequence, plan_step
from splitserve.engine.tier_load import TierLoad, TierLoader

log = logging.getLogger(__name__)


class EngineMetrics(Protocol):
    """The series the engine records; the serving layer's `Metrics` provides them under contract names."""

    requests_running: Gauge
    requests_waiting: Gauge
    kv_cache_capacity_tokens: Gauge
    preemptions: Counter
    prefill_step: Histogram
    prefill_tokens: Counter
    decode_step: Histogram
    decode_tokens: Counter

    def record_kv_blocks(self, free: int, used: int) -> None:
        """Blocks free and in use, and their ratio (the KV cache usage gauge)."""

    def record_prefix_cache(self, queried: int, hits: Mapping[PrefixCacheTier, int]) -> None:
        """One admission's prefix-cache lookup: tokens looked up, tokens found per tier."""

    def record_kv_tier_usage(self, used: Mapping[PrefixCacheTier, int]) -> None:
        """Bytes held by each retention tier below the device."""

    def record_kv_disk_error(self, reason: str) -> None:
        """A disk-tier block file that could not be read back or written."""

    def record_kv_offload(self, tier: PrefixCacheTier, direction: OffloadDirection, nbytes: int) -> None:
        """KV bytes stored into a retention tier or loaded back from it."""


_ABORT, _ADD, _LOADED, _STOP, _WAKE = "abort", "add", "loaded", "stop", "wake"
WATERMARK_FRACTION = 0.01  # of the pool kept free at admission, so running streams can grow (vLLM's 1 %)
PROBE_TOKEN = 0  # any id in the vocabulary: the probe only asks whether the engine still runs


class EngineLoop:
    """The engine thread: admits waiting sequences into the block pool, steps, preempts when it is full.

    Admission is FIFO: a sequence is admitted when the blocks of everything it has to compute plus a
    watermark are free (so a long prompt at the head is never overtaken by short ones). Decode
    streams take a block only when they cross a block boundary; if none is free, the most recently
    admitted sequence is preempted (its blocks freed, it waits at the head of the queue to be
    recomputed), as vLLM's recompute preemption does. A sequence whose prefix is being loaded back from
    a lower tier holds its blocks but is neither stepped nor preempted until the load ends.
    """

    def __init__(
        self,
        engine: Engine,
        pool: KVPool,
        policy: BatchPolicy,
        metrics: EngineMetrics,
        on_step: Callable[[list[Emission]], None],
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self.on_step = on_step
        self.stop_ids = engine.loaded.eos_token_ids
        self.watermark = max(1, int(pool.num_blocks * WATERMARK_FRACTION))
        self.waiting: collections.deque[Sequence] = collections.deque()  # holding no blocks
        self.prefilling: collections.deque[Sequence] = collections.deque()
        self.decoding: list[Sequence] = []
        self.loading: dict[Sequence, TierLoad] = {}  # admitted, its prefix being copied back
        self._aborting: set[Sequence] = set()  # loading sequences to drop once their copy stopped
        self._loader = TierLoader()
        self._admissions = 0
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._queued = 0  # sequences waiting for admission; written by the engine thread only
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._commands.put((_STOP, None))
        self._thread.join(timeout=30)

    def add(self, sequence: Sequence) -> None:
        """Thread-safe: the sequence queues for admission (or, already holding its KV, joins the batch)."""
        self._commands.put((_ADD, sequence))

    def abort(self, request_id: str) -> None:
        """Thread-safe: the sequence leaves before the next step (an Emission with an error confirms)."""
        self._commands.put((_ABORT, request_id))

    def wake(self) -> None:
        """Thread-safe: blocks were freed elsewhere; retry admission."""
        self._commands.put((_WAKE, None))

    @property
    def queued(self) -> int:
        """Sequences waiting for admission. Read from other threads: the engine thread counts them after
        every change (iterating `waiting` from here would race with its mutations); an int read is atomic."""
        return self._queued

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._admit()  # before blocking: a step that preempted every stream freed their blocks
            if not self._drain_commands(block=not (self.prefilling or self.decoding)):
                for load in self.loading.values():
                    load.cancelled.set()
                self._loader.close()
                return
            self._admit()
            self._queued = len(self.waiting)
            if self.prefilling or self.decoding:
                self._step_safely()

    def _drain_commands(self, block: bool) -> bool:
        aborted: list[Emission] = []
        while True:
            try:
                kind, payload = self._commands.get(block=block)
            except queue.Empty:
                break
            block = False
            if kind == _STOP:
                return False
            if kind == _ADD:
                assert isinstance(payload, Sequence)
                if payload.prefilled:  # its KV arrived from a prefill worker, blocks and all
                    self._admissions += 1
                    payload.admitted = self._admissions
                    self.decoding.append(payload)
                else:
                    self.waiting.append(payload)
            elif kind == _ABORT:
                aborted.extend(self._remove(str(payload)))
            elif kind == _LOADED:
                assert isinstance(payload, Sequence)
                aborted.extend(self._loaded(payload))
        if aborted:
            self.on_step(aborted)
        return True

    def _admit(self) -> None:
        """FIFO: take the head's blocks while they and the watermark are free; its longest cached
        prefix is shared instead of taken (and not computed again)."""
        while self.waiting and self._admitted() < self.policy.max_num_seqs:
            seq = self.waiting[0]
            running = bool(self._admitted())
            try:
                # The watermark protects running streams; with none running it would only stall.
                lower = seq.kv.admit(seq.target_tokens(), keep_free=self.watermark if running else 0)
            except NoFreeBlocksError:
                if not running and self.pool.blocks_for(seq.prefill_target) > self.pool.num_blocks:
                    self.waiting.popleft()
                    seq.kv.release()
                    error = f"{seq.prefill_target} tokens exceed the KV pool ({self.pool.capacity_tokens})"
                    self.on_step([Emission(seq, None, None, error=error)])
                    continue
                return
            self.waiting.popleft()
            self._admissions += 1
            seq.admitted = self._admissions
            if lower and self.pool.tiers is not None:
                load = TierLoad(self.pool.tiers, lower, seq.kv.load_targets(len(lower)))
                self.loading[seq] = load
                self._loader.start(load, functools.partial(self._commands.put, (_LOADED, seq)))
                continue
            if self.pool.salt is not None:
                self.metrics.record_prefix_cache(seq.prefill_target, {"device": seq.kv.length})
            self.prefilling.append(seq)

    def _admitted(self) -> int:
        return len(self.prefilling) + len(self.decoding) + len(self.loading)

    def _loaded(self, seq: Sequence) -> list[Emission]:
        """A load ended: what it copied joins the prefix cache (also when the sequence was aborted
        meanwhile: the blocks stay cached), and the sequence prefills the rest, or leaves."""
        load = self.loading.pop(seq)
        device = seq.kv.length
        seq.kv.attach_loaded(seq.target_tokens(), load.loaded)
        self.metrics.record_prefix_cache(
            seq.prefill_target, {"device": device, **load.hits(self.pool.block_size)}
        )
        if seq in self._aborting:
            self._aborting.remove(seq)
            seq.kv.release()
            return [Emission(seq, None, None, error="aborted")]
        self.prefilling.append(seq)
        return []

    def _remove(self, request_id: str) -> list[Emission]:
        """Take a sequence out wherever it is and free its blocks; what an abort reports. A loading one
        has its copy cancelled, and leaves (and frees its blocks) once the copy has stopped (`_loaded`)."""
        for seq, load in self.loading.items():
            if seq.request_id == request_id:
                load.cancelled.set()
                self._aborting.add(seq)
        gone = [
            seq for seq in (*self.waiting, *self.prefilling, *self.decoding) if seq.request_id == request_id
        ]
        for seq in gone:
            for place in (self.waiting, self.prefilling, self.decoding):
                if seq in place:
                    place.remove(seq)
            seq.kv.release()
        return [Emission(seq, None, None, error="aborted") for seq in gone]

    def _step_safely(self) -> None:
        prefill_plan, decode = self._plan()
        try:
            emissions = self._step(prefill_plan, decode) if prefill_plan or decode else []
        except Exception as error:  # a failed forward fails its sequences, never the worker
            log.exception("engine step failed")
            emissions = self._isolate(prefill_plan, decode, error)
        self._queued = len(self.waiting)
        self.metrics.requests_running.set(self._admitted())
        self.metrics.record_kv_blocks(self.pool.allocator.num_free, self.pool.allocator.num_used)
        if self.pool.tiers is not None:
            self.metrics.record_kv_tier_usage(self.pool.tiers.usage_bytes())
        if emissions:
            self.on_step(emissions)

    def _plan(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """`plan_step` over the decode streams that got room to grow (preempting others if needed)."""
        runs_decode = self.policy.interleave or not self.prefilling
        return plan_step(
            self.prefilling, self._make_room(list(self.decoding)) if runs_decode else [], self.policy
        )

    def _isolate(
        self, prefill_plan: list[tuple[Sequence, int]], decode: list[Sequence], error: Exception
    ) -> list[Emission]:
        """Re-run each sequence of a failed step alone, so that only those failing by themselves fail.

        A failed forward leaves every KV length as it was (`Engine.forward` advances them last), so a
        re-run rewrites the same positions. A sequence that fails while another passes is the
        request's own fault (`request_fault`: not worth retrying elsewhere). When none passes (or one
        ran alone), a probe forward tells the two apart: if the engine still runs a scratch token, the
        requests failed by themselves; if not, the worker is at fault and the router retries elsewhere.
        """
        parts: list[tuple[list[tuple[Sequence, int]], list[Sequence]]] = [
            ([item], []) for item in prefill_plan
        ]
        parts += [([], [seq]) for seq in decode]
        emissions: list[Emission] = []
        failed: list[tuple[Sequence, Exception]] = []
        for plan, streams in parts:
            seq = plan[0][0] if plan else streams[0]
            if len(parts) == 1:
                failed.append((seq, error))
                continue
            try:
                emissions += self._step(plan, streams)
            except Exception as alone:
                failed.append((seq, alone))
        fault = len(failed) < len(parts) or self._engine_works()
        for seq, reason in failed:
            self._remove(seq.request_id)
            emissions.append(
                Emission(seq, None, None, error=f"engine step failed: {reason}", request_fault=fault)
            )
        return emissions

    def _engine_works(self) -> bool:
        """Whether a one-token forward of a scratch sequence (one block, freed after) still passes."""
        probe = SequenceKV(self.pool)
        try:
            probe.grow(1)
            self.engine.forward([Work(probe, [PROBE_TOKEN])])
        except Exception:  # no free block, or a broken engine: cannot clear the requests
            return False
        finally:
            probe.release()
        return True

    def _make_room(self, decode: list[Sequence]) -> list[Sequence]:
        """Give each decode stream the block its next token needs, preempting the latest admitted
        sequences (possibly the stream itself) while none is free. Returns the streams still running."""
        for seq in decode:
            while seq in self.decoding:
                try:
                    seq.kv.grow(seq.kv.length + 1)
                    break
                except NoFreeBlocksError:
                    self._preempt(max((*self.prefilling, *self.decoding), key=lambda s: s.admitted))
        return [seq for seq in decode if seq in self.decoding]

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the head to recompute prompt + output."""
        (self.decoding if seq in self.decoding else self.prefilling).remove(seq)
        seq.kv.release()
        seq.prefill_target = len(seq.prompt) + len(seq.output)
        seq.admitted = 0
        self.waiting.appendleft(seq)
        self.metrics.preemptions.inc()
        log.info("preempted", extra={"request_id": seq.request_id, "tokens": seq.prefill_target})

    def _step(self, prefill_plan: list[tuple[Sequence, int]], decode: list[Sequence]) -> list[Emission]:
        work = [Work(seq.kv, [seq.output[-1]]) for seq in decode]
        work += [Work(seq.kv, seq.next_chunk(n)) for seq, n in prefill_plan]
        started = time.perf_counter()
        logits = self.engine.forward(work)  # [S, V]
        # Rows that produce a token: every decode stream, and prompts whose last chunk just ran.
        sampled = list(decode) + [seq for seq, _ in prefill_plan if seq.prefilled]
        rows = list(range(len(decode))) + [
            len(decode) + index for index, (seq, _) in enumerate(prefill_plan) if seq.prefilled
        ]
        tokens = sample(
            logits[rows], [SamplingRow(seq.params, len(seq.output)) for seq in sampled], self.stop_ids
        )
        elapsed = time.perf_counter() - started
        if prefill_plan:
            self.metrics.prefill_step.observe(elapsed)
            self.metrics.prefill_tokens.inc(sum(n for _, n in prefill_plan))
        if decode:
            self.metrics.decode_step.observe(elapsed)
            self.metrics.decode_tokens.inc(len(decode))
        return [self._advance(seq, token) for seq, token in zip(sampled, tokens, strict=True)]

    def _advance(self, seq: Sequence, token: int | SamplingError) -> Emission:
        """Record a sampled token and move the sequence to where it belongs next (out, if it failed); a
        finished sequence frees its blocks here, except on a prefill worker, whose runtime frees them
        once shipped."""
        if isinstance(token, SamplingError):
            self._remove(seq.request_id)
            return Emission(seq, None, None, error=str(token), request_fault=True)
        seq.output.append(token)
        finish = finish_reason(seq.params, self.stop_ids, token, len(seq.output))
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            if seq.decode_after_prefill and finish is None:
                self.decoding.append(seq)
        elif finish is not None:
            self.decoding.remove(seq)
        if finish is not None and seq.decode_after_prefill:
            seq.kv.release()
        return Emission(seq, token, finish)
