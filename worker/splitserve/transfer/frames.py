"""Wire format of one KV cache transfer: header and tensors <-> bytes, validated, without I/O.

Raw tensor bytes behind fixed-size little-endian struct headers, so that nothing a peer sends is ever
executed or unpickled (no pickle, no torch.load, no object arrays). Every frame is a 24-byte prefix and
`length` payload bytes:

    magic b"SSKV" | version u8 | type u8 | flags u16 (0) | index u32 | crc32 u32 | length u64

A transfer, sender -> receiver: BEGIN (the KVHeader), LAYER 0..L-1 (the raw bytes of one
`[2, H_kv, T, D]` tensor each), END. The receiver answers BEGIN with ACCEPT or ERROR and END with OK or
ERROR (ERROR may also come at any point in between). Every length is checked against the frame type,
the header and the receiver's limits before a byte of payload is read or a buffer allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from math import prod

import torch

MAGIC = b"SSKV"
VERSION = 1
PREFIX = struct.Struct("<4sBBHIIQ")  # magic, version, type, flags, index, crc32, length
_HEADER = struct.Struct("<HBBIIQ")  # request id length, dtype, ndim, num_layers, first_token, num_tokens
_ERROR = struct.Struct("<H")  # error code; the utf-8 reason follows

MAX_REQUEST_ID_BYTES = 128
MAX_DIMS = 8
MAX_HEADER_BYTES = _HEADER.size + MAX_REQUEST_ID_BYTES + 8 * MAX_DIMS
MAX_REASON_BYTES = 1024
KV_NDIM = 4  # version 1 carries the [2, H_kv, T, D] layout only; another layout is another version
CHUNK_BYTES = 1 << 20  # payload is read (and checksummed) in pieces this big: short event-loop steps

# zlib-ng computes the very same CRC-32 as zlib, vectorised: 4-6x faster (bench/results/kv_transfer.json).
try:
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # optional: peers with and without it interoperate
    from zlib import crc32 as _crc32
checksum = _crc32
# The checksum of layer payloads, the bulk of the bytes: its own name, so the bench can measure its cost.
layer_checksum = checksum


class FrameType(IntEnum):
    BEGIN = 1
    LAYER = 2
    END = 3
    ACCEPT = 4  # receiver: the sink opened a destination, send the layers
    OK = 5  # receiver: every layer arrived intact and was committed
    ERROR = 6  # receiver: the transfer failed; payload = code + reason


class ErrorCode(IntEnum):
    """Why a transfer failed; on the wire in ERROR frames, and on KVTransferError for the caller."""

    PROTOCOL = 1  # malformed or unexpected frame
    CHECKSUM = 2  # a layer's bytes do not match its crc32
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


_DTYPES: dict[int, torch.dtype] = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def _require(condition: bool, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
    if not condition:
        raise KVProtocolError(message, code)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class KVHeader:
    """What one transfer carries: sent first, so the receiver can check and reserve before any data."""

    request_id: str
    first_token: int  # the token prefill sampled
    num_tokens: int  # T, the prompt length
    num_layers: int
    dtype: torch.dtype
    layer_shape: tuple[int, ...]  # [2, H_kv, T, D], the same for every layer

    def __post_init__(self) -> None:
        rid = self.request_id.encode("utf-8") if isinstance(self.request_id, str) else b""
        _require(
            0 < len(rid) <= MAX_REQUEST_ID_BYTES,
            f"request id must be 1..{MAX_REQUEST_ID_BYTES} bytes of utf-8",
        )
        _require(
            _is_int(self.first_token) and 0 <= self.first_token < 2**32,
            f"first token {self.first_token!r} is not a u32",
        )
        _require(
            _is_int(self.num_layers) and 0 < self.num_layers < 2**32,
            f"num_layers {self.num_layers!r} is not a positive u32",
        )
        _require(
            _is_int(self.num_tokens) and 0 < self.num_tokens < 2**63,
            f"num_tokens {self.num_tokens!r} is not positive",
        )
        _require(self.dtype in _DTYPE_CODES, f"dtype {self.dtype} is not one of float32, bfloat16, float16")
        shape = self.layer_shape
        _require(
            isinstance(shape, tuple) and all(_is_int(d) and 0 < d < 2**63 for d in shape),
            f"layer shape {shape!r} must be a tuple of positive ints",
        )
        _require(
            len(shape) == KV_NDIM and shape[0] == 2 and shape[2] == self.num_tokens,
            f"layer shape {list(shape)} is not [2, H_kv, T={self.num_tokens}, D]",
        )

    @classmethod
    def describe(cls, request_id: str, first_token: int, layers: Sequence[torch.Tensor]) -> KVHeader:
        """The header for sending `layers` (the prefill side's shortcut)."""
        _require(len(layers) > 0, "no layers to send")
        shape = tuple(layers[0].shape)
        return cls(
            request_id,
            first_token,
            shape[2] if len(shape) == KV_NDIM else 0,
            len(layers),
            layers[0].dtype,
            shape,
        )

    @property
    def layer_nbytes(self) -> int:
        return prod(self.layer_shape) * self.dtype.itemsize

    @property
    def total_nbytes(self) -> int:
        return self.layer_nbytes * self.num_layers


@dataclass(frozen=True)
class KVLimits:
    """What a receiver accepts; checked on the header, before any layer buffer is allocated."""

    max_transfer_bytes: int = 8 << 30  # the decode worker passes its `max_transfer_bytes`
    max_frame_bytes: int = 4 << 30  # one layer's payload
    max_layers: int = 1024

    def check(self, header: KVHeader) -> None:
        limit = ErrorCode.LIMIT
        _require(
            header.num_layers <= self.max_layers,
            f"{header.num_layers} layers exceed the limit of {self.max_layers}",
            limit,
        )
        _require(
            header.layer_nbytes <= self.max_frame_bytes,
            f"a layer of {header.layer_nbytes} bytes exceeds the limit of {self.max_frame_bytes}",
            limit,
        )
        _require(
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
    """A whole small frame (everything but LAYER, whose payload is sent from the tensor in place)."""
    return PREFIX.pack(MAGIC, VERSION, kind, 0, index, checksum(payload), len(payload)) + payload


def encode_layer_prefix(index: int, nbytes: int, crc: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, FrameType.LAYER, 0, index, crc, nbytes)


def decode_prefix(data: bytes | bytearray | memoryview) -> FramePrefix:
    _require(len(data) == PREFIX.size, f"frame prefix must be {PREFIX.size} bytes, got {len(data)}")
    magic, version, kind, flags, index, crc, length = PREFIX.unpack(data)
    _require(magic == MAGIC, f"bad magic {bytes(magic)!r}")
    _require(version == VERSION, f"protocol version {version} (this side speaks {VERSION})")
    _require(kind in FrameType._value2member_map_, f"unknown frame type {kind}")
    _require(flags == 0, f"unknown frame flags {flags:#x}")
    _require(kind == FrameType.LAYER or index == 0, f"{FrameType(kind).name} frame with index {index}")
    return FramePrefix(FrameType(kind), index, crc, length)


def check_payload(prefix: FramePrefix, payload: bytes | bytearray | memoryview) -> None:
    _require(
        checksum(payload) == prefix.crc, f"{prefix.type.name} frame checksum mismatch", ErrorCode.CHECKSUM
    )


def encode_header(header: KVHeader) -> bytes:
    """The BEGIN frame."""
    rid = header.request_id.encode("utf-8")
    fixed = _HEADER.pack(
        len(rid),
        _DTYPE_CODES[header.dtype],
        len(header.layer_shape),
        header.num_layers,
        header.first_token,
        header.num_tokens,
    )
    dims = struct.pack(f"<{len(header.layer_shape)}Q", *header.layer_shape)
    return encode_frame(FrameType.BEGIN, fixed + rid + dims)


def decode_header(payload: bytes | bytearray | memoryview) -> KVHeader:
    """A BEGIN payload (checksum already checked) -> KVHeader; every field validated."""
    _require(_HEADER.size <= len(payload) <= MAX_HEADER_BYTES, f"header of {len(payload)} bytes")
    rid_len, dtype_code, ndim, num_layers, first_token, num_tokens = _HEADER.unpack_from(payload)
    _require(dtype_code in _DTYPES, f"unknown dtype code {dtype_code}")
    _require(ndim <= MAX_DIMS, f"{ndim} dims exceed the limit of {MAX_DIMS}")
    _require(rid_len <= MAX_REQUEST_ID_BYTES, f"request id of {rid_len} bytes")
    _require(len(payload) == _HEADER.size + rid_len + 8 * ndim, "header length disagrees with its fields")
    try:
        request_id = bytes(payload[_HEADER.size : _HEADER.size + rid_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise KVProtocolError("request id is not utf-8") from None
    shape = struct.unpack_from(f"<{ndim}Q", payload, _HEADER.size + rid_len)
    return KVHeader(request_id, first_token, num_tokens, num_layers, _DTYPES[dtype_code], shape)


def encode_error(code: ErrorCode, reason: str) -> bytes:
    """An ERROR frame; the reason is cut to MAX_REASON_BYTES (on a character boundary)."""
    text = reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(FrameType.ERROR, _ERROR.pack(code) + text)


def check_reply_prefix(prefix: FramePrefix) -> None:
    """Bound a receiver's reply before reading its payload."""
    _require(
        prefix.type in (FrameType.ACCEPT, FrameType.OK, FrameType.ERROR),
        f"{prefix.type.name} frame where a reply was expected",
    )
    _require(
        prefix.length <= (_ERROR.size + MAX_REASON_BYTES if prefix.type == FrameType.ERROR else 0),
        f"{prefix.type.name} reply of {prefix.length} bytes",
    )


def decode_error(payload: bytes | bytearray | memoryview) -> tuple[ErrorCode, str]:
    _require(len(payload) >= _ERROR.size, "ERROR frame without a code")
    (code,) = _ERROR.unpack_from(payload)
    _require(code in ErrorCode._value2member_map_, f"unknown error code {code}")
    try:
        return ErrorCode(code), bytes(payload[_ERROR.size :]).decode("utf-8")
    except UnicodeDecodeError:
        raise KVProtocolError("error reason is not utf-8") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying (bfloat16 included)."""
    _require(tensor.device.type == "cpu", f"tensor on {tensor.device}, expected cpu")
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data


@dataclass(frozen=True)
class Begin:
    header: KVHeader


@dataclass(frozen=True)
class Layer:
    index: int
    kv: torch.Tensor  # borrowed: the decoder reuses its memory for the next layer


@dataclass(frozen=True)
class End:
    pass


Event = Begin | Layer | End


class TransferDecoder:
    """The receiving side of one transfer as a state machine: the socket code stays thin and every check
    is testable without sockets.

    Loop: `view = want()`, fill `view` completely (from a socket, a file...), `event = filled()`. Events come
    in order: Begin, Layer 0..L-1, End. Payload lands straight in a buffer the decoder owns (no extra
    copy); that one-layer buffer is allocated only after the header passed `limits` and the first LAYER
    prefix matched it, so a forged length never makes the receiver allocate it. Any KVProtocolError ends
    the transfer; the decoder is not usable after it.
    """

    def __init__(self, limits: KVLimits, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._limits = limits
        self._chunk = chunk_bytes
        self._prefix_buf = bytearray(PREFIX.size)
        self._want = memoryview(self._prefix_buf)
        self._prefix: FramePrefix | None = None  # of the frame whose payload is being read
        self._begin_buf = bytearray()
        self.header: KVHeader | None = None
        self._layer_bytes = memoryview(b"")
        self._kv: torch.Tensor | None = None
        self._next_layer = 0
        self._offset = 0
        self._crc = 0
        self.done = False

    def want(self) -> memoryview:
        """Where the next bytes of the stream go; fill it completely before calling `filled`."""
        _require(not self.done, "data after END")
        return self._want

    def filled(self) -> Event | None:
        """Validate what just landed in `want()`; an event when one is complete."""
        prefix = self._prefix
        if prefix is None:
            return self._on_prefix(decode_prefix(self._prefix_buf))
        if prefix.type == FrameType.LAYER:
            return self._on_layer_chunk(prefix)
        check_payload(prefix, self._begin_buf)
        header = decode_header(self._begin_buf)
        self._limits.check(header)
        self.header = header
        self._expect_prefix()
        return Begin(header)

    def _expect_prefix(self) -> None:
        self._prefix = None
        self._want = memoryview(self._prefix_buf)

    def _on_prefix(self, prefix: FramePrefix) -> Event | None:
        header = self.header
        if header is None:
            _require(prefix.type == FrameType.BEGIN, f"{prefix.type.name} frame before BEGIN")
            _require(
                _HEADER.size <= prefix.length <= MAX_HEADER_BYTES,
                f"BEGIN frame of {prefix.length} bytes (at most {MAX_HEADER_BYTES})",
            )
            self._prefix = prefix
            self._begin_buf = bytearray(prefix.length)
            self._want = memoryview(self._begin_buf)
            return None
        done = self._next_layer
        if prefix.type == FrameType.END:
            _require(done == header.num_layers, f"END after {done} of {header.num_layers} layers")
            _require(prefix.length == 0, f"END frame with {prefix.length} payload bytes")
            check_payload(prefix, b"")
            self.done = True
            return End()
        _require(
            prefix.type == FrameType.LAYER and done < header.num_layers,
            f"{prefix.type.name} frame where {'LAYER' if done < header.num_layers else 'END'} was expected",
        )
        _require(prefix.index == done, f"layer {prefix.index} where layer {done} was expected")
        _require(
            prefix.length == header.layer_nbytes,
            f"layer {done} of {prefix.length} bytes, the header says {header.layer_nbytes}",
        )
        if self._kv is None:
            buffer = torch.empty(header.layer_nbytes, dtype=torch.uint8)
            self._layer_bytes = buffer.numpy().data
            self._kv = buffer.view(header.dtype).view(header.layer_shape)
        self._prefix = prefix
        self._offset = 0
        self._crc = 0
        self._want = self._layer_bytes[: self._chunk]
        return None

    def _on_layer_chunk(self, prefix: FramePrefix) -> Event | None:
        self._crc = layer_checksum(self._want, self._crc)
        self._offset += len(self._want)
        if self._offset < prefix.length:
            self._want = self._layer_bytes[self._offset : self._offset + self._chunk]
            return None
        _require(self._crc == prefix.crc, f"layer {prefix.index} checksum mismatch", ErrorCode.CHECKSUM)
        assert self._kv is not None
        self._next_layer += 1
        self._expect_prefix()
        return Layer(prefix.index, self._kv)


def layer_payloads(header: KVHeader, layers: Sequence[torch.Tensor]) -> list[memoryview]:
    """Check that `layers` match `header` and return their raw bytes (the sender's side of the codec)."""
    _require(len(layers) == header.num_layers, f"{len(layers)} layers, the header says {header.num_layers}")
    for index, layer in enumerate(layers):
        _require(
            isinstance(layer, torch.Tensor)
            and layer.dtype == header.dtype
            and tuple(layer.shape) == header.layer_shape,
            f"layer {index} is not a {header.dtype} tensor of shape {list(header.layer_shape)}",
        )
    return [tensor_bytes(layer) for layer in layers]
