"""Retention tiers with a hand-driven clock: LRU order, byte budgets, TTL from last use."""

from __future__ import annotations

from splitserve.engine.block_hash import block_hash, block_hashes, cache_salt
from splitserve.engine.tiers import LRUTier, Released


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_least_recently_used_goes_first_when_the_budget_binds() -> None:
    clock = Clock()
    tier: LRUTier[str] = LRUTier(capacity_bytes=30, ttl_seconds=None, clock=clock)
    for key in (1, 2, 3):
        assert tier.put(key, f"block{key}", 10) == []
    assert tier.get(1) == "block1"  # 1 is now the most recent; 2 the oldest
    released = tier.put(4, "block4", 15)
    assert [(r.key, r.why) for r in released] == [(2, "budget"), (3, "budget")]
    assert tier.used_bytes == 25 and len(tier) == 2 and 1 in tier and 4 in tier
    assert tier.put(5, "huge", 31) == [Released(5, "huge", 31, "too_big")]
    assert tier.pop(1) == "block1" and tier.used_bytes == 15


def test_ttl_counts_from_the_last_use() -> None:
    clock = Clock()
    tier: LRUTier[str] = LRUTier(capacity_bytes=100, ttl_seconds=60, clock=clock)
    tier.put(1, "a", 10)
    tier.put(2, "b", 10)
    clock.now = 50
    assert tier.get(1) == "a"  # used at 50: lives until 110
    clock.now = 61
    assert tier.get(2) is None and 2 not in tier  # expired, but held until expire() hands it back
    assert [(r.key, r.why) for r in tier.expire()] == [(2, "ttl")]
    assert tier.used_bytes == 10 and tier.get(1) == "a"
    clock.now = 200
    assert [r.key for r in tier.put(3, "c", 10)] == [1]  # a put also lets expired blocks go


def test_block_hashes_chain_and_name_the_model() -> None:
    salt = cache_salt("llama", "main", "bfloat16")
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4, salt)
    assert len(hashes) == 2  # the partial last block is not hashed
    assert hashes[1] == block_hash(hashes[0], tokens[4:8], salt)
    assert block_hashes([99, *tokens[1:]], 4, salt)[1] != hashes[1]  # a different prefix, a different block
    assert block_hashes(tokens, 4, cache_salt("llama", "main", "int8")) != hashes
    assert block_hashes(tokens, 4, cache_salt("llama", "v2", "bfloat16")) != hashes
