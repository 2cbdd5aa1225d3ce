"""Step planning: which prompt chunks and decode streams one forward carries (pure, no model)."""

from __future__ import annotations

import torch

from splitserve.engine.kv_cache import KVLayout, KVPool
from splitserve.engine.params import SamplingParams
from splitserve.engine.step import BatchPolicy, Sequence, plan_step

POOL = KVPool(
    KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32),
    num_blocks=4,
    block_size=16,
    device=torch.device("cpu"),
)


def sequence(name: str, prompt_len: int, prefilled: int = 0) -> Sequence:
    kv = POOL.sequence()
    kv.length = prefilled  # planning reads lengths only; no blocks needed
    return Sequence(name, SamplingParams(), kv, list(range(prompt_len)))


def test_prompt_chunks_are_fifo_within_the_token_budget() -> None:
    policy = BatchPolicy(prefill_token_budget=100, interleave=True)
    first, second, third = sequence("a", 70, prefilled=10), sequence("b", 80), sequence("c", 5)
    plan, decode = plan_step([first, second, third], [], policy)
    # The oldest prompt takes what it still needs; the next one gets the rest of the budget.
    assert [(seq.request_id, n) for seq, n in plan] == [("a", 60), ("b", 40)]
    assert decode == []


def test_a_long_prompt_is_chunked_not_starved() -> None:
    policy = BatchPolicy.for_role("prefill", chunk_size=32, chunked_prefill=False, max_model_len=4096)
    long_prompt, short = sequence("long", 1000, prefilled=960), sequence("short", 4)
    plan, _ = plan_step([long_prompt, short], [], policy)
    assert [(seq.request_id, n) for seq, n in plan] == [("long", 32)]


def test_decode_streams_ride_along_only_when_the_policy_interleaves() -> None:
    streams = [sequence("d1", 4, prefilled=4), sequence("d2", 4, prefilled=4)]
    prompt = sequence("p", 16)
    chunked = BatchPolicy.for_role("both", chunk_size=8, chunked_prefill=True, max_model_len=64)
    plan, decode = plan_step([prompt], streams, chunked)
    assert [n for _, n in plan] == [8] and decode == streams

    colocated = BatchPolicy.for_role("both", chunk_size=8, chunked_prefill=False, max_model_len=64)
    assert colocated == BatchPolicy(prefill_token_budget=64, interleave=False)
    plan, decode = plan_step([prompt], streams, colocated)
    assert [n for _, n in plan] == [16] and decode == []  # the whole prompt, decode waits (the stall)
    plan, decode = plan_step([], streams, colocated)
    assert plan == [] and decode == streams


def test_prefilled_sequences_are_what_prefilled_says() -> None:
    assert sequence("x", 4, prefilled=4).prefilled
    assert not sequence("x", 4, prefilled=3).prefilled
