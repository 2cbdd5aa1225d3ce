"""Next-token choice: greedy, masking before min_tokens, seeded draws, top-k/top-p, finish reasons."""

from __future__ import annotations

import torch

from splitserve.engine.params import SamplingParams
from splitserve.engine.sampling import SamplingError, SamplingRow, finish_reason, sample

EOS = frozenset({0})


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows)  # [S, V]


def test_greedy_rows_take_the_argmax_and_min_tokens_masks_stop_tokens() -> None:
    greedy = SamplingParams(temperature=0.0)
    masked = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(1,))
    row = [5.0, 4.0, 1.0, 0.0]
    rows = [SamplingRow(greedy, 0), SamplingRow(masked, 1)]
    # Row 0 may stop at EOS; row 1 has produced 1 < 2 tokens, so EOS (0) and its stop id (1) are banned.
    assert sample(logits(row, row), rows, EOS) == [0, 2]
    assert sample(logits(row, row), [SamplingRow(masked, 2)] * 2, EOS) == [0, 0]


def test_seeded_draws_repeat_per_token_index_whatever_the_batch() -> None:
    seeded = SamplingParams(temperature=1.0, seed=7)
    flat = [0.0] * 64
    alone = [sample(logits(flat), [SamplingRow(seeded, index)], EOS)[0] for index in range(8)]
    other = SamplingParams(temperature=1.0)
    in_batch = [
        sample(logits(flat, flat), [SamplingRow(other, 0), SamplingRow(seeded, index)], EOS)[1]
        for index in range(8)
    ]
    assert alone == in_batch
    assert len(set(alone)) > 1  # the draw depends on the token index, not one fixed value


def test_top_k_one_and_tiny_top_p_leave_only_the_best_token() -> None:
    row = [1.0, 3.0, 2.0, 2.9]
    for params in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
        assert {sample(logits(row), [SamplingRow(params, 0)], EOS)[0] for _ in range(20)} == {1}


def test_top_k_keeps_only_the_k_best() -> None:
    params = SamplingParams(temperature=5.0, top_k=2, seed=1)
    seen = {sample(logits([1.0, 3.0, 2.0, 2.9]), [SamplingRow(params, i)], EOS)[0] for i in range(200)}
    assert seen == {1, 3}


def test_finish_reasons() -> None:
    params = SamplingParams(max_tokens=3, stop_token_ids=(9,))
    assert finish_reason(params, EOS, 5, 1) is None
    assert finish_reason(params, EOS, 0, 1) == "stop"
    assert finish_reason(params, EOS, 9, 1) == "stop"
    assert finish_reason(params, EOS, 5, 3) == "length"
    assert finish_reason(params.model_copy(update={"ignore_eos": True}), EOS, 0, 1) is None


def test_a_row_that_cannot_be_sampled_fails_alone() -> None:
    """Past validation (model_construct): an overflowing temperature and out-of-vocabulary stop ids."""
    broken = SamplingParams.model_construct(
        **{**SamplingParams().model_dump(), "temperature": 1e-45, "min_tokens": 2, "stop_token_ids": (-5, 99)}
    )
    greedy = SamplingParams(temperature=0.0, min_tokens=2)
    row = [5.0, 4.0, 1.0, 0.0]
    tokens = sample(logits(row, row, row, row), [SamplingRow(greedy, 0), SamplingRow(broken, 0)] * 2, EOS)
    first, failed, third, _ = tokens
    assert (first, third) == (1, 1)
    assert isinstance(failed, SamplingError) and "sampling failed" in str(failed)
