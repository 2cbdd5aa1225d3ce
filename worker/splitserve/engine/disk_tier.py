"""The disk tier: KV blocks as files in a directory (node-local NVMe, an emptyDir, or a pool's PVC).

One file per block, named by its hash: raw tensor bytes behind a small checked header. Written to a
temporary name and renamed, so a reader sees a whole file or none. Reading checks everything it can
(magic, version, the hash it was asked for, the model salt, dtype, shape, length, CRC of header and of
payload): a missing, truncated, corrupted or foreign file is a miss with a reason, counted by the
caller, never an exception and never wrong KV. Nothing is unpickled: the payload is raw bytes.

Header, little-endian: magic `SSKB` (4), version u16, dtype code u8, ndim u8, block hash u64, salt (8),
payload bytes u64, payload CRC-32 u32, shape (ndim x u32), header CRC-32 u32.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Literal

import torch

from splitserve.engine.tiers import Clock, LRUTier, Released

MAGIC = b"SSKB"
VERSION = 1
SUFFIX = ".kvb"
_FIXED = struct.Struct("<4sHBBQ8sQI")
_U32 = struct.Struct("<I")
MAX_DIMS = 8
# Element types a block may hold; the codes are part of the file format.
DTYPES: dict[int, torch.dtype] = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16, 4: torch.int8}
_CODES = {dtype: code for code, dtype in DTYPES.items()}

MissReason = Literal["missing", "truncated", "corrupt", "foreign", "io_error"]


@dataclass(frozen=True)
class Miss:
    """Why a block could not be read back; the caller counts it and recomputes."""

    reason: MissReason
    detail: str


def encode(key: int, salt: bytes, block: torch.Tensor) -> bytes:
    """A block's file: header + raw bytes (CPU tensor, any dtype in DTYPES)."""
    if block.dtype not in _CODES or block.dim() > MAX_DIMS:
        raise ValueError(f"cannot store a {block.dtype} block of {block.dim()} dims")
    payload = block.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    fixed = _FIXED.pack(
        MAGIC, VERSION, _CODES[block.dtype], block.dim(), key, salt, len(payload), zlib.crc32(payload)
    )
    head = fixed + b"".join(_U32.pack(size) for size in block.shape)
    return head + _U32.pack(zlib.crc32(head)) + payload


def decode(data: bytes, key: int, salt: bytes) -> torch.Tensor | Miss:
    """The block in `data`, or why it is not the block `key` of this model."""
    if len(data) < _FIXED.size:
        return Miss("truncated", f"{len(data)} bytes, shorter than a header")
    magic, version, code, ndim, stored_key, stored_salt, length, payload_crc = _FIXED.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        return Miss("foreign", f"not a splitserve KV block file (magic {magic!r}, version {version})")
    if ndim > MAX_DIMS:
        return Miss("corrupt", f"{ndim} dims")
    head_end = _FIXED.size + ndim * _U32.size
    if len(data) < head_end + _U32.size:
        return Miss("truncated", "header cut short")
    (head_crc,) = _U32.unpack_from(data, head_end)
    if zlib.crc32(data[:head_end]) != head_crc:
        return Miss("corrupt", "header checksum mismatch")
    if stored_salt != salt:
        return Miss("foreign", "written for another model, revision or KV dtype")
    if stored_key != key or code not in DTYPES:
        return Miss("corrupt", f"holds block {stored_key:016x} with dtype code {code}")
    shape = [_U32.unpack_from(data, _FIXED.size + i * _U32.size)[0] for i in range(ndim)]
    dtype = DTYPES[code]
    if prod(shape) * dtype.itemsize != length:
        return Miss("corrupt", f"shape {shape} does not match {length} payload bytes")
    payload = data[head_end + _U32.size :]
    if len(payload) != length:
        return Miss("truncated", f"{len(payload)} of {length} payload bytes")
    if zlib.crc32(payload) != payload_crc:
        return Miss("corrupt", "payload checksum mismatch")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)


class DiskTier:
    """Block files under `directory`, LRU within `capacity_bytes` and `ttl_seconds` of last use.

    Files already there (a restarted worker, or a PVC the pool shares) are adopted at start, oldest
    modification first. The index is locked, the files are read and written outside the lock: a loader
    thread reading a block back (tier_load.py) holds up no eviction storing one. `read` reads a file
    (a test makes it slow).
    """

    def __init__(
        self,
        directory: Path,
        salt: bytes,
        capacity_bytes: int,
        ttl_seconds: float | None,
        clock: Clock,
        on_error: Callable[[MissReason | Literal["write_error"]], None] = lambda _: None,
        read: Callable[[Path], bytes] = Path.read_bytes,
    ) -> None:
        self.directory = directory
        self.salt = salt
        self.on_error = on_error
        self.read = read
        self.index: LRUTier[None] = LRUTier(capacity_bytes, ttl_seconds, clock)
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        found = []
        for path in directory.glob(f"*{SUFFIX}"):
            try:
                found.append((path.stat().st_mtime, int(path.stem, 16), path.stat().st_size))
            except (OSError, ValueError):
                continue  # vanished meanwhile, or not one of ours
        for _, key, size in sorted(found):
            self._drop(self.index.put(key, None, size))

    def path(self, key: int) -> Path:
        return self.directory / f"{key:016x}{SUFFIX}"

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self.index

    def store(self, key: int, block: torch.Tensor) -> bool:
        """Write one block (atomically); False when the disk refused (counted as `write_error`)."""
        data = encode(key, self.salt, block)
        target = self.path(key)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(data)
            temporary.replace(target)
        except OSError:
            _remove(temporary)
            self.on_error("write_error")
            return False
        with self._lock:
            self._drop(self.index.put(key, None, len(data)))
            return key in self.index

    def load(self, key: int) -> torch.Tensor | Miss:
        """The block, or why not (every reason but `missing` is also reported to `on_error`)."""
        with self._lock:
            self._drop(self.index.expire())
            if key not in self.index:
                return Miss("missing", "not in this tier")
            self.index.get(key)  # a hit counts as a use
        try:
            data = self.read(self.path(key))
        except FileNotFoundError:
            result: torch.Tensor | Miss = Miss("missing", "file removed behind our back")
        except OSError as error:
            result = Miss("io_error", str(error))
        else:
            result = decode(data, key, self.salt)
        if isinstance(result, Miss):
            with self._lock:
                self.index.pop(key)
                _remove(self.path(key))
            if result.reason != "missing":
                self.on_error(result.reason)
        return result

    def _drop(self, released: list[Released[None]]) -> None:
        for item in released:
            _remove(self.path(item.key))


def _remove(path: Path) -> None:
    """Delete a block file if it can be; a volume that refuses has already been counted, or will be."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
