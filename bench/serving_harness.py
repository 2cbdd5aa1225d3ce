"""The harness of the serving benchmarks (serving.py, kv_landing.py): real worker and router processes
pinned to cores, a streaming client that timestamps every SSE event, and the statistics over them.

Apart from the experiments so that each benchmark module holds only what it measures and how it
reports it; both share the workload (prompt sizes, streams) and the way ITL is read off the events.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from splitserve.local.pool import LocalProcess, free_port, splitserve_argv

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny"
STREAMS = 6
BIG_PROMPT = 4000
MAX_MODEL_LEN = 4096


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 300) for _ in range(length)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stats(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values),
        "n": len(values),
    }


# ---- processes --------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    model: Path
    workdir: Path
    processes: list[LocalProcess] = field(default_factory=list)
    url: str = ""
    prefill_url: str = ""
    decode_url: str = ""
    log_level: str = "warning"

    def spawn(self, name: str, cores: str, *args: str, nice: int = 0) -> LocalProcess:
        port = free_port()
        argv = [
            "nice",
            "-n",
            str(nice),
            "taskset",
            "-c",
            cores,
            *splitserve_argv(*args, "--port", str(port), "--pool", "bench", "--log-level", self.log_level),
        ]
        process = LocalProcess(name, port, argv, self.workdir / f"{self.name}-{name}.log")
        process.start()
        self.processes.append(process)
        return process

    def engine(self) -> list[str]:
        return [
            "--model",
            str(self.model),
            "--served-model-name",
            MODEL,
            "--max-model-len",
            str(MAX_MODEL_LEN),
        ]

    async def start_colocated(self, chunked: bool) -> None:
        extra = ["--chunked-prefill", "--prefill-chunk-size", "256"] if chunked else []
        both = self.spawn("both", "0,1", "worker", "--role", "both", *self.engine(), "--threads", "2", *extra)
        self.url = both.url
        await self._ready()

    async def start_disaggregated(self) -> None:
        prefill = self.spawn(
            "prefill", "0", "worker", "--role", "prefill", *self.engine(), "--threads", "1", nice=10
        )
        decode = self.spawn(
            "decode",
            "1",
            "worker",
            "--role",
            "decode",
            *self.engine(),
            "--threads",
            "1",
            "--kv-port",
            str(free_port()),
        )
        router = self.spawn(
            "router", "0", "router", *self.engine(), "--prefill", prefill.url, "--decode", decode.url
        )
        self.url, self.prefill_url, self.decode_url = router.url, prefill.url, decode.url
        await self._ready()

    async def _ready(self) -> None:
        async with aiohttp.ClientSession() as session:
            for process in self.processes:
                await process.wait_ready(session)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


# ---- client -----------------------------------------------------------------------------------


async def stream(
    session: aiohttp.ClientSession, url: str, ids: list[int], max_tokens: int, events: list[tuple[float, int]]
) -> None:
    """Stream a greedy completion; record (arrival time, tokens in the event) for every SSE event."""
    body = {
        "model": MODEL,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    async with session.post(url + "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.content:
            if line.startswith(b"data: {"):
                payload = json.loads(line[6:])
                if payload.get("error"):
                    raise RuntimeError(payload["error"])
                events.append((time.perf_counter(), len(payload["choices"][0]["token_ids"])))


def gaps(events: list[tuple[float, int]]) -> list[tuple[float, float, float]]:
    """(start, end, itl) per token; an event carrying k tokens splits its gap k ways (as the router does)."""
    out = []
    for (previous, _), (now, count) in itertools.pairwise(events):
        out += [(previous, now, (now - previous) / count)] * count
    return out


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as reply:
        text = await reply.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("splitserve_") and " " in line:
            name = line.split("{")[0].split(" ")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values
