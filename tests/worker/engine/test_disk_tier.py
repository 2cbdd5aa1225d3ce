"""The disk tier: block files that round-trip, and every damaged, foreign or unwritable file a counted
miss (never an exception, never wrong KV)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from splitserve.engine.disk_tier import DTYPES, DiskTier, Miss, decode, encode

SALT = b"modelAAA"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tier(
    directory: Path,
    errors: list[str],
    capacity: int = 1 << 20,
    ttl: float | None = None,
    clock: Clock | None = None,
) -> DiskTier:
    return DiskTier(directory, SALT, capacity, ttl, clock or Clock(), on_error=errors.append)


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_blocks_round_trip_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    block = (torch.randn(2, 16, 2, 8) * 50).to(dtype)  # [K/V, tokens, kv_heads, head_dim]
    errors: list[str] = []
    disk = tier(tmp_path, errors)
    assert disk.store(7, block)
    loaded = disk.load(7)
    assert isinstance(loaded, torch.Tensor) and loaded.dtype == dtype
    assert torch.equal(loaded, block) and errors == []
    assert [p.name for p in tmp_path.iterdir()] == [f"{7:016x}.kvb"]  # no temporary left behind


def damaged(data: bytes) -> dict[str, tuple[bytes, str]]:
    flipped_payload = bytearray(data)
    flipped_payload[-1] ^= 0x40
    flipped_header = bytearray(data)
    flipped_header[20] ^= 0x01
    return {
        "truncated payload": (data[:-3], "truncated"),
        "truncated header": (data[:10], "truncated"),
        "flipped payload byte": (bytes(flipped_payload), "corrupt"),
        "flipped header byte": (bytes(flipped_header), "corrupt"),
        "another model": (encode(7, b"modelBBB", torch.zeros(2, 2)), "foreign"),
        "not ours": (b"PK\x03\x04" + data[4:], "foreign"),
        "another block": (encode(8, SALT, torch.zeros(2, 2)), "corrupt"),
    }


def test_every_damaged_or_foreign_file_is_a_counted_miss(tmp_path: Path) -> None:
    block = torch.arange(64, dtype=torch.float32).reshape(2, 4, 8)
    cases = damaged(encode(7, SALT, block))
    for name, (data, reason) in cases.items():
        decoded = decode(data, 7, SALT)
        assert isinstance(decoded, Miss) and decoded.reason == reason, name
        errors: list[str] = []
        disk = tier(tmp_path / name.replace(" ", "-"), errors)
        assert disk.store(7, block)
        disk.path(7).write_bytes(data)
        result = disk.load(7)
        assert isinstance(result, Miss) and result.reason == reason, name
        assert errors == [reason] and not disk.path(7).exists() and 7 not in disk
        assert disk.load(7) == Miss("missing", "not in this tier")  # counted once, then just absent


def test_a_full_disk_is_a_counted_write_error(tmp_path: Path) -> None:
    errors: list[str] = []
    disk = tier(tmp_path, errors)
    temporary = disk.path(9).with_name(f".{disk.path(9).name}.{os.getpid()}.tmp")
    temporary.symlink_to("/dev/full")  # the kernel answers ENOSPC to every write
    assert not disk.store(9, torch.ones(4))
    assert errors == ["write_error"] and 9 not in disk and not temporary.exists()
    assert isinstance(disk.load(9), Miss)


def test_budget_and_ttl_delete_files_and_a_restart_adopts_them(tmp_path: Path) -> None:
    errors: list[str] = []
    size = len(encode(1, SALT, torch.zeros(256)))
    clock = Clock()
    disk = tier(tmp_path, errors, capacity=3 * size, ttl=100, clock=clock)
    for key in (1, 2, 3, 4):
        assert disk.store(key, torch.full((256,), float(key)))
    assert sorted(p.name[:16] for p in tmp_path.iterdir()) == [f"{k:016x}" for k in (2, 3, 4)]
    again = tier(tmp_path, errors, capacity=3 * size)  # a restarted worker finds its files
    assert all(key in again for key in (2, 3, 4))
    loaded = again.load(3)
    assert isinstance(loaded, torch.Tensor) and float(loaded[0]) == 3.0
    clock.now = 101
    assert isinstance(disk.load(2), Miss) and not disk.path(2).exists() and errors == []
