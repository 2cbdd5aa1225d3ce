"""int8 KV: symmetric quantization with one scale per token, head and K/V, kept inline with the values.

What an int8 pool stores for one token of one head (a *row*) is `head_dim` int8 values followed by
their scale as a bfloat16 (2 bytes, little-endian): `x ≈ q * scale`, `q = round(x / scale)` in
-127..127, `scale = max|x| / 127` rounded *up* to bfloat16, so no value clips and the error of every
element is at most `scale / 2`.

Why a scale per token and head rather than per block (what the issue first asked for): the pool is
written one token at a time while a sequence decodes, and a block's scale fixed at its first token
would clip every later outlier, or force requantizing the block's earlier tokens (a second rounding
of values already rounded, and a data-dependent rewrite on the decode path). A row that carries its
own scale is also self-contained bytes: a KV transfer moves token runs between pools of different
block sizes, and the host and disk tiers copy whole blocks, all without knowing that the bytes are
quantized. The price is 2 bytes per row: `head_dim + 2` bytes instead of `2 * head_dim` (bf16) or
`4 * head_dim` (fp32), i.e. 0.52x bf16 and 0.26x fp32 at head_dim 64, 0.51x and 0.25x at 128.

Why bfloat16 for the scale: it has float32's exponent range (any finite max|x| has a finite, non-zero
scale: no overflow to inf as float16 would at 65504 * 127) and rounding it up keeps the bound above;
it is read back as a bfloat16 in place where 2-byte aligned, else by bit shifts (an odd head_dim).
"""

from __future__ import annotations

import sys

import torch

SCALE_BYTES = 2  # the bfloat16 scale after each row's values
QMAX = 127  # symmetric: -127..127 (never -128, so that negation is exact)
_TINY = torch.finfo(torch.float32).tiny  # the scale of an all-zero row (any positive value would do)
_LITTLE_ENDIAN = sys.byteorder == "little"  # the scale's bytes are stored low byte first


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a KV storage dtype is int8 rows (values + scale) rather than plain model-dtype values."""
    return dtype == torch.int8


def salt_name(kv_dtype: torch.dtype, model_dtype: torch.dtype) -> str:
    """The KV dtype as the prefix cache's salt names it (block_hash.cache_salt): int8 blocks never match
    float ones, nor int8 blocks quantized from another model dtype's keys (not the same bytes)."""
    return f"{kv_dtype} of {model_dtype}" if is_quantized(kv_dtype) else str(kv_dtype)


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one stored row (one token of one head): `head_dim`, plus the scale's bytes for int8."""
    return head_dim + SCALE_BYTES if is_quantized(dtype) else head_dim


def row_nbytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one stored row: what KV transfers, tiers and budgets count per token and head."""
    return row_width(head_dim, dtype) * dtype.itemsize


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float `[..., D]` -> int8 rows `[..., D + 2]` (values, then the row's bfloat16 scale)."""
    x = x.float()
    absmax = x.abs().amax(dim=-1)  # [...]
    scale = _round_up_to_bfloat16((absmax / QMAX).clamp_min(_TINY))  # [...] float32, bfloat16-exact
    values = torch.round(x / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)  # [..., D]
    bits = scale.view(torch.int32) >> 16  # the bfloat16's 16 bits (exact: the low half is zero)
    low = (bits & 0xFF).to(torch.int8)  # int8 wraps 128..255 to negatives: the same bytes
    high = ((bits >> 8) & 0xFF).to(torch.int8)
    return torch.cat((values, low.unsqueeze(-1), high.unsqueeze(-1)), dim=-1)


def scales(rows: torch.Tensor) -> torch.Tensor:
    """The float32 scale of each int8 row `[..., D + 2]` -> `[...]`: the two bytes read as a bfloat16
    in place where they are 2-byte aligned (an even head_dim: 3-5x faster), else assembled bit by bit."""
    tail = rows[..., -SCALE_BYTES:]
    if (
        _LITTLE_ENDIAN
        and tail.storage_offset() % 2 == 0
        and all(step % 2 == 0 for step in tail.stride()[:-1])
    ):
        return tail.view(torch.bfloat16).squeeze(-1).to(torch.float32)
    low = rows[..., -2].to(torch.int32) & 0xFF
    high = rows[..., -1].to(torch.int32) & 0xFF
    return ((high << 24) | (low << 16)).view(torch.float32)


def dequantize(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows `[..., D + 2]` -> values `[..., D]` in `dtype` (what attention computes in)."""
    values = rows[..., :-SCALE_BYTES].to(torch.float32)  # a fresh tensor: scaled in place, since a
    # second buffer of this size costs page faults on every call (10x the time of the multiply on CPU)
    return values.mul_(scales(rows).unsqueeze(-1)).to(dtype)


def _round_up_to_bfloat16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= each positive finite float32 (as float32): one more unit in the last
    bfloat16 place when the dropped low 16 bits are not all zero."""
    bits = scale.view(torch.int32)
    truncated = bits & ~0xFFFF
    bumped = torch.where(bits != truncated, truncated + 0x10000, truncated)
    return bumped.view(torch.float32)
