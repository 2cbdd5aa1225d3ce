"""The host and disk tiers together, with a hand-driven clock: what the host tier lets go of (budget or
TTL) lands on disk, hits come from the highest tier, and the bytes moved are counted."""

from __future__ import annotations

from pathlib import Path

import torch

from splitserve.contract.names import OffloadDirection, PrefixCacheTier
from splitserve.engine.disk_tier import DiskTier
from splitserve.engine.offload import KVTiers
from tests.worker.engine.test_tiers import Clock

SALT = b"saltsalt"
BLOCK = (2, 2, 1, 4, 8)  # layers, K/V, kv_heads, block_size, head_dim
BLOCK_BYTES = 2 * 2 * 1 * 4 * 8 * 4


class Recorded:
    def __init__(self) -> None:
        self.moved: dict[tuple[str, str], int] = {}
        self.errors: list[str] = []

    def record_kv_disk_error(self, reason: str) -> None:
        self.errors.append(reason)

    def record_kv_offload(self, tier: PrefixCacheTier, direction: OffloadDirection, nbytes: int) -> None:
        self.moved[tier, direction] = self.moved.get((tier, direction), 0) + nbytes


def tiers(
    tmp_path: Path | None, host_blocks: int, ttl: float | None = None
) -> tuple[KVTiers, Clock, Recorded]:
    clock, recorded = Clock(), Recorded()
    disk = DiskTier(tmp_path, SALT, 1 << 20, None, clock, recorded.record_kv_disk_error) if tmp_path else None
    return KVTiers(host_blocks * BLOCK_BYTES, ttl, disk, False, clock, recorded), clock, recorded


def block(value: float) -> torch.Tensor:
    return torch.full(BLOCK, value)


def test_a_host_hit_leaves_the_host_tier_and_a_miss_is_none() -> None:
    kv, _, recorded = tiers(None, host_blocks=4)
    kv.offload(1, block(1.0))
    taken = kv.take(1)
    assert taken is not None and taken[1] == "host" and torch.equal(taken[0], block(1.0))
    assert kv.take(1) is None and kv.take(2) is None
    assert recorded.moved == {("host", "store"): BLOCK_BYTES, ("host", "load"): BLOCK_BYTES}


def test_the_host_budget_spills_the_least_recently_used_to_disk(tmp_path: Path) -> None:
    kv, _, recorded = tiers(tmp_path, host_blocks=2)
    for key in (1, 2, 3):
        kv.offload(key, block(float(key)))
    assert kv.usage_bytes()["host"] == 2 * BLOCK_BYTES
    taken = kv.take(1)  # the oldest went to disk
    assert taken is not None and taken[1] == "disk" and torch.equal(taken[0], block(1.0))
    assert recorded.moved["disk", "store"] == BLOCK_BYTES and recorded.moved["disk", "load"] == BLOCK_BYTES
    assert kv.take(3) is not None and kv.take(3) is None  # a host hit moves the block back up


def test_a_host_ttl_expiry_spills_to_disk_and_without_disk_drops(tmp_path: Path) -> None:
    for directory in (tmp_path, None):
        kv, clock, _ = tiers(directory, host_blocks=4, ttl=60)
        kv.offload(7, block(7.0))
        clock.now = 61
        taken = kv.take(7)
        assert (taken[1] if taken else None) == ("disk" if directory else None)


def test_a_host_tier_of_zero_bytes_sends_everything_to_disk(tmp_path: Path) -> None:
    kv, _, recorded = tiers(tmp_path, host_blocks=0)
    kv.offload(5, block(5.0))
    assert ("host", "store") not in recorded.moved and recorded.moved["disk", "store"] == BLOCK_BYTES
    taken = kv.take(5)
    assert taken is not None and taken[1] == "disk"
