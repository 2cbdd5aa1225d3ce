"""Disaggregated vs colocated serving on the same two cores, with the tiny model.

    python -m bench.serving            # ~5 minutes; writes bench/results/serving.{json,png}

1. Interference (the seeds' scenario): six streams decode, then a ~4,000-token prompt arrives
   (eight times, pooled: a p99 over three arrivals moved with this machine's noise). ITL of the six
   streams, measured at the client, in the second before each arrival vs while the big prefill runs
   (paired, because ITL grows with the streams' context). Disaggregated runs also report the phase
   after it, while the prompt's KV cache lands on the decode worker (split at the prefill worker's
   own compute time):
   - colocated `both`, 2 threads on cores 0-1, whole-prompt prefill (decode waits);
   - colocated `both`, 2 threads, chunked prefill interleaved with decode steps (Sarathi-Serve);
   - disaggregated: prefill pinned to core 0, decode to core 1 (1 thread each). The decode core runs
     nothing else. The router and this client (in a cluster: other machines) share core 0 with the
     prefill worker, which runs at `nice 10`, a batch job that must not starve the router's relaying.
2. KV handoff: 4,000-token prompts on an idle disaggregated pool; prefill compute, KV send time and
   TTFT per request (from the prefill worker's metrics), against a raw loopback socket copy of the
   same bytes measured in the same run.
3. Decode batching: tokens/s of the decode worker (core 1) with 1 vs 16 concurrent streams.
4. Control, no serving code at all: the bare engine's decode step (6 sequences) on core 1, alone vs
   while another process prefills 4,000-token prompts on core 0. Whatever this shows is the machine's
   own coupling of the two cores (shared caches, memory bandwidth, host), a floor for experiment 1.
Every setup runs in this one invocation, so ratios compare like with like on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.kv_transfer import raw_copy, raw_server
from bench.serving_harness import (
    BIG_PROMPT,
    RESULTS,
    STREAMS,
    Setup,
    gaps,
    log,
    metrics,
    percentile,
    prompt,
    stats,
    stream,
)
from splitserve.engine.tiny_model import write_tiny_model

# ---- experiments ------------------------------------------------------------------------------


async def interference(setup: Setup, arrivals: int) -> dict[str, Any]:
    """ITL percentiles before each big prompt, while it is prefilled, and (disaggregated) while its KV
    cache is delivered; `windows` are (sent, prefill done, first token) per big prompt."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        streams: list[list[tuple[float, int]]] = [[] for _ in range(STREAMS)]
        tasks = [
            asyncio.create_task(stream(session, setup.url, prompt(64, seed=i), 3000, streams[i]))
            for i in range(STREAMS)
        ]
        started = time.perf_counter()
        await asyncio.sleep(4.0)  # steady decoding: the baseline window (after 1 s of warm-up)
        windows = []
        for arrival in range(arrivals):
            big: list[tuple[float, int]] = []
            counters = await metrics(session, setup.prefill_url) if setup.prefill_url else {}
            sent = time.perf_counter()
            await stream(session, setup.url, prompt(BIG_PROMPT, seed=100 + arrival), 2, big)
            first = big[0][0]
            prefilled = first
            if setup.prefill_url:  # the prefill worker's compute and KV send time for this prompt
                after = await metrics(session, setup.prefill_url)
                sending = (
                    after["splitserve_kv_transfer_seconds_sum"]
                    - counters["splitserve_kv_transfer_seconds_sum"]
                )
                prefilled = first - sending
            windows.append((sent, prefilled, first))
            log(
                f"  {setup.name}: {BIG_PROMPT}-token prompt, TTFT {first - sent:.2f}s "
                f"(KV delivery {1000 * (first - prefilled):.0f} ms)"
            )
            await asyncio.sleep(2.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    samples = [gap for events in streams for gap in gaps(events)]

    def overlapping(phase: list[tuple[float, float]]) -> list[float]:
        return [itl for start, end, itl in samples if any(start < hi and end > lo for lo, hi in phase)]

    before = overlapping([(sent - 1.0, sent) for sent, _, _ in windows])
    during = overlapping([(sent, prefilled) for sent, prefilled, _ in windows])
    delivery = overlapping([(prefilled, first) for _, prefilled, first in windows if first > prefilled])
    result = {
        "itl_before": stats(before),
        "itl_during_prefill": stats(during),
        "p99_ratio": stats(during)["p99"] / stats(before)["p99"],
        "big_prompt_ttft_s": [first - sent for sent, _, first in windows],
        "timeline": [[(end - started, itl) for _, end, itl in gaps(events)] for events in streams],
        "windows": [
            (sent - started, prefilled - started, first - started) for sent, prefilled, first in windows
        ],
    }
    if delivery:
        result["itl_during_kv_delivery"] = stats(delivery)
        result["kv_delivery_p99_ratio"] = stats(delivery)["p99"] / stats(before)["p99"]
    return result


async def handoff(setup: Setup, reps: int) -> dict[str, Any]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for rep in range(reps):
            before = await metrics(session, setup.prefill_url)
            events: list[tuple[float, int]] = []
            sent = time.perf_counter()
            await stream(session, setup.url, prompt(BIG_PROMPT, seed=200 + rep), 2, events)
            ttft = events[0][0] - sent
            after = await metrics(session, setup.prefill_url)
            compute = after["splitserve_prefill_step_seconds_sum"] - before.get(
                "splitserve_prefill_step_seconds_sum", 0
            )
            send = after["splitserve_kv_transfer_seconds_sum"] - before.get(
                "splitserve_kv_transfer_seconds_sum", 0
            )
            nbytes = after["splitserve_kv_transfer_bytes_total"] - before.get(
                "splitserve_kv_transfer_bytes_total", 0
            )
            rows.append({"ttft_s": ttft, "prefill_compute_s": compute, "kv_send_s": send, "kv_bytes": nbytes})
            log(
                f"  handoff {rep + 1}/{reps}: compute {compute:.3f}s, KV send {send * 1000:.1f} ms, "
                f"TTFT {ttft:.3f}s"
            )
    nbytes = int(rows[0]["kv_bytes"])
    raw = raw_loopback_seconds(nbytes, reps)
    send_s = statistics.median(row["kv_send_s"] for row in rows)
    compute_s = statistics.median(row["prefill_compute_s"] for row in rows)
    ttft_s = statistics.median(row["ttft_s"] for row in rows)
    return {
        "requests": rows,
        "kv_bytes": nbytes,
        "median_prefill_compute_s": compute_s,
        "median_kv_send_s": send_s,
        "median_ttft_s": ttft_s,
        "kv_send_over_compute": send_s / compute_s,
        "ttft_over_compute": ttft_s / compute_s - 1.0,
        "kv_bandwidth_gbps": nbytes / send_s / 1e9,
        "raw_loopback_gbps": nbytes / raw / 1e9,
    }


def raw_loopback_seconds(nbytes: int, reps: int) -> float:
    """Median time of a plain socket copy of `nbytes` over loopback (no framing, no checksum)."""
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_server, args=(listener,), daemon=True).start()
    payload = [memoryview(bytearray(nbytes))]
    return statistics.median(raw_copy(listener.getsockname()[1], payload) for _ in range(reps))


async def throughput(setup: Setup, concurrency: int, seconds: float) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        sinks: list[list[tuple[float, int]]] = [[] for _ in range(concurrency)]
        tasks = [
            asyncio.create_task(stream(session, setup.url, prompt(32, seed=300 + i), 3000, sinks[i]))
            for i in range(concurrency)
        ]
        while sum(1 for sink in sinks if sink) < concurrency:  # noqa: ASYNC110 (polling the clients' progress)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        before, start = await metrics(session, setup.decode_url), time.perf_counter()
        await asyncio.sleep(seconds)
        after, end = await metrics(session, setup.decode_url), time.perf_counter()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    tokens = after["splitserve_decode_tokens_total"] - before["splitserve_decode_tokens_total"]
    steps = after["splitserve_decode_step_seconds_count"] - before["splitserve_decode_step_seconds_count"]
    return {"streams": concurrency, "tokens_per_s": tokens / (end - start), "mean_batch": tokens / steps}


PREFILL_LOOP = """
import sys
from splitserve.contract.config import EngineConfig
from splitserve.engine.forward import Engine
from splitserve.engine.loader import load_model
engine = Engine(load_model(EngineConfig(model=sys.argv[1], threads=1)))
print("ready", flush=True)
pool = engine.new_pool(block_size=16)
while True:
    kv = pool.sequence()
    for start in range(0, 4000, 512):
        engine.prefill(kv, [7] * min(512, 4000 - start))
    kv.release()
"""


def engine_control(model: Path, steps: int = 800) -> dict[str, Any]:
    """p50/p99 of a bare decode step on core 1, alone and next to a prefill loop on core 0."""
    from splitserve.contract.config import EngineConfig
    from splitserve.engine.forward import Engine
    from splitserve.engine.loader import load_model

    os.sched_setaffinity(0, {1})
    engine = Engine(load_model(EngineConfig(model=str(model), threads=1)))
    pool = engine.new_pool(block_size=16)
    kvs = [pool.sequence() for _ in range(6)]
    for kv in kvs:
        kv.grow(301)  # every step below rewrites position 300

    def measure() -> dict[str, float]:
        samples = []
        for _ in range(steps):
            for kv in kvs:
                kv.length = 300
            started = time.perf_counter()
            engine.decode_one_token(kvs, [5] * len(kvs))
            samples.append(time.perf_counter() - started)
        return {"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99)}

    measure()  # warm-up
    alone = measure()
    neighbour = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-c", PREFILL_LOOP, str(model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert neighbour.stdout is not None and neighbour.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        beside_prefill = measure()
    finally:
        neighbour.kill()
        neighbour.wait()
    return {
        "alone": alone,
        "beside_prefill": beside_prefill,
        "p99_ratio": beside_prefill["p99"] / alone["p99"],
    }


# ---- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, model: Path, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"interference": {}}
    for name, chunked in (("colocated", False), ("colocated_chunked", True)):
        setup = Setup(name, model, workdir)
        log(f"{name}: starting")
        try:
            await setup.start_colocated(chunked)
            os.sched_setaffinity(0, {0, 1})
            results["interference"][name] = await interference(setup, args.arrivals)
        finally:
            setup.stop()
    setup = Setup("disaggregated", model, workdir)
    log("disaggregated: starting")
    try:
        await setup.start_disaggregated()
        os.sched_setaffinity(0, {0})  # the client shares core 0 with the router and prefill, not decode
        results["interference"]["disaggregated"] = await interference(setup, args.arrivals)
        log("KV handoff")
        results["handoff"] = await handoff(setup, args.reps)
        log("decode batching")
        single = await throughput(setup, 1, args.seconds)
        batched = await throughput(setup, 16, args.seconds)
        results["decode_throughput"] = {
            "single": single,
            "batched_16": batched,
            "ratio": batched["tokens_per_s"] / single["tokens_per_s"],
        }
    finally:
        setup.stop()
    log("bare engine control")
    results["engine_control"] = await asyncio.to_thread(engine_control, model)
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = results["interference"]
    figure, axes = plt.subplots(len(setups) + 1, 1, figsize=(10, 3 * (len(setups) + 1)))
    for axis, (name, data) in zip(axes, setups.items(), strict=False):
        for series in data["timeline"]:
            if series:
                times, itls = zip(*series, strict=True)
                axis.scatter(times, [itl * 1000 for itl in itls], s=2)
        for sent, prefilled, first in data["windows"]:
            axis.axvspan(sent, prefilled, color="orange", alpha=0.25)
            axis.axvspan(prefilled, first, color="purple", alpha=0.25)
        axis.set_yscale("log")
        axis.set_ylabel("ITL (ms)")
        title = (
            f"{name}: p99 ITL {data['itl_before']['p99'] * 1000:.1f} ms before, "
            f"{data['itl_during_prefill']['p99'] * 1000:.1f} ms during a {BIG_PROMPT}-token prefill "
            f"(orange), x{data['p99_ratio']:.2f}"
        )
        if "itl_during_kv_delivery" in data:
            title += f"; {data['itl_during_kv_delivery']['p99'] * 1000:.1f} ms while its KV lands (purple)"
        axis.set_title(title, fontsize=9)
    axes[-2].set_xlabel("seconds")
    names = list(setups)
    positions = range(len(names))
    phases = [
        ("itl_before", "before"),
        ("itl_during_prefill", "during big prefill"),
        ("itl_during_kv_delivery", "while its KV lands"),
    ]
    for offset, (key, label) in zip((-0.27, 0.0, 0.27), phases, strict=True):
        values = [setups[name][key]["p99"] * 1000 if key in setups[name] else 0.0 for name in names]
        axes[-1].bar([p + offset for p in positions], values, 0.27, label=f"p99 ITL {label}")
    axes[-1].set_xticks(list(positions), names)
    axes[-1].set_yscale("log")
    axes[-1].set_ylabel("ms")
    axes[-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrivals", type=int, default=8, help="big prompts per interference run")
    parser.add_argument("--reps", type=int, default=5, help="KV handoff repetitions")
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput measuring window")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        log("writing the tiny model")
        model = write_tiny_model(workdir / "tiny")
        results = asyncio.run(run(args, model, workdir))
    results["machine"] = {"cores": os.cpu_count(), "load_average_after": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "serving.png")
    summary = {name: round(data["p99_ratio"], 2) for name, data in results["interference"].items()}
    log(f"p99 ITL during prefill / before: {summary}")
    delivery = results["interference"]["disaggregated"].get("kv_delivery_p99_ratio")
    log(f"disaggregated p99 ITL while the KV cache lands / before: {delivery}")
    handoff = results["handoff"]
    log(
        f"KV send / prefill compute: {handoff['kv_send_over_compute']:.3f}; "
        f"TTFT / compute - 1: {handoff['ttft_over_compute']:.3f}; "
        f"KV {handoff['kv_bandwidth_gbps']:.2f} GB/s vs raw {handoff['raw_loopback_gbps']:.2f} GB/s"
    )
    log(f"decode 16 vs 1 stream tokens/s: {results['decode_throughput']['ratio']:.2f}x")
    control = results["engine_control"]["p99_ratio"]
    log(f"control: bare engine p99 step beside a prefill / alone: {control:.2f}")


if __name__ == "__main__":
    main()
