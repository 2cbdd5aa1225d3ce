"""Ragged attention over the paged KV pool, plugged into any transformers model.

The engine runs the Hugging Face model on a *packed* batch: the new tokens of every sequence in
the step (a prompt chunk, or one token per decoding stream) laid end to end as `[1, N]`, each with its
own position id. transformers calls the attention function registered here with the new tokens'
keys and values (after RoPE); we scatter them into their slots of the pool (one `index_copy_` per
layer), gather the cached context of every sequence that has one (one `index_select` per layer),
and attend each segment to its own context. No padding, so one 4k-token sequence does not slow the
attention of its short neighbours. Decode rows use two small bmm's per sequence (on CPU that beats
one padded SDPA over the batch by about 3x). The step's index tensors are built once per step
(`PackedBatch`), not per layer. The cache travels through the forward's kwargs, as in transformers'
own paged attention and vLLM's transformers backend.

With int8 KV (kv_quant.py) the new keys and values are quantized as they are scattered, and every
context read from the pool is dequantized into the model dtype right here, before the attention
math. A chunk attends to its own new keys *as stored* (quantized and back), so a token's output does
not depend on whether its context came from the same chunk, an earlier chunk, the prefix cache or
another worker: int8 output is the same whatever the chunking, the cache hits or the handoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from splitserve.engine.kv_cache import KVPool, SequenceKV
from splitserve.engine.kv_quant import dequantize, quantize

ATTENTION_NAME = "splitserve_ragged"
BATCH_KWARG = "splitserve_batch"


@dataclass(frozen=True)
class Segment:
    """`length` new tokens of one sequence, at positions `start .. start+length-1`."""

    kv: SequenceKV
    start: int
    length: int


class PackedBatch:
    """The sequences of one forward pass, in packing order, and the pool indices they use.

    Every sequence must already hold the blocks for its new tokens (`SequenceKV.grow`).
    """

    def __init__(self, pool: KVPool, segments: list[Segment]) -> None:
        self.pool = pool
        self.segments = segments
        self.lengths = [segment.length for segment in segments]
        self.num_tokens = sum(self.lengths)
        # Where each new token is written: `[N]` slot ids in packing order.
        writes = [s.kv.slots(s.start, s.start + s.length) for s in segments]
        self.write_slots = writes[0] if len(writes) == 1 else torch.cat(writes)
        # Segments with earlier tokens read their context back from the pool: in place when their
        # blocks are contiguous, else gathered whole blocks at a time into one buffer per layer. A
        # chunk that starts a sequence attends to its own new keys. An int8 pool gathers every context,
        # so that each layer dequantizes one buffer instead of one slice per sequence (on CPU, 16
        # decode streams' contexts dequantize about 4x faster as one buffer than one by one).
        self.gathered_offsets: dict[int, int] = {}  # segment index -> its first token in the buffer
        read_blocks: list[int] = []
        for index, segment in enumerate(segments):
            if segment.start > 0 and (pool.layout.quantized or not segment.kv.contiguous):
                self.gathered_offsets[index] = len(read_blocks) * pool.block_size
                read_blocks += segment.kv.block_table[: pool.blocks_for(segment.start + segment.length)]
        self.read_blocks = (  # [blocks to gather] block ids
            torch.tensor(read_blocks, dtype=torch.long).to(pool.device) if read_blocks else None
        )

    def position_ids(self, device: torch.device) -> torch.Tensor:
        positions = [p for s in self.segments for p in range(s.start, s.start + s.length)]
        return torch.tensor(positions, device=device).unsqueeze(0)  # [1, N]

    def last_token_indices(self, device: torch.device) -> torch.Tensor:
        """Index of each segment's last token in the packed batch: where logits are needed."""
        ends = torch.tensor(self.lengths).cumsum(0) - 1
        return ends.to(device)

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """query `[Hq, N, D]`, key/value `[H, N, D]` of the new tokens -> output `[N, Hq, D]`."""
        pool_keys, pool_values = self.pool.keys[layer], self.pool.values[layer]  # each [H, slots, row]
        if self.pool.layout.quantized:
            key_rows, value_rows = quantize(key), quantize(value)  # each [H, N, D + 2] int8
            key, value = dequantize(key_rows, key.dtype), dequantize(value_rows, value.dtype)
        else:
            key_rows, value_rows = key, value
        pool_keys.index_copy_(1, self.write_slots, key_rows)
        pool_values.index_copy_(1, self.write_slots, value_rows)
        gathered_keys = gathered_values = None  # each [H, gathered blocks * block_size, D]
        if self.read_blocks is not None:
            gathered_keys = self._read(self._gather(pool_keys, self.read_blocks), key.dtype)
            gathered_values = self._read(self._gather(pool_values, self.read_blocks), value.dtype)
        heads, _, head_dim = query.shape
        kv_heads = key.shape[0]
        out = query.new_empty(self.num_tokens, heads, head_dim)  # [N, Hq, D]
        # Decode rows: queries pre-scaled once for the whole batch, grouped per KV head (GQA).
        grouped = (
            (query * scale).transpose(0, 1).reshape(self.num_tokens, kv_heads, heads // kv_heads, head_dim)
        )
        grouped_out = out.view(self.num_tokens, kv_heads, heads // kv_heads, head_dim)  # [N, H, G, D]
        offset = 0
        for index, segment in enumerate(self.segments):
            end = segment.start + segment.length
            begin = max(0, segment.start + 1 - window) if window else 0  # the first query's window
            gathered = self.gathered_offsets.get(index)
            if segment.start == 0:  # the chunk is the whole context
                keys = key[:, offset + begin : offset + end]  # [H, T, D]
                values = value[:, offset + begin : offset + end]
            elif gathered is None or gathered_keys is None or gathered_values is None:
                first = segment.kv.first_slot
                keys = pool_keys[:, first + begin : first + end]  # [H, T, D], a view of its blocks
                values = pool_values[:, first + begin : first + end]
            else:
                keys = gathered_keys[:, gathered + begin : gathered + end]  # [H, T, D]
                values = gathered_values[:, gathered + begin : gathered + end]
            q = query[:, offset : offset + segment.length]  # [Hq, n, D]
            if segment.length == 1:
                _decode_attention(grouped[offset], keys, values, grouped_out[offset])
            else:
                mask = _causal_mask(segment.start, segment.length, begin, end, window, q.device)
                attended = F.scaled_dot_product_attention(
                    q.unsqueeze(0),
                    keys.unsqueeze(0),
                    values.unsqueeze(0),
                    attn_mask=mask,
                    scale=scale,
                    enable_gqa=True,
                )  # [1, Hq, n, D]
                out[offset : offset + segment.length] = attended[0].transpose(0, 1)
            offset += segment.length
        return out

    def _gather(self, pool_layer: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """`[H, slots, row]` pool layer -> `[H, len(blocks) * block_size, row]`, whole blocks per copy."""
        heads, _, row = pool_layer.shape
        by_block = pool_layer.view(heads, self.pool.num_blocks, -1)  # [H, num_blocks, block_size * row]
        return by_block.index_select(1, blocks).view(heads, -1, row)

    def _read(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gathered context `[H, T, row]` -> keys or values `[H, T, D]` to attend to (as it is when the
        pool holds the model dtype; dequantized when it holds int8 rows)."""
        return dequantize(rows, dtype) if self.pool.layout.quantized else rows


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    """One scaled query token against its cache with two small bmm's (cheaper than SDPA at this size).

    q `[H, G, D]` (G query heads per KV head), keys/values `[H, T, D]`, written into out `[H, G, D]`.
    """
    scores = torch.bmm(q, keys.transpose(1, 2))  # [H, G, T]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if weights.dtype != q.dtype:
        weights = weights.to(q.dtype)
    torch.bmm(weights, values, out=out)


def _causal_mask(
    start: int, length: int, begin: int, end: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean `[n, T]` mask for a prompt chunk at `start` attending to cached keys `begin..end-1`."""
    if start == 0 and begin == 0 and not window:
        return torch.ones(length, end, dtype=torch.bool, device=device).tril()
    query_pos = torch.arange(start, start + length, device=device)[:, None]
    key_pos = torch.arange(begin, end, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window:
        allowed &= key_pos > query_pos - window
    return allowed


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: `[1, Hq, N, D]` in, `[1, N, Hq, D]` out."""
    batch = kwargs.get(BATCH_KWARG)
    if not isinstance(batch, PackedBatch):
        raise RuntimeError(f"{ATTENTION_NAME} attention needs a PackedBatch in `{BATCH_KWARG}`")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # Mistral passes the window as a kwarg, Qwen2/Gemma-style layers carry it as an attribute.
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    layer: int = module.layer_idx  # type: ignore[assignment]
    output = batch.attend(layer, query[0], key[0], value[0], scale, window)
    return output.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, ragged_attention)
