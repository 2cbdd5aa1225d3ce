"""What one engine step is made of, pure: the sequences, how a step batches them, what it emits.

Kept apart from the engine thread (scheduler.py) so that step planning can be read and tested without
a thread, a model or a command queue: `plan_step` decides which prompt chunks and decode streams one
forward carries under a role's `BatchPolicy`; `Sequence` and `Emission` are what the engine thread and
its asyncio face (runtime.py) pass between them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from splitserve.engine.kv_cache import SequenceKV
from splitserve.engine.params import FinishReason, SamplingParams


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens so far, and the KV blocks that hold them.

    Tokens `kv.length .. prefill_target-1` of `prompt + output` are still to be computed; the token
    sampled after them is the next output. A preempted sequence lost its KV, so its target becomes
    prompt + output: recomputing them yields exactly the token a decode step would have.
    """

    request_id: str
    params: SamplingParams
    kv: SequenceKV
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    decode_after_prefill: bool = True  # False on a prefill worker: the sequence leaves after token one
    prefill_target: int = field(init=False)
    admitted: int = 0  # admission order (0: waiting); the latest admitted is preempted first

    def __post_init__(self) -> None:
        self.prefill_target = len(self.prompt)

    @property
    def prefilled(self) -> bool:
        return self.kv.length >= self.prefill_target

    def target_tokens(self) -> list[int]:
        """Every token the sequence computes before its next sample: the prompt, then (after a
        preemption) its output so far."""
        return (self.prompt + self.output)[: self.prefill_target]

    def next_chunk(self, budget: int) -> list[int]:
        """Up to `budget` of the tokens still to prefill."""
        end = min(self.prefill_target, self.kv.length + budget)
        if end <= len(self.prompt):
            return self.prompt[self.kv.length : end]
        return (self.prompt + self.output)[self.kv.length : end]


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
    max_num_seqs: int = 64  # most sequences admitted at once

    @classmethod
    def for_role(
        cls, role: str, chunk_size: int, chunked_prefill: bool, max_model_len: int, max_num_seqs: int = 64
    ) -> BatchPolicy:
        if role == "both" and not chunked_prefill:
            # The colocated baseline: whole prompts, decode waits (the stall the seeds describe).
            return cls(prefill_token_budget=max_model_len, interleave=False, max_num_seqs=max_num_seqs)
        return cls(prefill_token_budget=chunk_size, interleave=True, max_num_seqs=max_num_seqs)


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
        take = min(budget, seq.prefill_target - seq.kv.length)
        plan.append((seq, take))
        budget -= take
    decode = list(decoding) if (policy.interleave or not plan) else []
    return plan, decode
