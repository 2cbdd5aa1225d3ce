"""KV caches of the transfer suites: real paged pools on both ends (the sender's filled, the receiver's
blocks taken as the decode worker takes them), contiguous or scattered, and how to compare them."""

from __future__ import annotations

import torch

from splitserve.engine.kv_cache import KVLayout, KVPool, SequenceKV
from splitserve.transfer.frames import FRAME_BYTES, KVHeader

CPU = torch.device("cpu")


def layout_of(header: KVHeader) -> KVLayout:
    return KVLayout(header.num_layers, header.num_kv_heads, header.head_dim, header.dtype)


def sequence(layout: KVLayout, tokens: int, block_size: int, fragmented: bool = False) -> SequenceKV:
    """A sequence holding blocks for `tokens` in a pool of its own (nothing else in it); `fragmented`:
    its blocks out of order and apart (every other block of the pool, taken back to front)."""
    blocks = -(-tokens // block_size)
    pool = KVPool(layout, 2 * blocks + 1, block_size, CPU)
    kv = pool.sequence()
    if fragmented:
        every = pool.allocator.allocate(pool.num_blocks)
        pool.allocator.release(every[1::2][::-1])
    kv.grow(tokens)
    assert kv.contiguous != fragmented or blocks == 1
    if fragmented:
        pool.allocator.release(every[0::2])
    return kv


def filled(
    layout: KVLayout, tokens: int, block_size: int, seed: int = 0, fragmented: bool = False
) -> SequenceKV:
    """A sender's cache of `tokens` tokens: random values in every slot of its pool."""
    kv = sequence(layout, tokens, block_size, fragmented)
    generator = torch.Generator().manual_seed(seed)
    kv.pool.data.copy_(torch.randn(kv.pool.data.shape, generator=generator).to(layout.dtype))
    kv.length = tokens
    return kv


def header_for(
    request_id: str, kv: SequenceKV, first_token: int = 11, frame_bytes: int = FRAME_BYTES
) -> KVHeader:
    """What the prefill worker sends for `kv`."""
    layout = kv.layout
    shape = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype)
    return KVHeader.for_blocks(request_id, first_token, kv.length, shape, kv.pool.block_size, frame_bytes)


def wire_bytes(kv: SequenceKV, tokens: int) -> list[bytes]:
    """Each layer's first `tokens` tokens in wire order, whatever the blocks: equal means same values."""
    return [b"".join(kv.runs(layer, 0, tokens)) for layer in range(kv.layout.num_layers)]
