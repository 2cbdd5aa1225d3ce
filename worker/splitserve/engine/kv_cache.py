"""The paged KV cache: one preallocated pool of fixed-size blocks, and sequences that hold block tables.

The pool is sized once from the KV budget in bytes (the seeds' formula, 2 × layers × kv_heads ×
head_dim × bytes per token) and never grows. A sequence takes a block each time its length crosses a
block boundary, so memory follows what was produced, not what `max_tokens` might allow; when none is
free the scheduler preempts (scheduler.py).

Layout: keys and values of every layer live in one tensor whose token axis is the concatenation of
all blocks, `[layers, 2, kv_heads, num_blocks * block_size, row]`, where a row is one token of one
head: `head_dim` values in the model dtype, or with int8 KV `head_dim` int8 values and their scale
(kv_quant.py), so every slot is self-contained bytes wherever it is copied. A token's *slot* is
`block_id * block_size + offset`, so writing a step's new keys is one `index_copy_` per layer. A
sequence whose blocks follow each other (the allocator places new sequences apart and grows them
into the next block when it can) is read in place as one view, as cheap as the per-sequence tensors
this replaced; the others are gathered block by block (attention.py). A KV transfer reads and writes
the pool's memory in place, one run of consecutive slots of one head at a time (`SequenceKV.runs`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from splitserve.engine.block_hash import block_hash
from splitserve.engine.blocks import BlockAllocator, blocks_for
from splitserve.engine.kv_quant import is_quantized, row_nbytes, row_width
from splitserve.engine.offload import KVTiers


@dataclass(frozen=True)
class KVLayout:
    """Shape of the model's KV cache, read from its config, and how it is stored: `dtype` is the model
    dtype, or torch.int8 for quantized KV (`--kv-cache-dtype int8`)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return is_quantized(self.dtype)

    @property
    def row_width(self) -> int:
        """Elements of the pool's last axis: one token of one head."""
        return row_width(self.head_dim, self.dtype)

    @property
    def row_nbytes(self) -> int:
        return row_nbytes(self.head_dim, self.dtype)

    @property
    def bytes_per_token(self) -> int:
        """2 (keys and values) × layers × kv_heads × bytes of a row (head_dim × bytes per element, or
        head_dim + 2 for int8 rows with their scale)."""
        return 2 * self.num_layers * self.num_kv_heads * self.row_nbytes

    def mismatch(self, other: KVLayout) -> str | None:
        """Why a cache of `other`'s layout cannot land in this one's pool, or None if it can."""
        if other.dtype != self.dtype:
            return (
                f"KV dtype {_name(other.dtype)} vs {_name(self.dtype)}: the prefill and decode workers "
                "of a pool must store KV alike (kvCache.dtype / --kv-cache-dtype)"
            )
        sent = (other.num_layers, other.num_kv_heads, other.head_dim)
        mine = (self.num_layers, self.num_kv_heads, self.head_dim)
        if sent != mine:
            return f"KV layout (layers, kv heads, head dim) {sent} does not match this worker's model {mine}"
        return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVPool:
    """Every KV block of one worker, allocated up front."""

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        salt: bytes | None = None,
    ) -> None:
        self.layout = layout
        self.block_size = block_size
        self.device = device
        self.salt = salt  # the prefix cache's (cache_salt); None: prefix caching off
        self.tiers: KVTiers | None = None  # where evicted cached blocks go (`keep_evicted_in`)
        self.allocator = BlockAllocator(num_blocks)
        # Untouched pages of an `empty` CPU tensor cost no RAM until a block is first written.
        self.data = torch.empty(  # [layers, 2, kv_heads, num_blocks * block_size, row]
            layout.num_layers,
            2,
            layout.num_kv_heads,
            num_blocks * block_size,
            layout.row_width,
            dtype=layout.dtype,
            device=device,
        )
        self.keys = [self.data[layer, 0] for layer in range(layout.num_layers)]  # each [H, slots, row]
        self.values = [self.data[layer, 1] for layer in range(layout.num_layers)]  # each [H, slots, row]
        self._offsets = torch.arange(block_size, device=device)  # [block_size]

    @classmethod
    def for_budget(
        cls,
        layout: KVLayout,
        budget_bytes: int,
        block_size: int,
        device: torch.device,
        salt: bytes | None = None,
    ) -> KVPool:
        """As many whole blocks as `budget_bytes` holds (at least one)."""
        num_blocks = max(1, budget_bytes // (layout.bytes_per_token * block_size))
        return cls(layout, num_blocks, block_size, device, salt)

    @functools.cached_property
    def byte_view(self) -> memoryview:
        """The whole pool as bytes, no copy: where KV transfers send from and land into (CPU only; a
        CUDA pool would need pinned staging buffers, which are not written yet)."""
        if self.device.type != "cpu":
            raise ValueError(f"KV transfers need the KV pool in CPU memory, it is on {self.device}")
        return self.data.view(-1).view(torch.uint8).numpy().data

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Blocks in use over all blocks, 0..1."""
        return self.allocator.num_used / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def sequence(self) -> SequenceKV:
        """An empty sequence: no blocks until it is given tokens."""
        return SequenceKV(self)

    def keep_evicted_in(self, tiers: KVTiers) -> None:
        """Copy every cached block the allocator evicts to `tiers`; admission finds them there (`admit`)."""
        self.tiers = tiers
        self.allocator.on_evict = lambda block, content: tiers.offload(content, self.block_data(block))

    def block_data(self, block: int) -> torch.Tensor:
        """One block's keys and values, `[layers, 2, kv_heads, block_size, row]` (a view)."""
        return self.data[:, :, :, block * self.block_size : (block + 1) * self.block_size]

    def slots_of(self, block_table: list[int]) -> torch.Tensor:
        """Slot ids of every token position a block table covers, `[len(table) * block_size]`."""
        table = torch.tensor(block_table, dtype=torch.long).to(self.device)  # [blocks]
        return (table[:, None] * self.block_size + self._offsets).flatten()


def _prefix_hashes(tokens: list[int], size: int, salt: bytes, found: list[int]) -> Iterator[int]:
    """Chained hashes of the full blocks of `tokens` before its last token, lazily (a lookup stops at
    its first miss); each one computed is also appended to `found`."""
    parent: int | None = None
    for start in range(0, len(tokens) - size, size):
        parent = block_hash(parent, tokens[start : start + size], salt)
        found.append(parent)
        yield parent


class SequenceKV:
    """Block table and length of one sequence; `length` tokens of it are written.

    With prefix caching on, it also keeps the written token ids and the hashes of its full blocks, and
    registers each block with the pool as it fills, so that later sequences can share it.
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.layout = pool.layout
        self.block_table: list[int] = []
        self.length = 0
        self.tokens: list[int] = []  # written token ids (prefix caching only)
        self.hashes: list[int] = []  # hashes of its full blocks, in order (prefix caching only)
        self._slots: torch.Tensor | None = None  # [len(block_table) * block_size], rebuilt on growth
        self.contiguous = True  # its blocks follow each other in the pool: readable as one view

    @property
    def capacity(self) -> int:
        """Tokens the blocks held now can store."""
        return len(self.block_table) * self.pool.block_size

    def blocks_missing(self, tokens: int) -> int:
        """Blocks to take before the sequence can hold `tokens` tokens."""
        return max(0, self.pool.blocks_for(tokens) - len(self.block_table))

    def grow(self, tokens: int, keep_free: int = 0) -> None:
        """Take the blocks `tokens` tokens need; NoFreeBlocksError (nothing taken) if they are not free."""
        missing = self.blocks_missing(tokens)
        if missing:
            last = self.block_table[-1] if self.block_table else None
            taken = self.pool.allocator.allocate(missing, keep_free, after=last)
            first = taken[0] if last is None else last + 1
            self.contiguous = self.contiguous and taken == list(range(first, first + missing))
            self.block_table += taken
            self._slots = None

    def admit(self, tokens: list[int], keep_free: int = 0) -> list[int]:
        """Take the blocks of a sequence about to compute `tokens` (it holds none yet). Its longest
        prefix of full blocks still on the device is shared, not computed again (`length` covers it).
        Returns the hashes of the full blocks after that prefix which the host or disk tier holds, in
        order: they are to be copied back, off the engine thread (tier_load.py), into the fresh blocks
        that follow the shared ones (`load_targets`), and then counted in (`attach_loaded`). The last
        token never comes from the cache (its logits are needed). NoFreeBlocksError (nothing taken) if
        the blocks do not fit."""
        if self.block_table:
            raise ValueError("admit() is for a sequence that holds no blocks")
        salt = self.pool.salt
        if salt is None:
            self.grow(len(tokens), keep_free)
            return []
        size = self.pool.block_size
        found: list[int] = []
        hashes = _prefix_hashes(tokens, size, salt, found)
        allocator = self.pool.allocator
        table, shared = allocator.allocate_prefixed(hashes, self.pool.blocks_for(len(tokens)), keep_free)
        self.block_table, self._slots = table, None
        self.contiguous = not table or table == list(range(table[0], table[0] + len(table)))
        self.hashes = found[:shared]
        self.length = shared * size
        self.tokens = tokens[: self.length]
        tiers = self.pool.tiers
        if tiers is None:
            return []
        return list(itertools.takewhile(tiers.holds, itertools.chain(found[shared:], hashes)))

    def load_targets(self, count: int) -> list[torch.Tensor]:
        """The `count` blocks after the written ones, each `[layers, 2, kv_heads, block_size, row]` (views):
        where the blocks `admit` found in a lower tier land."""
        first = len(self.hashes)
        return [self.pool.block_data(block) for block in self.block_table[first : first + count]]

    def attach_loaded(self, tokens: list[int], contents: list[int]) -> None:
        """The blocks hashed `contents` (the leading ones `admit` returned for `tokens`) were copied into
        `load_targets`: they join the prefix cache and `length`."""
        for content in contents:
            self.pool.allocator.register(self.block_table[len(self.hashes)], content)
            self.hashes.append(content)
        self.length = len(self.hashes) * self.pool.block_size
        self.tokens = tokens[: self.length]

    def pin_prefix(self, tokens: list[int]) -> int:
        """Hold the longest prefix of full blocks of `tokens` that the device's prefix cache has (the
        last token excluded, as in `admit`), taking no fresh block; returns its length in tokens, which
        becomes `length`. A decode worker does this when a request registers: those blocks need not be
        sent, and held they cannot be evicted before the rest arrives (`grow` then takes the rest)."""
        if self.block_table:
            raise ValueError("pin_prefix() is for a sequence that holds no blocks")
        salt = self.pool.salt
        if salt is None:
            return 0
        size = self.pool.block_size
        found: list[int] = []
        table = self.pool.allocator.share(
            _prefix_hashes(tokens, size, salt, found), (len(tokens) - 1) // size
        )
        self.block_table, self._slots = table, None
        self.contiguous = not table or table == list(range(table[0], table[0] + len(table)))
        self.hashes = found[: len(table)]
        self.length = len(table) * size
        self.tokens = tokens[: self.length]
        return self.length

    def drop_unwritten(self) -> None:
        """Give back the blocks past the `length` tokens written (taken for a transfer that failed), so
        that a pinned prefix stays held for the next attempt."""
        keep = self.pool.blocks_for(self.length)
        extra, self.block_table = self.block_table[keep:], self.block_table[:keep]
        if extra:
            self._slots = None
            self.pool.allocator.release(extra)

    def advance(self, token_ids: list[int]) -> None:
        """`token_ids` were written after the first `length` tokens; full blocks join the prefix cache."""
        self.length += len(token_ids)
        salt = self.pool.salt
        if salt is None:
            return
        self.tokens += token_ids
        size = self.pool.block_size
        while len(self.hashes) < self.length // size:
            index = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.append(block_hash(parent, self.tokens[index * size : (index + 1) * size], salt))
            self.pool.allocator.register(self.block_table[index], self.hashes[-1])

    def release(self) -> None:
        """Give every block back and forget the contents; safe to call more than once. Its hashed blocks
        stay in the prefix cache until their room is needed."""
        blocks, self.block_table, self.length, self._slots = self.block_table, [], 0, None
        self.tokens, self.hashes = [], []
        self.contiguous = True
        if blocks:
            self.pool.allocator.release(blocks)

    @property
    def first_slot(self) -> int:
        """Slot of token 0; with `contiguous`, token t sits at `first_slot + t`."""
        return self.block_table[0] * self.pool.block_size

    def slots(self, begin: int, end: int) -> torch.Tensor:
        """Slot ids of token positions `begin..end-1`, `[end - begin]` (a view, no copy)."""
        if self._slots is None:
            self._slots = self.pool.slots_of(self.block_table)
        return self._slots[begin:end]

    def slot_spans(self, begin: int, end: int) -> list[tuple[int, int]]:
        """Token positions `begin..end-1` (within the blocks held) as (first slot, count) runs of
        consecutive slots: one run when the blocks are contiguous, else one per stretch of them."""
        if self.contiguous:
            return [(self.first_slot + begin, end - begin)]
        size, spans = self.pool.block_size, list[tuple[int, int]]()
        position = begin
        while position < end:
            slot = self.block_table[position // size] * size + position % size
            count = min(end, (position // size + 1) * size) - position
            if spans and spans[-1][0] + spans[-1][1] == slot:
                spans[-1] = (spans[-1][0], spans[-1][1] + count)
            else:
                spans.append((slot, count))
            position += count
        return spans

    def runs(self, layer: int, begin: int, end: int) -> list[memoryview]:
        """Bytes of token positions `begin..end-1` of `layer`, keys then values, head by head, as views of
        the pool (no copy): a KV transfer sends from them (prefill) or lands into them (decode). The
        positions need blocks held, not a length: decode lands into blocks taken before `length` is set."""
        if not 0 <= begin < end <= self.capacity:
            raise ValueError(f"tokens {begin}..{end - 1} are not in the {self.capacity} slots held")
        _, _, heads, slots, _ = self.pool.data.shape
        row = self.layout.row_nbytes  # bytes of one slot of one head
        view, spans = self.pool.byte_view, self.slot_spans(begin, end)
        out = []
        for plane in range(2 * heads):  # (key|value, head) planes of `layer`, in pool order
            base = (layer * 2 * heads + plane) * slots
            out += [view[(base + first) * row : (base + first + count) * row] for first, count in spans]
        return out

    @property
    def nbytes(self) -> int:
        return self.length * self.layout.bytes_per_token
