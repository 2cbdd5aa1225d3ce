"""Retention tiers below the device: blocks the prefix cache evicts go to host memory, then to disk,
and come back on a hit instead of being recomputed; a damaged disk tier is a counted miss, never wrong
output."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from splitserve.cli import build_parser, engine_config
from splitserve.engine.block_hash import block_hashes
from splitserve.engine.disk_tier import decode, encode
from splitserve.engine.forward import Engine
from splitserve.engine.runtime import EngineRuntime
from splitserve.serving.metrics import Metrics
from tests.conftest import Reference, random_prompt
from tests.worker.engine.runtimes import GREEDY, assert_no_leaks, collect, request
from tests.worker.engine.test_paging import BLOCK, make_runtime
from tests.worker.engine.test_prefix_cache import hits

FIRST = random_prompt(60, seed=5)  # 3 full blocks before its last token: 48 tokens to find cached
OTHERS = [random_prompt(60, seed=6 + i) for i in range(3)]  # enough to evict FIRST from a 12-block pool


async def run_again_after_eviction(
    runtime: EngineRuntime, between: Callable[[], None] = lambda: None
) -> list[int]:
    """FIRST, then OTHERS (which push FIRST's blocks off the device), `between`, then FIRST again."""
    await runtime.start()
    try:
        for i, prompt in enumerate((FIRST, *OTHERS)):
            await asyncio.wait_for(collect(runtime.generate(request(prompt, rid=f"t{i}"))), 60)
        between()
        tokens, _ = await asyncio.wait_for(collect(runtime.generate(request(FIRST, rid="again"))), 60)
    finally:
        await runtime.close()
    assert_no_leaks(runtime)
    return tokens


def moved(metrics: Metrics, tier: str, direction: str) -> float:
    labels = {"pool": "test", "role": metrics.role, "tier": tier, "direction": direction}
    return metrics.registry.get_sample_value("splitserve_kv_offload_bytes_total", labels) or 0.0


def disk_errors(metrics: Metrics, reason: str) -> float:
    labels = {"pool": "test", "role": metrics.role, "reason": reason}
    return metrics.registry.get_sample_value("splitserve_kv_disk_errors_total", labels) or 0.0


async def test_a_prefix_evicted_to_host_memory_is_loaded_back_exactly(
    engines: tuple[Engine, Engine], reference: Reference
) -> None:
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=12, metrics=metrics, kv_host_bytes=1 << 24)
    tokens = await run_again_after_eviction(runtime)
    assert tokens == reference.greedy(FIRST, GREEDY.max_tokens)
    assert hits(metrics, "device") == 0 and hits(metrics, "host") == 48
    usage = metrics.registry.get_sample_value(
        "splitserve_kv_tier_usage_bytes", {"pool": "test", "role": "both", "tier": "host"}
    )
    assert usage is not None and usage > 0
    block_bytes = BLOCK * engines[0].loaded.layout.bytes_per_token
    assert moved(metrics, "host", "load") == 3 * block_bytes
    assert moved(metrics, "host", "store") >= 4 * block_bytes and moved(metrics, "disk", "store") == 0


async def test_the_host_tier_budget_passes_blocks_on_to_disk(
    engines: tuple[Engine, Engine], reference: Reference, tmp_path: Path
) -> None:
    """A host tier of 0 bytes: every evicted block goes straight to disk, and comes back from there."""
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=12, metrics=metrics, kv_disk_path=str(tmp_path))
    tokens = await run_again_after_eviction(runtime)
    assert tokens == reference.greedy(FIRST, GREEDY.max_tokens)
    assert hits(metrics, "disk") == 48 and hits(metrics, "host") == 0
    block_bytes = BLOCK * engines[0].loaded.layout.bytes_per_token
    assert moved(metrics, "disk", "load") == 3 * block_bytes and moved(metrics, "host", "store") == 0
    assert moved(metrics, "disk", "store") >= 4 * block_bytes
    assert block_files(tmp_path) >= 4  # FIRST's four full blocks at least


def block_files(directory: Path) -> int:
    return len(list(directory.glob("*.kvb")))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # in the payload: only the CRC can tell
    path.write_bytes(bytes(data))


def from_another_model(path: Path) -> None:
    key = int(path.stem, 16)
    salt = path.read_bytes()[16:24]  # the header's salt field (after magic, version, codes, hash)
    block = decode(path.read_bytes(), key, salt)
    assert isinstance(block, torch.Tensor)
    path.write_bytes(encode(key, b"othermdl", block))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(truncate, "truncated"), (flip_a_byte, "corrupt"), (from_another_model, "foreign")],
    ids=["truncated", "flipped-byte", "another-model"],
)
async def test_a_damaged_block_file_is_a_counted_miss_and_the_output_stays_exact(
    engines: tuple[Engine, Engine],
    reference: Reference,
    tmp_path: Path,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    metrics = Metrics("test", "both")
    runtime = make_runtime(engines[0], "both", blocks=12, metrics=metrics, kv_disk_path=str(tmp_path))
    first_block = block_hashes(FIRST, BLOCK, runtime.pool.salt or b"")[0]
    tokens = await run_again_after_eviction(runtime, lambda: damage(tmp_path / f"{first_block:016x}.kvb"))
    assert tokens == reference.greedy(FIRST, GREEDY.max_tokens)
    assert hits(metrics, "disk") == 0  # the chain breaks at its first block
    assert disk_errors(metrics, reason) == 1


async def test_a_disk_that_refuses_writes_is_counted_and_the_output_stays_exact(
    engines: tuple[Engine, Engine], reference: Reference, tmp_path: Path
) -> None:
    """The tier's directory turns into a file (as good as a full or read-only volume): every write fails."""
    metrics = Metrics("test", "both")
    directory = tmp_path / "tier"
    runtime = make_runtime(engines[0], "both", blocks=12, metrics=metrics, kv_disk_path=str(directory))
    shutil.rmtree(directory)
    directory.write_bytes(b"")
    tokens = await run_again_after_eviction(runtime)
    assert tokens == reference.greedy(FIRST, GREEDY.max_tokens)
    assert hits(metrics, "disk") == 0
    assert disk_errors(metrics, "write_error") >= 4


def test_the_tier_flags_reach_the_engine_config() -> None:
    flags = ["worker", "--role", "both", "--model", "m", "--kv-host-bytes", "1024", "--kv-disk-path", "/kv"]
    config = engine_config(build_parser().parse_args([*flags, "--kv-host-ttl-seconds", "60"]))
    assert (config.kv_host_bytes, config.kv_host_ttl_seconds, config.kv_disk_path) == (1024, 60, "/kv")
    assert config.enable_prefix_caching
    with pytest.raises(ValidationError, match="need enable_prefix_caching"):
        engine_config(build_parser().parse_args([*flags, "--no-prefix-caching"]))
