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
from collections.abc import Callable, Iterable


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

    The prefix cache lives here too, because it is the same bookkeeping: a full block may carry a
    content hash (block_hash.py); blocks in use are reference-counted, so sequences with a common
    prefix share its blocks; a hashed block whose last user lets go stays cached and *free* (it counts
    for admission) until it is needed, and then the least recently used one is evicted, after every
    blank free block has been handed out.
    """

    def __init__(self, num_blocks: int, on_evict: Callable[[int, int], None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.on_evict = on_evict  # (block, hash) of a cached block about to be reused; runs under the lock
        self._free: set[int] = set(range(num_blocks))  # free and holding nothing worth keeping
        # Hand-out order; may hold ids taken out of turn (skipped on the way), compacted when long.
        self._order: collections.deque[int] = collections.deque(spread_order(num_blocks))
        self._refs: dict[int, int] = {}  # block in use -> how many sequences hold it
        self._cached_free: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}  # hash -> the one block holding it
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: blank ones and cached ones nobody uses."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a hashed prefix block, in use or not."""
        return len(self._hash_of)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def can_allocate(self, count: int, keep_free: int = 0) -> bool:
        """Whether `count` blocks can be taken while leaving `keep_free` (the admission watermark)."""
        return count + keep_free <= self.num_free

    def allocate(self, count: int, keep_free: int = 0, after: int | None = None) -> list[int]:
        """Take `count` blocks, all or none; NoFreeBlocksError if that would leave fewer than `keep_free`.

        `after` (a sequence's last block) asks for the blocks that follow it; otherwise the next free
        block in order and, where free, the ones after it. Cached free blocks are taken last, least
        recently used first (their hashes are forgotten).
        """
        with self._lock:
            return self._allocate(count, keep_free, after)

    def allocate_prefixed(
        self, hashes: Iterable[int], count: int, keep_free: int = 0
    ) -> tuple[list[int], int]:
        """`count` blocks for a new sequence, the first ones shared: the cached blocks of the longest
        leading run of `hashes` (read lazily, stopping at the first miss). All or none, like `allocate`;
        a cached free block it revives counts against the free blocks. Returns (blocks, shared)."""
        with self._lock:
            shared = self._cached_run(hashes, count)
            wanted = count - len(shared) + sum(1 for block in shared if block in self._cached_free)
            if wanted + keep_free > self.num_free:
                raise NoFreeBlocksError(
                    f"{wanted} blocks wanted, {self.num_free} free, {keep_free} kept back"
                )
            self._hold(shared)
            fresh = self._allocate(count - len(shared), 0, after=shared[-1] if shared else None)
            return shared + fresh, len(shared)

    def share(self, hashes: Iterable[int], limit: int) -> list[int]:
        """Hold the cached blocks of the longest leading run of `hashes` (at most `limit`), taking no
        fresh block: how a decode worker pins the prefix it already has while the rest is sent to it."""
        with self._lock:
            shared = self._cached_run(hashes, limit)
            self._hold(shared)
            return shared

    def _cached_run(self, hashes: Iterable[int], limit: int) -> list[int]:
        """Blocks holding the leading run of `hashes` (read lazily, stopping at the first miss)."""
        shared: list[int] = []
        for content in hashes:
            block = self._block_of.get(content)
            if block is None or len(shared) == limit:
                break
            shared.append(block)
        return shared

    def _hold(self, shared: list[int]) -> None:
        for block in shared:
            self._cached_free.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1

    def register(self, block: int, content: int) -> None:
        """`block` (in use, now full) holds the block hashed `content`; kept once the sequence lets go.
        If another block already holds that content (two sequences computed it at once), this one stays
        unhashed: one copy is enough."""
        with self._lock:
            if block in self._refs and content not in self._block_of and block not in self._hash_of:
                self._hash_of[block] = content
                self._block_of[content] = block

    def release(self, blocks: Iterable[int]) -> None:
        """Give blocks back; a block that is not in use is a bug in the caller, so it raises.

        Blocks are given in sequence order; the cached ones are queued for eviction last block first, so
        a prefix is cut from its end and what stays cached is still a reachable prefix.
        """
        with self._lock:
            returned = list(blocks)
            stray = [b for b in returned if b not in self._refs]
            if stray or len(set(returned)) != len(returned):
                raise ValueError(f"blocks {stray or returned} are not in use (double free?)")
            for block in returned:
                self._refs[block] -= 1
            gone = [block for block in returned if not self._refs[block]]
            for block in gone:
                del self._refs[block]
            for block in reversed(gone):
                if block in self._hash_of:
                    self._cached_free[block] = None
            blank = [block for block in gone if block not in self._hash_of]
            self._free.update(blank)
            self._order.extend(blank)
            if len(self._order) > 2 * self.num_blocks:
                self._order = collections.deque(block for block in self._order if block in self._free)

    def _allocate(self, count: int, keep_free: int, after: int | None) -> list[int]:
        if count + keep_free > self.num_free:
            raise NoFreeBlocksError(f"{count} blocks wanted, {self.num_free} free, {keep_free} kept back")
        taken: list[int] = []
        start = after + 1 if after is not None else None
        while len(taken) < min(count, len(self._free)):
            if start is None or start in taken or start not in self._free:
                start = self._next_in_order(taken)
            taken.append(start)
            start += 1
        self._free.difference_update(taken)
        while len(taken) < count:
            taken.append(self._evict())
        for block in taken:
            self._refs[block] = 1
        return taken

    def _evict(self) -> int:
        """The least recently used cached free block, its hash forgotten (and reported)."""
        block, _ = self._cached_free.popitem(last=False)
        content = self._hash_of.pop(block)
        del self._block_of[content]
        if self.on_evict is not None:
            self.on_evict(block, content)
        return block

    def _next_in_order(self, taken: list[int]) -> int:
        while True:
            block = self._order.popleft()
            if block in self._free and block not in taken:
                return block
