"""The explicit KV cache: one preallocated tensor per sequence, and the budget that bounds them.

Each sequence owns `[layers, 2, kv_heads, capacity, head_dim]` sized for its whole life
(prompt + max_tokens), so a running sequence never allocates and never runs out: admission is the
only place memory can be refused. Size per token follows the seeds' formula
2 × layers × kv_heads × head_dim × bytes.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of the model's KV cache, read from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """2 (keys and values) × layers × kv_heads × head_dim × bytes per element."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class SequenceKV:
    """Keys and values of one sequence; `length` tokens of it are written."""

    def __init__(self, layout: KVLayout, capacity: int, device: torch.device) -> None:
        self.layout = layout
        self.capacity = capacity
        self.length = 0
        self.data = torch.empty(  # [L, 2, H, T, D]
            layout.num_layers,
            2,
            layout.num_kv_heads,
            capacity,
            layout.head_dim,
            dtype=layout.dtype,
            device=device,
        )
        # Views built once: the attention loop indexes these every step of every layer.
        self.keys = [self.data[layer, 0] for layer in range(layout.num_layers)]  # each [H, T, D]
        self.values = [self.data[layer, 1] for layer in range(layout.num_layers)]  # each [H, T, D]

    def layer(self, index: int) -> torch.Tensor:
        """Written part of one layer, `[2, H, length, D]`: what travels to a decode worker."""
        return self.data[index, :, :, : self.length]

    def load_layer(self, index: int, kv: torch.Tensor) -> None:
        """Write a received `[2, H, T, D]` layer; `length` is set once every layer is in."""
        self.data[index, :, :, : kv.shape[2]].copy_(kv)

    @property
    def nbytes(self) -> int:
        return self.length * self.layout.bytes_per_token


class KVBudget:
    """Token-granular admission for the KV cache, first come first served.

    Lives on the asyncio loop: requests await `reserve()`; the engine thread reports finished
    sequences back to the loop, which calls `release()`. FIFO, so a long prompt is not starved by
    a stream of short ones.
    """

    def __init__(self, capacity_tokens: int, max_sequences: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.max_sequences = max_sequences
        self.reserved_tokens = 0
        self.sequences = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def usage(self) -> float:
        return self.reserved_tokens / self.capacity_tokens if self.capacity_tokens else 1.0

    def fits_ever(self, tokens: int) -> bool:
        return tokens <= self.capacity_tokens

    async def reserve(self, tokens: int) -> None:
        """Wait until `tokens` fit; cancellation while waiting leaves the budget untouched."""
        if not self.fits_ever(tokens):
            raise ValueError(f"{tokens} tokens exceed the KV budget of {self.capacity_tokens}")
        if not self._waiters and self._fits(tokens):
            self._take(tokens)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (tokens, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif future.done() and not future.cancelled():
                self.release(tokens)  # granted and cancelled in the same tick: give it back
            raise

    def release(self, tokens: int) -> None:
        self.reserved_tokens -= tokens
        self.sequences -= 1
        while self._waiters and self._fits(self._waiters[0][0]):
            tokens_next, future = self._waiters.popleft()
            if not future.done():
                self._take(tokens_next)
                future.set_result(None)

    def _fits(self, tokens: int) -> bool:
        return self.reserved_tokens + tokens <= self.capacity_tokens and self.sequences < self.max_sequences

    def _take(self, tokens: int) -> None:
        self.reserved_tokens += tokens
        self.sequences += 1
