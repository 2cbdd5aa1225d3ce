"""KV transfer bandwidth and latency over loopback: our protocol against a raw socket copy, same run.

    PYTHONPATH=worker /work/venv/bin/python bench/kv_transfer.py [--reps N] [--big-reps N]

The receivers run in child processes (as the decode worker would), pinned to the last core, the sender
to the first. Repetitions interleave protocol / protocol without checksum / raw copy, so drift hits all
alike. Writes bench/results/kv_transfer.json and kv_transfer.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import splitserve.transfer.frames as kv_frames
from splitserve.engine.kv_cache import KVLayout, KVPool, SequenceKV
from splitserve.transfer.frames import KVHeader, KVLimits, frame_runs
from splitserve.transfer.tcp import TcpKVReceiver, TcpKVSender

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16
SENDER_CORE, RECEIVER_CORE = 0, (os.cpu_count() or 1) - 1


@dataclass(frozen=True)
class Case:
    name: str
    num_layers: int
    kv_heads: int
    head_dim: int
    tokens: int
    dtype: torch.dtype

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    def sequence(self) -> SequenceKV:
        """The cache to send: `tokens` random tokens in a pool of blocks of BLOCK_SIZE."""
        pool = KVPool(self.layout, -(-self.tokens // BLOCK_SIZE), BLOCK_SIZE, torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        pool.data.copy_(torch.randn(pool.data.shape, generator=generator).to(self.dtype))
        kv = pool.sequence()
        kv.grow(self.tokens)
        kv.length = self.tokens
        return kv


CASES = [
    Case("tiny model, 4000 tokens (16 MB)", 4, 4, 32, 4000, torch.float32),
    Case("32 layers x 8 heads x 128 dim, 4000 tokens bf16 (524 MB)", 32, 8, 128, 4000, torch.bfloat16),
    Case("tiny model, 1 token (fixed cost)", 4, 4, 32, 1, torch.float32),
]


def _pin(core: int) -> None:
    """One core per side, as the disaggregated benchmark pins prefill and decode; torch's own thread pool
    would otherwise fight itself on that core."""
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})


def _no_checksum(data: Any, value: int = 0) -> int:
    return 0


# What the per-layer checksum costs: the protocol as shipped (CRC-32 by zlib-ng when installed), with the
# stdlib's implementation of the same CRC-32, and with no checksum, swapped on both ends.
VARIANTS: dict[str, Callable[..., int]] = {
    "protocol": kv_frames.checksum,
    "protocol_stdlib_crc32": zlib.crc32,
    "protocol_no_checksum": _no_checksum,
}


class _Destination:
    """Frames land in blocks of a real pool (as on a decode worker), given back at the end."""

    def __init__(self, kv: SequenceKV) -> None:
        self.kv = kv

    def runs(self, layer: int, begin: int, end: int) -> list[memoryview]:
        return self.kv.runs(layer, begin, end)

    def commit(self) -> None:
        self.kv.release()

    def abort(self, reason: str) -> None:
        self.kv.release()
        print(f"receiver: transfer aborted: {reason}", flush=True)


class _Sink:
    def __init__(self) -> None:
        self.pools: dict[KVLayout, KVPool] = {}

    async def open(self, header: KVHeader) -> _Destination:
        layout = KVLayout(header.num_layers, header.num_kv_heads, header.head_dim, header.dtype)
        if layout not in self.pools:
            blocks = -(-header.num_tokens // BLOCK_SIZE)
            self.pools[layout] = KVPool(layout, blocks, BLOCK_SIZE, torch.device("cpu"))
        kv = self.pools[layout].sequence()
        kv.grow(header.num_tokens)
        return _Destination(kv)


def raw_server(listener: socket.socket) -> None:
    """Length-prefixed blob into one reused buffer with recv_into, then a one-byte ack."""
    buffer = memoryview(bytearray(64 << 20))
    while True:
        conn, _ = listener.accept()
        with conn:
            (remaining,) = struct.unpack("<Q", conn.recv(8, socket.MSG_WAITALL))
            while remaining:
                got = conn.recv_into(buffer[:remaining])
                if got == 0:
                    break
                remaining -= got
            conn.sendall(b"k")


def _serve(ports: Any, variant: str) -> None:
    """Child process: a TcpKVReceiver with the variant's layer checksum, and a raw socket server."""
    _pin(RECEIVER_CORE)
    kv_frames.block_checksum = VARIANTS[variant]
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_server, args=(listener,), daemon=True).start()

    async def main() -> None:
        receiver = TcpKVReceiver("127.0.0.1", 0, _Sink(), KVLimits(max_transfer_bytes=4 << 30))
        await receiver.start()
        ports.put((receiver.port, listener.getsockname()[1]))
        await asyncio.Event().wait()

    asyncio.run(main())


def raw_copy(port: int, payloads: list[memoryview]) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("<Q", sum(len(p) for p in payloads)))
        for payload in payloads:
            sock.sendall(payload)
        assert sock.recv(1) == b"k"
    return time.perf_counter() - start


def summary(seconds: list[float], nbytes: int) -> dict[str, float]:
    """Median and p90 of the times; the p90 of bandwidth is that of the p90 time (the slow tail)."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    median = statistics.median(ordered)
    times = {"median_s": median, "p90_s": p90, "min_s": ordered[0]}
    return times | ({"median_GBps": nbytes / median / 1e9, "p90_GBps": nbytes / p90 / 1e9} if nbytes else {})


def throughput(function: Callable[[], object], nbytes: int, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def run_case(case: Case, reps: int, runner: asyncio.Runner, ports: dict[str, int]) -> dict[str, Any]:
    kv = case.sequence()
    shape = (case.num_layers, case.kv_heads, case.head_dim, case.dtype)
    header = KVHeader.for_blocks("bench", 1, case.tokens, shape, BLOCK_SIZE)
    payloads = [run for index in range(header.num_frames) for run in frame_runs(header, kv, index)]
    nbytes = header.total_nbytes
    sender = TcpKVSender()

    accept: list[float] = []

    def protocol(variant: str) -> float:
        kv_frames.block_checksum = VARIANTS[variant]
        start = time.perf_counter()
        stats = runner.run(sender.send(f"127.0.0.1:{ports[variant]}", header, kv))
        if variant == "protocol":
            accept.append(stats.accept_seconds)
        return time.perf_counter() - start

    runs: dict[str, list[float]] = {key: [] for key in [*VARIANTS, "raw_socket"]}
    for rep in range(reps + 2):  # two warm-ups
        times = {variant: protocol(variant) for variant in VARIANTS}
        times["raw_socket"] = raw_copy(ports["raw"], payloads)
        if rep < 2:
            accept.clear()
        else:
            for key, value in times.items():
                runs[key].append(value)
        print(
            f"  {case.name}: rep {rep - 1 if rep >= 2 else 'warm-up'}: "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()),
            flush=True,
        )
    kv_frames.block_checksum = VARIANTS["protocol"]
    result: dict[str, Any] = {
        "bytes": nbytes,
        "layers": case.num_layers,
        "frames": header.num_frames,
        "blocks_per_frame": header.blocks_per_frame,
        "dtype": str(case.dtype).removeprefix("torch."),
        "reps": reps,
    }
    result |= {key: summary(values, nbytes) | {"samples_s": values} for key, values in runs.items()}
    result["handshake_latency"] = summary(accept, 0)  # connect to ACCEPT
    median = {key: result[key]["median_s"] for key in runs}
    result["bandwidth_over_raw"] = {variant: median["raw_socket"] / median[variant] for variant in VARIANTS}
    result["checksum_share_of_time"] = {
        variant: 1 - median["protocol_no_checksum"] / median[variant]
        for variant in ("protocol", "protocol_stdlib_crc32")
    }
    result["crc32_GBps"] = throughput(lambda: [kv_frames.checksum(p) for p in payloads], nbytes)
    result["stdlib_crc32_GBps"] = throughput(lambda: [zlib.crc32(p) for p in payloads], nbytes)
    result["adler32_GBps"] = throughput(lambda: [zlib.adler32(p) for p in payloads], nbytes)
    result["crc32_seconds"] = nbytes / result["crc32_GBps"] / 1e9
    return result


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = ["raw_socket", *VARIANTS]
    cases = [name for name, result in results["cases"].items() if result["bytes"] > 1 << 20]
    figure, (axis, latency) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=(3, 2))
    width = 0.8 / len(series)
    for offset, key in enumerate(series):
        medians = [results["cases"][name][key]["median_GBps"] for name in cases]
        p90 = [results["cases"][name][key]["p90_GBps"] for name in cases]
        positions = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(cases))]
        axis.bar(positions, medians, width, label=key.replace("_", " "))
        axis.errorbar(
            positions,
            medians,
            yerr=[[m - p for m, p in zip(medians, p90, strict=True)], [0] * len(cases)],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
    labels = [name.split(" (")[0].replace(", ", "\n") for name in cases]
    axis.set_xticks(range(len(cases)), labels, fontsize=8)
    axis.set_ylabel("GB/s over loopback (median, whisker = p90)")
    axis.set_title("KV transfer vs raw socket copy, same run", fontsize=10)
    axis.legend(fontsize=8)
    small = results["cases"][cases[0]]
    latency.boxplot([[t * 1e3 for t in small[key]["samples_s"]] for key in series], whis=(10, 90))
    latency.set_xticks(range(1, len(series) + 1), [key.replace("_", "\n") for key in series], fontsize=7)
    latency.set_ylabel("ms per transfer (whiskers p10-p90)")
    latency.set_title(cases[0], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=30, help="repetitions of the small cases")
    parser.add_argument("--big-reps", type=int, default=7, help="repetitions of the 524 MB case")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_serve, args=(queue, variant), daemon=True) for variant in VARIANTS]
    try:
        ports: dict[str, int] = {}
        for variant, child in zip(VARIANTS, children, strict=True):
            child.start()
            ports[variant], ports["raw"] = queue.get(timeout=60)
        _pin(SENDER_CORE)
        load_before = os.getloadavg()[0]
        results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "zlib": zlib.ZLIB_RUNTIME_VERSION,
                "crc32": kv_frames.checksum.__module__ or "zlib",
                "sender_core": SENDER_CORE,
                "receiver_core": RECEIVER_CORE,
            },
            "method": "wall time from connect to the receiver's OK (raw: to its one-byte ack), new "
            "connection per transfer; receiver lands frames in a real KV pool's blocks; "
            "interleaved repetitions",
            "cases": {},
        }
        with asyncio.Runner() as runner:
            for case in CASES:
                reps = args.big_reps if case.num_layers * case.tokens > 100_000 else args.reps
                print(f"{case.name}: {reps} repetitions", flush=True)
                results["cases"][case.name] = run_case(case, reps, runner, ports)
        # Other processes on the machine (a 1-minute load above ~0.5 before we start) make every series
        # slower and noisier; the ratios, taken from interleaved repetitions, hold up better.
        results["machine"]["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    finally:
        for child in children:
            child.kill()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_transfer.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "kv_transfer.png")
    for name, result in results["cases"].items():
        ours, raw = result["protocol"], result["raw_socket"]
        print(
            f"{name}: protocol median {ours['median_s'] * 1e3:.2f} ms, p90 {ours['p90_s'] * 1e3:.2f} ms; "
            f"raw socket median {raw['median_s'] * 1e3:.2f} ms"
        )
        if result["bytes"] > 1 << 20:
            print(
                f"  protocol {ours['median_GBps']:.2f} GB/s (p90 {ours['p90_GBps']:.2f}), raw "
                f"{raw['median_GBps']:.2f} GB/s, ratio {result['bandwidth_over_raw']['protocol']:.2f} "
                f"(with the stdlib crc32: {result['bandwidth_over_raw']['protocol_stdlib_crc32']:.2f}); "
                f"checksum share {result['checksum_share_of_time']['protocol']:.0%} "
                f"(stdlib: {result['checksum_share_of_time']['protocol_stdlib_crc32']:.0%})"
            )
    print(f"load average before/after: {results['machine']['load_average_1min']}")
    print(f"wrote {RESULTS / 'kv_transfer.json'} and kv_transfer.png")


if __name__ == "__main__":
    main()
