"""The receiving side of one KV transfer (frames.py's wire format) as a state machine without I/O.

Split from the codec so that the socket code (tcp.py) and the tests drive one thin loop: ask for the
next view to fill, fill it, learn what happened (`Begin`, `End`), while every length, checksum and
position check lives here and in frames.py, testable without sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.transfer.frames import (
    CHUNK_BYTES,
    HEADER,
    MAX_HEADER_BYTES,
    PREFIX,
    BlockRuns,
    ErrorCode,
    FramePrefix,
    FrameType,
    KVHeader,
    KVLimits,
    block_checksum,
    check_payload,
    decode_header,
    decode_prefix,
    frame_runs,
    require,
)


@dataclass(frozen=True)
class Begin:
    header: KVHeader


@dataclass(frozen=True)
class End:
    pass


Event = Begin | End


class TransferDecoder:
    """The receiving side of one transfer as a state machine: the socket code stays thin and every check
    is testable without sockets.

    Loop: `view = want()`, fill `view` completely (from a socket, a file...), `event = filled()`. Events:
    Begin (then the caller takes blocks for the header and calls `land_into`), then End once every
    BLOCKS frame landed intact. A frame's payload lands straight in the destination's memory, piece by
    piece (no buffer of the decoder's own); a frame whose checksum fails raises, and the caller frees
    the blocks, whose contents were never committed. Any KVProtocolError ends the transfer.
    """

    def __init__(self, limits: KVLimits, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._limits = limits
        self._chunk = chunk_bytes
        self._prefix_buf = bytearray(PREFIX.size)
        self._want = memoryview(self._prefix_buf)
        self._prefix: FramePrefix | None = None  # of the frame whose payload is being read
        self._begin_buf = bytearray()
        self.header: KVHeader | None = None
        self._destination: BlockRuns | None = None
        self._pieces: list[memoryview] = []  # the rest of the frame being landed, in order
        self._next_frame = 0
        self._crc = 0
        self.done = False

    def land_into(self, destination: BlockRuns) -> None:
        """Where BLOCKS frames land: blocks taken for every token of the header."""
        self._destination = destination

    def want(self) -> memoryview:
        """Where the next bytes of the stream go; fill it completely before calling `filled`."""
        require(not self.done, "data after END")
        return self._want

    def filled(self) -> Event | None:
        """Validate what just landed in `want()`; an event when one is complete."""
        prefix = self._prefix
        if prefix is None:
            return self._on_prefix(decode_prefix(self._prefix_buf))
        if prefix.type == FrameType.BLOCKS:
            return self._on_piece(prefix)
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
            require(prefix.type == FrameType.BEGIN, f"{prefix.type.name} frame before BEGIN")
            require(
                HEADER.size <= prefix.length <= MAX_HEADER_BYTES,
                f"BEGIN frame of {prefix.length} bytes (at most {MAX_HEADER_BYTES})",
            )
            self._prefix = prefix
            self._begin_buf = bytearray(prefix.length)
            self._want = memoryview(self._begin_buf)
            return None
        done, total = self._next_frame, header.num_frames
        if prefix.type == FrameType.END:
            require(done == total, f"END after {done} of {total} frames")
            require(prefix.length == 0, f"END frame with {prefix.length} payload bytes")
            check_payload(prefix, b"")
            self.done = True
            return End()
        require(
            prefix.type == FrameType.BLOCKS and done < total,
            f"{prefix.type.name} frame where {'BLOCKS' if done < total else 'END'} was expected",
        )
        require(prefix.index == done, f"frame {prefix.index} where frame {done} was expected")
        _, begin, end = header.frame(done)
        wanted = (end - begin) * header.token_nbytes
        require(prefix.length == wanted, f"frame {done} of {prefix.length} bytes, the header says {wanted}")
        if self._destination is None:
            raise RuntimeError("BLOCKS frames before land_into(): take the blocks first")
        self._pieces = [
            run[offset : offset + self._chunk]
            for run in reversed(frame_runs(header, self._destination, done))
            for offset in reversed(range(0, len(run), self._chunk))
        ]
        self._prefix = prefix
        self._crc = 0
        self._want = self._pieces.pop()
        return None

    def _on_piece(self, prefix: FramePrefix) -> Event | None:
        self._crc = block_checksum(self._want, self._crc)
        if self._pieces:
            self._want = self._pieces.pop()
            return None
        require(self._crc == prefix.crc, f"frame {prefix.index} checksum mismatch", ErrorCode.CHECKSUM)
        self._next_frame += 1
        self._expect_prefix()
        return None
