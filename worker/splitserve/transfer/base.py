"""The KV transport interface: what every backend implements and what the workers call.

TCP (transfer/tcp.py) is the one backend today; RDMA/NIXL or shared storage (3FS, NVMe) fit behind
the same KVSender / KVReceiver / KVSink trio. The worker app depends on this module, not on a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from splitserve.transfer.frames import BlockRuns, ErrorCode, KVHeader


class KVRejected(Exception):  # noqa: N818 (the name the worker contract uses)
    """Raised by `KVSink.open` to refuse a transfer; the reason reaches the sender."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KVTransferError(Exception):
    """A transfer failed; `reason` is the receiver's own words when it could still say them."""

    def __init__(self, request_id: str, code: ErrorCode, reason: str) -> None:
        super().__init__(f"KV transfer of {request_id!r} failed ({code.name.lower()}): {reason}")
        self.request_id = request_id
        self.code = code
        self.reason = reason


class KVDestination(BlockRuns, Protocol):
    """Where one transfer lands: blocks taken for every token of the header, not yet visible to the
    engine (`runs` gives the receiver their memory). Exactly one of `commit` (returning normally) or
    `abort` ends it; `abort` also follows a `runs` or `commit` that raised."""

    def commit(self) -> None:
        """Every frame arrived intact: the sequence may join the engine."""

    def abort(self, reason: str) -> None:
        """The transfer failed: free what was reserved."""


class KVSink(Protocol):
    """Implemented by the decode worker."""

    async def open(self, header: KVHeader) -> KVDestination:
        """May wait (until KV budget frees: the sender waits for the answer); raise KVRejected to refuse.
        Cancelled if the sender goes away meanwhile."""
        ...


@dataclass(frozen=True)
class TransferStats:
    bytes: int  # KV payload bytes (what splitserve_kv_transfer_bytes_total counts)
    seconds: float  # connect to the receiver's OK
    accept_seconds: float  # connect to ACCEPT: includes the receiver's admission wait


class KVSender(ABC):
    @abstractmethod
    async def send(self, target: str, header: KVHeader, source: BlockRuns) -> TransferStats:
        """Ship the cache `header` describes, straight from `source`'s blocks, to the receiver at `target`
        ("host:port"); raises KVTransferError on failure. `source` must not change until it returns."""


class KVReceiver(ABC):
    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting and abort the transfers in flight."""

    @property
    @abstractmethod
    def port(self) -> int:
        """The bound port (the real one when 0 = ephemeral was asked for)."""
