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


def spread_order(num_blocks: int) -> list[int]:
    """Block ids in bit-reversed order (0, N/2, N/4, 3N/4, ...): each new sequence starts in the middle
    of the widest free gap, so it can grow into the blocks right after its own for a long time."""
    bits = max(1, (num_blocks - 1).bit_length())

    def reversed_bits(block: int) -> int:
        return int(format(block, f"0{bits}b")[::-1], 2)

    return sorted(range(num_blocks), key=reversed_bits)


class BlockAllocator:
    """Free blocks handed out first freed first reused (as nano-vllm's BlockManager does), except that
    a sequence that grows gets the block right after its last one when that one is free.

    Blocks of one sequence that are contiguous in the pool can be read in place (attention.py);
    the initial order spreads new sequences apart so that this stays the common case.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: set[int] = set(range(num_blocks))
        # Hand-out order; may hold ids taken out of turn (skipped on the way), compacted when long.
        self._order: collections.deque[int] = collections.deque(spread_order(num_blocks))
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

    def allocate(self, count: int, keep_free: int = 0, after: int | None = None) -> list[int]:
        """Take `count` blocks, all or none; NoFreeBlocksError if that would leave fewer than `keep_free`.

        `after` (a sequence's last block) asks for the blocks that follow it; otherwise the next free
        block in order and, where free, the ones after it.
        """
        with self._lock:
            if count + keep_free > len(self._free):
                free = len(self._free)
                raise NoFreeBlocksError(f"{count} blocks wanted, {free} free, {keep_free} kept back")
            taken: list[int] = []
            start = after + 1 if after is not None else None
            while len(taken) < count:
                if start is None or start in taken or start not in self._free:
                    start = self._next_in_order(taken)
                taken.append(start)
                start += 1
            self._free.difference_update(taken)
            return taken

    def release(self, blocks: Iterable[int]) -> None:
        """Give blocks back; a block that is not in use is a bug in the caller, so it raises."""
        with self._lock:
            returned = list(blocks)
            stray = [b for b in returned if b in self._free or not 0 <= b < self.num_blocks]
            if stray or len(set(returned)) != len(returned):
                raise ValueError(f"blocks {stray or returned} are not in use (double free?)")
            self._free.update(returned)
            self._order.extend(returned)
            if len(self._order) > 2 * self.num_blocks:
                self._order = collections.deque(block for block in self._order if block in self._free)

    def _next_in_order(self, taken: list[int]) -> int:
        while True:
            block = self._order.popleft()
            if block in self._free and block not in taken:
                return block
