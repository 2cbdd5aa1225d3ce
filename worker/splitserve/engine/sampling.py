"""Next-token choice for a batch of sequences with per-request sampling parameters.

Seeded requests draw from a generator seeded by (seed, token index), so the same request gives the
same tokens whether its first token was sampled on a prefill worker and the rest on a decode
worker, or all of it in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.engine.params import FinishReason, SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What `sample` needs to know about one sequence this step."""

    params: SamplingParams
    generated: int  # tokens this sequence already produced (0 for the first token)


class SamplingError(Exception):
    """One row could not be sampled (non-finite probabilities, a mask outside the vocabulary...).

    Returned in that row's place, not raised: one sequence's failure is that sequence's alone.
    """


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], stop_ids: frozenset[int]
) -> list[int | SamplingError]:
    """logits `[S, V]` (one row per sequence) -> one token id per sequence, or that row's failure.

    `stop_ids` (the model's EOS tokens) are masked, together with a request's stop_token_ids,
    while the request has produced fewer than `min_tokens`. Each row is sampled on its own terms:
    whatever goes wrong with one (the boundaries validate parameters, this is the last line of
    defence) fails that row, and every other row gets the token it would have got anyway.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    for index, row in enumerate(rows):
        if row.generated < row.params.min_tokens:
            banned = [token for token in stop_ids | set(row.params.stop_token_ids) if 0 <= token < vocab]
            logits[index, banned] = float("-inf")
    tokens: list[int | SamplingError] = [int(token) for token in logits.argmax(dim=-1).tolist()]
    generator = torch.Generator(device=logits.device)
    for index, row in enumerate(rows):
        if not row.params.greedy:
            try:
                tokens[index] = _sample_row(logits[index], row, generator)
            except (RuntimeError, ValueError, OverflowError) as error:  # how torch refuses bad input
                tokens[index] = SamplingError(f"sampling failed: {error}")
    return tokens


def _sample_row(logits: torch.Tensor, row: SamplingRow, generator: torch.Generator) -> int:
    """Temperature, then top-k, then top-p (vLLM's order), then one multinomial draw."""
    params = row.params
    scaled = logits / params.temperature  # [V]
    if 0 < params.top_k < scaled.shape[-1]:
        kth_largest = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits[mass_before > params.top_p] = float("-inf")  # the top token always survives
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"non-finite probabilities at temperature {params.temperature:g}")
    if params.seed is not None:
        generator.manual_seed(_row_seed(params.seed, row.generated))
        return int(torch.multinomial(probs, 1, generator=generator))
    return int(torch.multinomial(probs, 1))


def finish_reason(
    params: SamplingParams, stop_ids: frozenset[int], token: int, generated: int
) -> FinishReason | None:
    """Whether a sequence ends with `token`, its `generated`-th token (stop strings are the frontend's).

    `sample` masks stop tokens until `min_tokens`, so none can show up here before then.
    """
    if token in params.stop_token_ids or (token in stop_ids and not params.ignore_eos):
        return "stop"
    return "length" if generated >= params.max_tokens else None


def _row_seed(seed: int, generated: int) -> int:
    """A distinct, reproducible stream per (request seed, token index)."""
    return (seed * 1_000_003 + generated) % (2**63 - 1)
