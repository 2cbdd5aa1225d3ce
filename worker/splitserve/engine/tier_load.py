"""Prefix-cache hits in the host or disk tier, loaded back into device blocks off the engine thread.

Admission (engine thread) only takes the blocks: the device's cached prefix is shared, and fresh blocks
are taken for what a lower tier holds (`SequenceKV.admit`, an index lookup without I/O). The copy, a
disk read with its checks and a host-to-device copy, runs here on a loader thread, so that reading a
long prefix from disk does not stall the decode steps of every running stream. Meanwhile the sequence
is *loading* (scheduler.py): its blocks are held, it is neither scheduled nor preempted. When the load
ends the engine thread counts the loaded blocks in (`SequenceKV.attach_loaded`) and prefills the rest.
A block the tier no longer has, a damaged file, a block of another layout, a failure or a cancel ends
the load at that block: the blocks after it are recomputed (a counted miss, never wrong output).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from splitserve.contract.names import PrefixCacheTier

log = logging.getLogger(__name__)


class BlockSource(Protocol):
    """Where blocks come back from (`KVTiers`)."""

    def take(self, content: int) -> tuple[torch.Tensor, PrefixCacheTier] | None: ...


@dataclass(eq=False)
class TierLoad:
    """One sequence's blocks to copy back: the loader thread fills `tiers` (one entry per block copied,
    in order) until it is done; the engine thread reads it only after the completion call."""

    source: BlockSource
    contents: list[int]  # hashes of the blocks to load, in prefix order
    targets: list[torch.Tensor]  # the device blocks they land in, each [layers, 2, kv_heads, block_size, row]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tiers: list[PrefixCacheTier] = field(default_factory=list)  # where each block copied came from

    @property
    def loaded(self) -> list[int]:
        """Hashes of the blocks copied (a leading run of `contents`)."""
        return self.contents[: len(self.tiers)]

    def hits(self, block_size: int) -> dict[PrefixCacheTier, int]:
        """Tokens found in each tier."""
        found: dict[PrefixCacheTier, int] = {}
        for tier in self.tiers:
            found[tier] = found.get(tier, 0) + block_size
        return found


def copy_back(load: TierLoad) -> None:
    """Copy `load`'s blocks into their targets in order, stopping at the first one that cannot come back
    or when the load is cancelled. A block of another shape or dtype is recomputed, never cast."""
    for content, target in zip(load.contents, load.targets, strict=True):
        if load.cancelled.is_set():
            return
        taken = load.source.take(content)
        if taken is None or taken[0].shape != target.shape or taken[0].dtype != target.dtype:
            return
        block, tier = taken
        target.copy_(block)  # blocking: this thread may wait, the engine thread does not
        load.tiers.append(tier)


class TierLoader:
    """One loader thread: loads run in admission order, each reporting its end through `on_done` (which
    hands it to the engine thread's command queue)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-load")

    def start(self, load: TierLoad, on_done: Callable[[], None]) -> None:
        self._executor.submit(self._run, load, on_done)

    def close(self) -> None:
        """Loads not started are dropped; one under way finishes its block (the engine is stopping)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _run(load: TierLoad, on_done: Callable[[], None]) -> None:
        try:
            copy_back(load)
        except Exception:  # a failed load is a miss from that block on, never a dead loader
            log.exception("loading KV blocks back from a tier failed")
        finally:
            on_done()
