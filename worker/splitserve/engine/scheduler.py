"""Iteration-level continuous batching on a dedicated engine thread.

Between two forward passes, sequences join (a prompt to prefill, or a decode stream whose KV cache
arrived from a prefill worker) and leave (finished or aborted). Each step packs the decode tokens of
every running stream and/or a budget of prompt tokens into one forward (engine.py), samples, and
hands the new tokens to the asyncio side in one batch. The thread owns all engine state; the only
way in is the command queue, the only way out is `on_step`.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from splitserve.engine.forward import Engine, Work
from splitserve.engine.kv_cache import SequenceKV
from splitserve.engine.params import FinishReason, SamplingParams
from splitserve.engine.sampling import SamplingError, SamplingRow, finish_reason, sample

log = logging.getLogger(__name__)


class EngineMetrics(Protocol):
    """The series the engine records; the serving layer's `Metrics` provides them under contract names."""

    requests_running: Gauge
    requests_waiting: Gauge
    kv_cache_usage: Gauge
    kv_cache_capacity_tokens: Gauge
    prefill_step: Histogram
    prefill_tokens: Counter
    decode_step: Histogram
    decode_tokens: Counter


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Prompt tokens `kv.length..prompt_len-1` are still to prefill."""

    request_id: str
    params: SamplingParams
    kv: SequenceKV
    prompt: list[int]
    prompt_len: int
    output: list[int] = field(default_factory=list)
    decode_after_prefill: bool = True  # False on a prefill worker: the sequence leaves after token one

    @property
    def prefilled(self) -> bool:
        return self.kv.length >= self.prompt_len


@dataclass(frozen=True)
class Emission:
    """What one step did to one sequence; `token` is None when the sequence failed or was aborted."""

    sequence: Sequence
    token: int | None
    finish: FinishReason | None
    error: str | None = None
    request_fault: bool = False  # the sequence failed alone while the step's others went on

    @property
    def done(self) -> bool:
        """The engine has let go of the sequence (its KV may be freed or shipped)."""
        return (
            self.finish is not None
            or self.error is not None
            or (self.token is not None and not self.sequence.decode_after_prefill)
        )


@dataclass(frozen=True)
class BatchPolicy:
    """How a step is composed; each role sets it differently (see `for_role`)."""

    prefill_token_budget: int  # prompt tokens per forward
    interleave: bool  # decode streams keep stepping while prompts are being prefilled

    @classmethod
    def for_role(cls, role: str, chunk_size: int, chunked_prefill: bool, max_model_len: int) -> BatchPolicy:
        if role == "both" and not chunked_prefill:
            # The colocated baseline: whole prompts, decode waits (the stall the seeds describe).
            return cls(prefill_token_budget=max_model_len, interleave=False)
        return cls(prefill_token_budget=chunk_size, interleave=True)


def plan_step(
    prefilling: Iterable[Sequence], decoding: list[Sequence], policy: BatchPolicy
) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
    """One step's work: FIFO prompt chunks up to the token budget (the oldest prompt first, so a long
    one is never starved), plus every decode stream the policy lets run beside them."""
    plan: list[tuple[Sequence, int]] = []
    budget = policy.prefill_token_budget
    for seq in prefilling:
        if budget <= 0:
            break
        take = min(budget, seq.prompt_len - seq.kv.length)
        plan.append((seq, take))
        budget -= take
    decode = list(decoding) if (policy.interleave or not plan) else []
    return plan, decode


_ABORT, _ADD, _STOP = "abort", "add", "stop"


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        policy: BatchPolicy,
        metrics: EngineMetrics,
        on_step: Callable[[list[Emission]], None],
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.metrics = metrics
        self.on_step = on_step
        self.stop_ids = engine.loaded.eos_token_ids
        self.prefilling: collections.deque[Sequence] = collections.deque()
        self.decoding: list[Sequence] = []
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._queued = 0  # prompts not yet started; written by the engine thread only
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._commands.put((_STOP, None))
        self._thread.join(timeout=30)

    def add(self, sequence: Sequence) -> None:
        """Thread-safe: the sequence joins the batch before the next step."""
        self._commands.put((_ADD, sequence))

    def abort(self, request_id: str) -> None:
        """Thread-safe: the sequence leaves before the next step (an Emission with an error confirms)."""
        self._commands.put((_ABORT, request_id))

    @property
    def queued(self) -> int:
        """Prompts not yet started. Read from other threads: the engine thread counts them after every
        change (iterating `prefilling` from here would race with its mutations), and an int read is atomic."""
        return self._queued

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self.prefilling and not self.decoding
            if not self._drain_commands(block=idle):
                return
            self._count_queued()
            if self.prefilling or self.decoding:
                self._step_safely()

    def _count_queued(self) -> None:
        self._queued = sum(1 for seq in self.prefilling if seq.kv.length == 0)

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
                (self.decoding if payload.prefilled else self.prefilling).append(payload)
            elif kind == _ABORT:
                aborted.extend(self._remove(str(payload)))
        if aborted:
            self.on_step(aborted)
        return True

    def _remove(self, request_id: str) -> list[Emission]:
        gone = [seq for seq in (*self.prefilling, *self.decoding) if seq.request_id == request_id]
        for seq in gone:
            if seq in self.decoding:
                self.decoding.remove(seq)
            else:
                self.prefilling.remove(seq)
        return [Emission(seq, None, None, error="aborted") for seq in gone]

    def _step_safely(self) -> None:
        prefill_plan, decode = plan_step(self.prefilling, self.decoding, self.policy)
        try:
            emissions = self._step(prefill_plan, decode)
        except Exception as error:  # a failed forward fails its sequences, never the worker
            log.exception("engine step failed")
            emissions = self._isolate(prefill_plan, decode, error)
        self._count_queued()
        self.metrics.requests_running.set(len(self.decoding) + len(self.prefilling) - self.queued)
        if emissions:
            self.on_step(emissions)

    def _isolate(
        self, prefill_plan: list[tuple[Sequence, int]], decode: list[Sequence], error: Exception
    ) -> list[Emission]:
        """Re-run each sequence of a failed step alone, so that only those failing by themselves fail.

        A failed forward leaves every KV length as it was (`Engine.forward` advances them last), so a
        re-run rewrites the same positions. A sequence that fails while another passes is the
        request's own fault (`request_fault`: not worth retrying elsewhere); when every one fails, or
        it ran alone, the worker is the likelier culprit.
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
        fault = len(failed) < len(parts)
        for seq, reason in failed:
            self._remove(seq.request_id)
            emissions.append(
                Emission(seq, None, None, error=f"engine step failed: {reason}", request_fault=fault)
            )
        return emissions

    def _step(self, prefill_plan: list[tuple[Sequence, int]], decode: list[Sequence]) -> list[Emission]:
        work = [Work(seq.kv, [seq.output[-1]]) for seq in decode]
        work += [Work(seq.kv, seq.prompt[seq.kv.length : seq.kv.length + n]) for seq, n in prefill_plan]
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
        """Record a sampled token and move the sequence to where it belongs next (out, if it failed)."""
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
        return Emission(seq, token, finish)
