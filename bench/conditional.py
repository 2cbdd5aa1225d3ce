"""Conditional disaggregation: TTFT of a prompt prefilled on the decode worker vs on a prefill worker.

    PYTHONPATH=worker python -m bench.conditional [--rounds 7]      # ~2.5 minutes

One pool of processes on loopback (the tiny model, one thread per worker): 1 prefill worker, 1 decode
worker, and two routers over the same workers, reading the same discovery file: `local` (its
`routing.local_prefill_max_tokens` covers every prompt here, so the decode worker prefills them) and
`remote` (0: always a prefill worker, the KV cache shipped over TCP). Meanwhile STREAMS greedy streams
keep decoding on the decode worker (a serving pool is rarely idle), so a local prefill shares its
steps with them. Each round sends one fresh prompt (never cached) of every length through each
router, one request at a time, lengths and routers interleaved so that drift hits all alike. TTFT is
measured at the client (first SSE token); so is what the running streams pay meanwhile: the gaps
between two of their tokens while the prompt is being served (a local prefill shares their steps).
Each router's `splitserve_prefills_total` must say that every request went where its mode says.
The crossover (`summarize`) is what `RoutingConfig.local_prefill_max_tokens` defaults to: the longest
length at which local prefill is not slower for the new prompt and does not yet stall the running
streams (TOLERANCE and STALL absorb this shared machine's noise: both workers share its two cores
with everything else, so remote prefill has no device of its own here, as it would in a cluster).
Writes bench/results/conditional.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from splitserve.contract import names
from splitserve.contract.config import EngineConfig, RoutingConfig
from splitserve.engine.tiny_model import write_tiny_model
from splitserve.local.pool import LocalPool, LocalProcess, free_port, splitserve_argv

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny"
LENGTHS = (16, 64, 128, 256, 512, 1024, 2048)
MODES = ("local", "remote")
STREAMS = 4  # background streams decoding on the decode worker
TOLERANCE = 0.1  # local may be this much slower than remote at the median and still count as not slower
STALL = 2.0  # a one-off gap of up to twice the usual is within decode jitter; more is a stall
MAX_MODEL_LEN = 4096


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 300) for _ in range(length)]


async def ttft(session: aiohttp.ClientSession, url: str, tokens: list[int]) -> float:
    """Seconds from sending the request to its first streamed token."""
    body = {"model": MODEL, "prompt": tokens, "max_tokens": 2, "temperature": 0, "stream": True}
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.content:
            if line.startswith(b"data: {"):
                elapsed = time.perf_counter() - started
                break
        else:
            raise RuntimeError(f"{url}: no token")
        async for _ in reply.content:  # read to the end: the request is finished before the next one
            pass
    return elapsed


async def background(
    session: aiohttp.ClientSession, url: str, stop: asyncio.Event, seed: int, arrivals: list[list[float]]
) -> None:
    """One stream after another on the decode worker until `stop` (short prompts: prefilled locally);
    when each stream's tokens arrived goes to `arrivals`, a list per stream."""
    for turn in range(10_000):
        if stop.is_set():
            return
        body = {
            "model": MODEL,
            "prompt": prompt(8, seed * 10_000 + turn),
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        times: list[float] = []
        arrivals.append(times)
        async with session.post(url + "/v1/completions", json=body) as reply:
            async for line in reply.content:
                if stop.is_set():
                    return
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter())


def gaps_during(arrivals: list[list[float]], begin: float, end: float) -> list[float]:
    """Every running stream's waits between two tokens that overlap `begin..end`."""
    return [
        later - earlier
        for times in arrivals
        for earlier, later in itertools.pairwise(times)
        if begin < later and earlier < end
    ]


async def placements(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as reply:
        body = await reply.text()
    return {
        mode: sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith(names.PREFILLS) and f'placement="{mode}"' in line
        )
        for mode in MODES
    }


async def measure(pool: LocalPool, remote_router: LocalProcess, rounds: int) -> dict[str, Any]:
    urls = {"local": pool.url, "remote": remote_router.url}
    samples: dict[str, dict[int, list[float]]] = {mode: {n: [] for n in LENGTHS} for mode in MODES}
    windows: dict[str, dict[int, list[tuple[float, float]]]] = {
        mode: {n: [] for n in LENGTHS} for mode in MODES
    }
    arrivals: list[list[float]] = []  # token arrival times of each background stream
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await remote_router.wait_ready(session)
        for mode in MODES:  # warm both paths (first forward of each shape, connections)
            await ttft(session, urls[mode], prompt(300, seed=-1 - MODES.index(mode)))
        before = {mode: await placements(session, urls[mode]) for mode in MODES}
        stop = asyncio.Event()
        load = [asyncio.create_task(background(session, pool.url, stop, i, arrivals)) for i in range(STREAMS)]
        await asyncio.sleep(2)  # the streams are decoding
        started = time.perf_counter()
        try:
            for round_ in range(rounds):
                order = [(n, mode) for n in LENGTHS for mode in MODES]
                random.Random(round_).shuffle(order)
                for n, mode in order:
                    seed = round_ * 100_000 + n * 10 + MODES.index(mode)
                    begin = time.perf_counter()
                    samples[mode][n].append(await ttft(session, urls[mode], prompt(n, seed)))
                    windows[mode][n].append((begin, time.perf_counter()))
                print(f"round {round_ + 1}/{rounds} done", flush=True)
        finally:
            stop.set()
            await asyncio.gather(*load, return_exceptions=True)
        after = {mode: await placements(session, urls[mode]) for mode in MODES}
    probes = rounds * len(LENGTHS)
    local_router = {m: after["local"][m] - before["local"][m] for m in MODES}
    remote_router_counts = {m: after["remote"][m] - before["remote"][m] for m in MODES}
    # The background streams go through the local router too: every one of them is local as well.
    assert local_router["remote"] == 0 and local_router["local"] >= probes, local_router
    assert remote_router_counts == {"local": 0, "remote": probes}, remote_router_counts
    stalls = {
        mode: {
            n: [gap for window in windows[mode][n] for gap in gaps_during(arrivals, *window)] for n in LENGTHS
        }
        for mode in MODES
    }
    return {
        "seconds": time.perf_counter() - started,
        "placements": {"local_router": local_router, "remote_router": remote_router_counts},
        "ttft_seconds": samples,
        "stream_gap_seconds": stalls,
    }


def quantile_ms(values: dict[str, dict[int, list[float]]], q: float) -> dict[str, dict[int, float]]:
    """Quantile `q` of each mode and length, in ms."""

    def one(samples: list[float]) -> float:
        ordered = sorted(samples) or [0.0]
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 2)

    return {mode: {n: one(values[mode][n]) for n in LENGTHS} for mode in MODES}


def summarize(
    samples: dict[str, dict[int, list[float]]], gaps: dict[str, dict[int, list[float]]]
) -> dict[str, Any]:
    """The crossover: local prefill must not be slower for the new prompt (TTFT p50 within TOLERANCE),
    and must not stall the running streams: from the shortest length on which, at it and every longer
    one, their token gaps (p90) are STALL times what they are with remote prefill, local is too long."""
    ttft, stall = quantile_ms(samples, 0.5), quantile_ms(gaps, 0.9)
    not_slower = [n for n in LENGTHS if ttft["local"][n] <= ttft["remote"][n] * (1 + TOLERANCE)]
    stalls = [n for n in LENGTHS if stall["local"][n] >= stall["remote"][n] * STALL]
    crossover = 0
    for index, n in enumerate(LENGTHS):
        if n not in not_slower or all(longer in stalls for longer in LENGTHS[index:]):
            break
        crossover = n
    return {
        "ttft_p50_ms": ttft,
        "stream_gap_p90_ms": stall,
        "local_not_slower_at": not_slower,
        "local_stalls_streams_at": stalls,
        "crossover_tokens": crossover,
    }


def plot(summary: dict[str, Any], samples: dict[str, dict[int, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mode, label in (("local", "local prefill (decode worker)"), ("remote", "always remote")):
        (line,) = left.plot(
            LENGTHS, [summary["ttft_p50_ms"][mode][n] for n in LENGTHS], marker="o", label=label
        )
        for n in LENGTHS:
            every = [v * 1000 for v in samples[mode][n]]
            left.scatter([n] * len(every), every, s=6, alpha=0.3, color=line.get_color())
        right.plot(LENGTHS, [summary["stream_gap_p90_ms"][mode][n] for n in LENGTHS], marker="o", label=label)
    if summary["crossover_tokens"]:
        left.axvline(summary["crossover_tokens"], color="grey", linestyle="--", label="crossover")
    left.set(ylabel="TTFT p50 (ms)", title=f"TTFT of the new prompt ({STREAMS} streams decoding)")
    right.set(ylabel="token gap p90 (ms)", title="What the running streams wait meanwhile")
    for axis in (left, right):
        axis.set(xscale="log", yscale="log", xlabel="prompt tokens (uncached)")
        axis.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        model = write_tiny_model(workdir / "tiny")
        config = EngineConfig(
            model=str(model),
            served_model_name=MODEL,
            max_model_len=MAX_MODEL_LEN,
            kv_cache_bytes=256 << 20,
            routing=RoutingConfig(local_prefill_max_tokens=MAX_MODEL_LEN),
        )
        pool = LocalPool("bench", config, workdir / "pool", free_port(), threads={"prefill": 1, "decode": 1})
        remote_config = workdir / "remote.json"
        remote_config.write_text(
            config.model_copy(update={"routing": RoutingConfig(local_prefill_max_tokens=0)}).model_dump_json(
                exclude_none=True
            )
        )
        remote_port = free_port()
        argv = ["router", "--config", str(remote_config), "--discovery-file", str(pool.discovery_file)]
        argv += ["--host", "127.0.0.1", "--port", str(remote_port), "--pool", "bench"]
        remote_router = LocalProcess(
            "router-remote", remote_port, splitserve_argv(*argv), workdir / "remote.log"
        )
        try:
            asyncio.run(pool.start(prefill=1, decode=1))
            remote_router.start()
            result = asyncio.run(measure(pool, remote_router, args.rounds))
        finally:
            remote_router.stop()
            asyncio.run(pool.stop())
    samples, gaps = result.pop("ttft_seconds"), result.pop("stream_gap_seconds")
    summary = summarize(samples, gaps)
    RESULTS.mkdir(exist_ok=True)
    output = {
        "model": MODEL,
        "rounds": args.rounds,
        "lengths": LENGTHS,
        "background_streams": STREAMS,
        **result,
        "summary": summary,
        "tolerance": TOLERANCE,
        "stall": STALL,
        "ttft_seconds": samples,
        "stream_gap_seconds": gaps,
    }
    (RESULTS / "conditional.json").write_text(json.dumps(output, indent=2) + "\n")
    plot(summary, samples, RESULTS / "conditional.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
