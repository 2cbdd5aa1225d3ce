"""Where device blocks go when the prefix cache evicts them: host memory, then an optional disk tier.

The allocator reports each cached block it is about to reuse (`BlockAllocator.on_evict`, under its
lock, before the block is overwritten); its keys and values are copied to host memory (pinned on
CUDA, so loading back is a DMA) into an LRU bounded by bytes and TTL (tiers.py). What the host tier
lets go of is written to the disk tier when there is one (disk_tier.py), else dropped. Admission
asks which of the blocks the device no longer holds are here (`holds`, no I/O); a loader thread then
takes them (`take`: the disk read) and copies them back into fresh device blocks instead of
recomputing them (tier_load.py). One lock: evictions happen on the engine thread and on the asyncio
side (arriving caches take blocks too), loads on the loader thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol

import torch

from splitserve.contract.config import EngineConfig
from splitserve.contract.names import OffloadDirection, PrefixCacheTier
from splitserve.engine.disk_tier import DiskTier
from splitserve.engine.tiers import Clock, LRUTier, Released


class TierMetrics(Protocol):
    """What the tiers record (the engine's metrics provide it under contract names)."""

    def record_kv_disk_error(self, reason: str) -> None: ...

    def record_kv_offload(self, tier: PrefixCacheTier, direction: OffloadDirection, nbytes: int) -> None: ...


class KVTiers:
    """The host tier (possibly of 0 bytes: evictions then go straight to disk) and the disk tier."""

    def __init__(
        self,
        host_bytes: int,
        host_ttl_seconds: float | None,
        disk: DiskTier | None,
        pin_memory: bool,
        clock: Clock,
        metrics: TierMetrics,
    ) -> None:
        self.host: LRUTier[torch.Tensor] = LRUTier(host_bytes, host_ttl_seconds, clock)
        self.disk = disk
        self.pin_memory = pin_memory
        self.metrics = metrics
        self._lock = threading.Lock()

    @classmethod
    def for_config(
        cls,
        config: EngineConfig,
        salt: bytes,
        device: torch.device,
        metrics: TierMetrics,
        clock: Clock = time.monotonic,
    ) -> KVTiers | None:
        """The tiers `config` asks for; None when it asks for neither."""
        if not config.kv_host_bytes and config.kv_disk_path is None:
            return None
        disk = None
        if config.kv_disk_path is not None:
            path = Path(config.kv_disk_path)
            disk = DiskTier(
                path,
                salt,
                config.kv_disk_bytes,
                config.kv_disk_ttl_seconds,
                clock,
                metrics.record_kv_disk_error,
            )
        pin = device.type == "cuda"
        return cls(config.kv_host_bytes, config.kv_host_ttl_seconds, disk, pin, clock, metrics)

    def usage_bytes(self) -> dict[PrefixCacheTier, int]:
        with self._lock:
            used: dict[PrefixCacheTier, int] = {"host": self.host.used_bytes}
            if self.disk is not None:
                used["disk"] = self.disk.index.used_bytes
            return used

    def offload(self, content: int, block: torch.Tensor) -> None:
        """Keep a copy of an evicted device block `[layers, 2, kv_heads, block_size, row]` (kv_cache.py)."""
        copy = torch.empty(block.shape, dtype=block.dtype, pin_memory=self.pin_memory)
        copy.copy_(block)
        nbytes = copy.numel() * copy.element_size()
        with self._lock:
            released = self.host.put(content, copy, nbytes)
            if not (released and released[-1].key == content and released[-1].why == "too_big"):
                self.metrics.record_kv_offload("host", "store", nbytes)
            self._spill(released)

    def holds(self, content: int) -> bool:
        """Whether a tier has the block hashed `content` (by its index: a disk file may still turn out
        damaged when `take` reads it, a miss then)."""
        with self._lock:
            return content in self.host or (self.disk is not None and content in self.disk)

    def take(self, content: int) -> tuple[torch.Tensor, PrefixCacheTier] | None:
        """The block hashed `content` from the highest tier that has it, or None. A host hit leaves
        the host tier (the block is on the device again); a disk file stays for other workers. The
        disk read runs outside this lock, so evictions on the engine thread go on meanwhile."""
        with self._lock:
            self._spill(self.host.expire())
            block = self.host.pop(content) if content in self.host else None
            if block is not None:
                self.metrics.record_kv_offload("host", "load", block.numel() * block.element_size())
                return block, "host"
        if self.disk is None:
            return None
        loaded = self.disk.load(content)
        if not isinstance(loaded, torch.Tensor):
            return None
        self.metrics.record_kv_offload("disk", "load", loaded.numel() * loaded.element_size())
        return loaded, "disk"

    def _spill(self, released: list[Released[torch.Tensor]]) -> None:
        if self.disk is not None:
            for item in released:
                if item.key not in self.disk and self.disk.store(item.key, item.value):
                    self.metrics.record_kv_offload("disk", "store", item.nbytes)
