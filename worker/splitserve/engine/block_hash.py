"""Content addresses of full KV blocks: the key every prefix-cache tier and the router's index share.

A block's hash covers its parent's hash, its own token ids and a salt naming the model, its revision
and the KV dtype, so equal hashes mean equal keys and values (the same tokens after the same prefix,
through the same weights, stored the same way) and a cache can never hand one model another's KV.
Only full blocks are hashed: a partial last block is still being written.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_TOKEN = struct.Struct("<I")
_PARENT = struct.Struct("<Q")


def cache_salt(model: str, revision: str | None, kv_dtype: str) -> bytes:
    """What must match for two workers' blocks to be interchangeable (8 bytes)."""
    text = "\0".join((model, revision or "", kv_dtype))
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def block_hash(parent: int | None, tokens: Sequence[int], salt: bytes) -> int:
    """A 64-bit address of one full block after `parent` (None for the first block)."""
    digest = hashlib.blake2b(salt, digest_size=8)
    digest.update(_PARENT.pack(parent if parent is not None else 0))
    digest.update(b"\1" if parent is not None else b"\0")
    for token in tokens:
        digest.update(_TOKEN.pack(token))
    return int.from_bytes(digest.digest(), "little")


def block_hashes(tokens: Sequence[int], block_size: int, salt: bytes) -> list[int]:
    """The chained hashes of every full block of `tokens`, in order."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size], salt)
        hashes.append(parent)
    return hashes
