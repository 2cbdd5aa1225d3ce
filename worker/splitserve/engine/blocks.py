"""Which KV blocks are free: the bookkeeping of the paged cache, without a tensor in sight.

The pool (kv_cache.py) is cut into `num_blocks` fixed-size blocks; a sequence owns a list of block
ids (its block table) and takes one more each time its length crosses a block boundary. Kept free of
torch so the rules (no double free, no over-allocation, counts that always add up) are tested on
their own, and thread-safe because the engine thread grows sequences while the asyncio side frees
the caches it has shipped.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable


class NoFreeBlocksError(Exception):
    """Fewer free blocks than asked for; nothing was taken."""


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens (ceil division)."""
    return -(-tokens // block_size)


class BlockAllocator:
    """A free list of block ids, first freed first reused (as nano-vllm's BlockManager does)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._used: set[int] = set()
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, count: int, keep_free: int = 0) -> bool:
        """Whether `count` blocks can be taken while leaving `keep_free` (the admission watermark)."""
        return count + keep_free <= len(self._free)

    def allocate(self, count: int, keep_free: int = 0) -> list[int]:
        """Take `count` blocks, all or none; NoFreeBlocksError if that would leave fewer than `keep_free`."""
        with self._lock:
            if count + keep_free > len(self._free):
                free = len(self._free)
                raise NoFreeBlocksError(f"{count} blocks wanted, {free} free, {keep_free} kept back")
            taken = [self._free.popleft() for _ in range(count)]
            self._used.update(taken)
            return taken

    def release(self, blocks: Iterable[int]) -> None:
        """Give blocks back; a block that is not in use is a bug in the caller, so it raises."""
        with self._lock:
            returned = list(blocks)
            stray = [block for block in returned if block not in self._used]
            if stray or len(set(returned)) != len(returned):
                raise ValueError(f"blocks {stray or returned} are not in use (double free?)")
            self._used.difference_update(returned)
            self._free.extend(returned)
