"""Wire format of one KV cache transfer (version 3): header and KV blocks <-> bytes, validated, without I/O.

Raw bytes behind fixed-size little-endian struct headers, so that nothing a peer sends is ever executed
or unpickled (no pickle, no torch.load, no object arrays). Every frame is a 24-byte prefix and `length`
payload bytes, with the CRC-32 of its own payload:

    magic b"SSKV" | version u8 | type u8 | flags u16 (0) | index u32 | crc32 u32 | length u64

A transfer, sender -> receiver: BEGIN (the KVHeader), BLOCKS 0..F-1, END. The receiver answers BEGIN
with ACCEPT or ERROR and END with OK or ERROR (ERROR may also come at any point in between). A BLOCKS
frame carries `blocks_per_frame` consecutive blocks (of the sender's `block_size` tokens) of one layer,
layer by layer: its payload is those tokens' keys then values, head by head, token by token, i.e. a
`[2, H_kv, n, D]` tensor (with int8 KV each row of D values is followed by its 2-byte scale, as the pool
stores it: engine/kv_quant.py). Both ends address it through `BlockRuns`: the sender sends from its
pool's blocks and the receiver lands straight into its own (no copy of the cache on either side), and a
receiver whose blocks are another size places the same tokens in its own slots. Every length is checked
against the frame type, the header and the receiver's limits before a byte of payload is read.

A transfer may start past the prompt's first token (`KVHeader.first_position`): the decode worker
already holds the leading blocks (its prefix cache), so only tokens `first_position..num_tokens-1` move;
frames address absolute token positions, so both ends index their own blocks as usual.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import torch

from splitserve.engine.blocks import blocks_for
from splitserve.engine.kv_quant import row_nbytes

MAGIC = b"SSKV"
VERSION = 3  # 1 carried whole layers, 2 always the whole prompt; both ends run the same release
PREFIX = struct.Struct("<4sBBHIIQ")  # magic, version, type, flags, index, crc32, length
# request id length, dtype, (pad), num_layers, first_token, num_tokens, kv heads, head dim, block size,
# blocks per frame, first position
HEADER = struct.Struct("<HBxIIQIIIIQ")
_ERROR = struct.Struct("<H")  # error code; the utf-8 reason follows

MAX_REQUEST_ID_BYTES = 128
MAX_HEADER_BYTES = HEADER.size + MAX_REQUEST_ID_BYTES
MAX_REASON_BYTES = 1024
CHUNK_BYTES = 1 << 20  # payload is read (and checksummed) in pieces at most this big: short loop steps
FRAME_BYTES = 4 << 20  # what a sender aims a BLOCKS frame at: each frame costs a round of the event loop
# (16 MB in one process: 38 ms in 256 KiB frames, 24 ms in 1 MiB, 20 ms in 4 MiB)

# zlib-ng computes the very same CRC-32 as zlib, vectorised: 4-6x faster (bench/results/kv_transfer.json).
try:
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # optional: peers with and without it interoperate
    from zlib import crc32 as _crc32
checksum = _crc32
# The checksum of block payloads, the bulk of the bytes: its own name, so the bench can measure its cost.
block_checksum = checksum


class FrameType(IntEnum):
    BEGIN = 1
    BLOCKS = 2
    END = 3
    ACCEPT = 4  # receiver: the sink took blocks for the cache, send them
    OK = 5  # receiver: every frame arrived intact and the sequence was committed
    ERROR = 6  # receiver: the transfer failed; payload = code + reason


class ErrorCode(IntEnum):
    """Why a transfer failed; on the wire in ERROR frames, and on KVTransferError for the caller."""

    PROTOCOL = 1  # malformed or unexpected frame (a peer of another version included)
    CHECKSUM = 2  # a frame's bytes do not match its crc32
    LIMIT = 3  # bigger than the receiver accepts
    REJECTED = 4  # the sink refused the request (unknown id, no room, ...)
    TIMEOUT = 5  # the peer went quiet
    INTERNAL = 6  # the destination failed
    SHUTDOWN = 7  # the receiver is closing
    UNAVAILABLE = 8  # sender side only: no connection, or it broke without a reply


class KVProtocolError(ValueError):
    """Bytes that are not a valid frame (or a header that cannot be sent); fails one transfer only."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


_DTYPES: dict[int, torch.dtype] = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16, 4: torch.int8}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def require(condition: bool, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
    if not condition:
        raise KVProtocolError(message, code)


def _is_u32(value: object, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**32


class BlockRuns(Protocol):
    """A sequence's KV cache as the wire sees it; implemented over the paged pool (`SequenceKV.runs`)."""

    def runs(self, layer: int, begin: int, end: int) -> list[memoryview]:
        """The bytes of tokens `begin..end-1` of `layer` in wire order (keys then values, head by head,
        token by token), as views of the cache's own memory: what is sent from, or landed into."""
        ...


@dataclass(frozen=True)
class KVHeader:
    """What one transfer carries: sent first, so the receiver can check and take blocks before any data."""

    request_id: str
    first_token: int  # the token prefill sampled
    num_tokens: int  # T, the prompt length
    num_layers: int
    dtype: torch.dtype
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block on the wire: the sender's; the receiver's may differ
    blocks_per_frame: int  # blocks of one layer per BLOCKS frame
    first_position: int = 0  # first token sent; the receiver holds 0..first_position-1 already

    def __post_init__(self) -> None:
        rid = self.request_id.encode("utf-8") if isinstance(self.request_id, str) else b""
        require(
            0 < len(rid) <= MAX_REQUEST_ID_BYTES,
            f"request id must be 1..{MAX_REQUEST_ID_BYTES} bytes of utf-8",
        )
        require(_is_u32(self.first_token, 0), f"first token {self.first_token!r} is not a u32")
        require(
            isinstance(self.num_tokens, int) and 0 < self.num_tokens < 2**63,
            f"num_tokens {self.num_tokens!r} is not positive",
        )
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "blocks_per_frame"):
            require(_is_u32(getattr(self, name)), f"{name} {getattr(self, name)!r} is not a positive u32")
        require(
            isinstance(self.first_position, int) and 0 <= self.first_position < self.num_tokens,
            f"first position {self.first_position!r} is not within the {self.num_tokens} tokens",
        )
        require(
            self.dtype in _DTYPE_CODES, f"dtype {self.dtype} is not one of float32, bfloat16, float16, int8"
        )
        require(self.num_frames < 2**32, f"{self.num_frames} frames do not fit a u32 frame index")

    @classmethod
    def for_blocks(
        cls,
        request_id: str,
        first_token: int,
        num_tokens: int,
        shape: tuple[int, int, int, torch.dtype],
        block_size: int,
        frame_bytes: int = FRAME_BYTES,
        first_position: int = 0,
    ) -> KVHeader:
        """The header for sending tokens `first_position..num_tokens-1` of a cache of `shape` = (layers,
        kv heads, head dim, dtype) from blocks of `block_size`, with frames of about `frame_bytes` (at
        least one block each)."""
        layers, heads, head_dim, dtype = shape
        block_bytes = 2 * heads * block_size * row_nbytes(head_dim, dtype)
        sent = blocks_for(num_tokens - first_position, block_size)
        per_frame = max(1, min(frame_bytes // max(1, block_bytes), sent))
        return cls(
            request_id,
            first_token,
            num_tokens,
            layers,
            dtype,
            heads,
            head_dim,
            block_size,
            per_frame,
            first_position,
        )

    @property
    def sent_tokens(self) -> int:
        """Tokens whose KV is on the wire: those the receiver does not hold yet."""
        return self.num_tokens - self.first_position

    @property
    def token_nbytes(self) -> int:
        """Bytes of one token of one layer: keys and values of every KV head."""
        return 2 * self.num_kv_heads * row_nbytes(self.head_dim, self.dtype)

    @property
    def frame_tokens(self) -> int:
        return self.blocks_per_frame * self.block_size

    @property
    def frames_per_layer(self) -> int:
        return blocks_for(self.sent_tokens, self.frame_tokens)

    @property
    def num_frames(self) -> int:
        return self.num_layers * self.frames_per_layer

    @property
    def max_frame_nbytes(self) -> int:
        return min(self.frame_tokens, self.sent_tokens) * self.token_nbytes

    @property
    def total_nbytes(self) -> int:
        return self.sent_tokens * self.token_nbytes * self.num_layers

    def frame(self, index: int) -> tuple[int, int, int]:
        """(layer, first token, end token) of BLOCKS frame `index`, as positions in the prompt."""
        layer, part = divmod(index, self.frames_per_layer)
        begin = self.first_position + part * self.frame_tokens
        return layer, begin, min(self.num_tokens, begin + self.frame_tokens)

    def frames(self) -> Iterator[tuple[int, int, int]]:
        return (self.frame(index) for index in range(self.num_frames))


@dataclass(frozen=True)
class KVLimits:
    """What a receiver accepts; checked on the header, before it takes blocks or reads a frame."""

    max_transfer_bytes: int = 8 << 30  # the decode worker passes its `max_transfer_bytes`
    max_frame_bytes: int = 256 << 20  # one BLOCKS frame's payload
    max_layers: int = 1024

    def check(self, header: KVHeader) -> None:
        limit = ErrorCode.LIMIT
        require(
            header.num_layers <= self.max_layers,
            f"{header.num_layers} layers exceed the limit of {self.max_layers}",
            limit,
        )
        require(
            header.max_frame_nbytes <= self.max_frame_bytes,
            f"a frame of {header.max_frame_nbytes} bytes exceeds the limit of {self.max_frame_bytes}",
            limit,
        )
        require(
            header.total_nbytes <= self.max_transfer_bytes,
            f"{header.total_nbytes} bytes exceed the transfer limit of {self.max_transfer_bytes}",
            limit,
        )


@dataclass(frozen=True)
class FramePrefix:
    type: FrameType
    index: int
    crc: int
    length: int


def encode_frame(kind: FrameType, payload: bytes = b"", index: int = 0) -> bytes:
    """A whole small frame (everything but BLOCKS, whose payload is sent from the blocks in place)."""
    return PREFIX.pack(MAGIC, VERSION, kind, 0, index, checksum(payload), len(payload)) + payload


def encode_blocks_prefix(index: int, nbytes: int, crc: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, FrameType.BLOCKS, 0, index, crc, nbytes)


def runs_checksum(runs: list[memoryview]) -> int:
    """CRC-32 of the concatenation of `runs` (a frame's payload) without concatenating them."""
    crc = 0
    for run in runs:
        crc = block_checksum(run, crc)
    return crc


def decode_prefix(data: bytes | bytearray | memoryview) -> FramePrefix:
    require(len(data) == PREFIX.size, f"frame prefix must be {PREFIX.size} bytes, got {len(data)}")
    magic, version, kind, flags, index, crc, length = PREFIX.unpack(data)
    require(magic == MAGIC, f"bad magic {bytes(magic)!r}")
    require(
        version == VERSION,
        f"KV frame version {version}, this side speaks {VERSION}: both ends of a transfer must run "
        "the same splitserve release",
    )
    require(kind in FrameType._value2member_map_, f"unknown frame type {kind}")
    require(flags == 0, f"unknown frame flags {flags:#x}")
    require(kind == FrameType.BLOCKS or index == 0, f"{FrameType(kind).name} frame with index {index}")
    return FramePrefix(FrameType(kind), index, crc, length)


def check_payload(prefix: FramePrefix, payload: bytes | bytearray | memoryview) -> None:
    require(
        checksum(payload) == prefix.crc, f"{prefix.type.name} frame checksum mismatch", ErrorCode.CHECKSUM
    )


def encode_header(header: KVHeader) -> bytes:
    """The BEGIN frame."""
    rid = header.request_id.encode("utf-8")
    fixed = HEADER.pack(
        len(rid),
        _DTYPE_CODES[header.dtype],
        header.num_layers,
        header.first_token,
        header.num_tokens,
        header.num_kv_heads,
        header.head_dim,
        header.block_size,
        header.blocks_per_frame,
        header.first_position,
    )
    return encode_frame(FrameType.BEGIN, fixed + rid)


def decode_header(payload: bytes | bytearray | memoryview) -> KVHeader:
    """A BEGIN payload (checksum already checked) -> KVHeader; every field validated."""
    require(HEADER.size <= len(payload) <= MAX_HEADER_BYTES, f"header of {len(payload)} bytes")
    rid_len, dtype_code, layers, first, tokens, heads, head_dim, block_size, per_frame, position = (
        HEADER.unpack_from(payload)
    )
    require(dtype_code in _DTYPES, f"unknown dtype code {dtype_code}")
    require(len(payload) == HEADER.size + rid_len, "header length disagrees with its request id length")
    try:
        request_id = bytes(payload[HEADER.size :]).decode("utf-8")
    except UnicodeDecodeError:
        raise KVProtocolError("request id is not utf-8") from None
    return KVHeader(
        request_id,
        first,
        tokens,
        layers,
        _DTYPES[dtype_code],
        heads,
        head_dim,
        block_size,
        per_frame,
        position,
    )


def encode_error(code: ErrorCode, reason: str) -> bytes:
    """An ERROR frame; the reason is cut to MAX_REASON_BYTES (on a character boundary)."""
    text = reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(FrameType.ERROR, _ERROR.pack(code) + text)


def check_reply_prefix(prefix: FramePrefix) -> None:
    """Bound a receiver's reply before reading its payload."""
    require(
        prefix.type in (FrameType.ACCEPT, FrameType.OK, FrameType.ERROR),
        f"{prefix.type.name} frame where a reply was expected",
    )
    require(
        prefix.length <= (_ERROR.size + MAX_REASON_BYTES if prefix.type == FrameType.ERROR else 0),
        f"{prefix.type.name} reply of {prefix.length} bytes",
    )


def decode_error(payload: bytes | bytearray | memoryview) -> tuple[ErrorCode, str]:
    require(len(payload) >= _ERROR.size, "ERROR frame without a code")
    (code,) = _ERROR.unpack_from(payload)
    require(code in ErrorCode._value2member_map_, f"unknown error code {code}")
    try:
        return ErrorCode(code), bytes(payload[_ERROR.size :]).decode("utf-8")
    except UnicodeDecodeError:
        raise KVProtocolError("error reason is not utf-8") from None


def frame_runs(header: KVHeader, source: BlockRuns, index: int) -> list[memoryview]:
    """The payload of BLOCKS frame `index` as views of `source` (either side), its size checked."""
    layer, begin, end = header.frame(index)
    runs = source.runs(layer, begin, end)
    got, wanted = sum(len(run) for run in runs), (end - begin) * header.token_nbytes
    require(got == wanted, f"frame {index} maps to {got} bytes of KV, not {wanted}", ErrorCode.INTERNAL)
    return runs
