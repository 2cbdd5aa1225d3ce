"""What landing a 4,000-token KV cache costs the decode loop: p99 ITL while it lands vs before.

    python -m bench.kv_landing --baseline DIR   # ~3 min; bench/results/kv_landing.{json,png}

A prefill worker (core 0, 1 thread, nice 10) and a decode worker (core 1, 1 thread, nothing else on
it), driven directly over their /internal routes as the router drives them, with no router or OpenAI
layer in the way: six streams decode (64-token prompts, greedy, ignore_eos), then a 4,000-token
prompt (16 MB of KV with the tiny model) is prefilled and its cache pushed to the decode worker,
`--arrivals` times. ITL is the gap between NDJSON lines of the six streams as this client reads them;
"before" is the second before each arrival, "landing" the window of the transfer itself (from the
big request's first token, which the decode worker sends on commit, back by the prefill worker's own
`transfer_seconds`, as bench/serving.py splits it); the big request asks for that one token only.
The same scenario runs on this tree and on `--baseline` (a checkout of the previous release, e.g.
`git worktree add /tmp/base <commit>`), alternating, `--rounds` times, so the two are compared within
one run on the same machine. A control window, the last 0.3 s of each prefill (before any KV moves),
shows how much of the stretch the prefill next door causes by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.serving_harness import BIG_PROMPT, MAX_MODEL_LEN, RESULTS, STREAMS, gaps, log, prompt, stats
from splitserve.engine.tiny_model import write_tiny_model
from splitserve.local.pool import LocalProcess, free_port, splitserve_argv

HERE = Path(__file__).resolve().parent.parent
# The control window: the last 0.3 s of each big prompt's prefill, just before its cache is sent. Whatever
# the prefill on core 0 does to the streams (this machine's coupling of its two cores, the client's
# share of core 0) is there too, without a byte of KV landing.
PREFILL_END_S = 0.3


@dataclass
class Workers:
    """A prefill and a decode worker of one source tree."""

    tree: Path
    model: Path
    workdir: Path
    processes: list[LocalProcess] = field(default_factory=list)
    kv_port: int = 0

    def spawn(self, name: str, core: str, *args: str, nice: int = 0) -> LocalProcess:
        port = free_port()
        argv = ["nice", "-n", str(nice), "taskset", "-c", core]
        argv += splitserve_argv("worker", *args, "--port", str(port), "--log-level", "warning")
        argv += ["--model", str(self.model), "--max-model-len", str(MAX_MODEL_LEN), "--threads", "1"]
        env = dict(os.environ, PYTHONPATH=str(self.tree / "worker"))
        process = LocalProcess(name, port, argv, self.workdir / f"{self.tree.name}-{name}.log", env=env)
        process.start()
        self.processes.append(process)
        return process

    async def start(self, session: aiohttp.ClientSession) -> tuple[str, str]:
        self.kv_port = free_port()
        prefill = self.spawn("prefill", "0", "--role", "prefill", nice=10)
        decode = self.spawn("decode", "1", "--role", "decode", "--kv-port", str(self.kv_port))
        for process in self.processes:
            await process.wait_ready(session)
        return prefill.url, decode.url

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


async def request(
    session: aiohttp.ClientSession,
    urls: tuple[str, str],
    kv_port: int,
    rid: str,
    ids: list[int],
    lines: list[tuple[float, int]],
    max_tokens: int = 3000,
) -> dict[str, Any]:
    """Register on decode, prefill with the KV pushed there, read the token lines (time, tokens);
    the prefill worker's reply (its prefill and transfer seconds)."""
    prefill_url, decode_url = urls
    sampling = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    body = {"request_id": rid, "prompt_token_ids": ids, "sampling": sampling}
    async with session.post(decode_url + "/internal/decode", json=body) as registered:
        registered.raise_for_status()
        call = body | {"kv_target": f"127.0.0.1:{kv_port}"}
        async with session.post(prefill_url + "/internal/prefill", json=call) as prefilled:
            prefilled.raise_for_status()
            reply: dict[str, Any] = await prefilled.json()
        async for line in registered.content:
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            lines.append((time.perf_counter(), len(chunk["token_ids"])))
    return reply


async def scenario(session: aiohttp.ClientSession, workers: Workers, arrivals: int) -> dict[str, Any]:
    urls = await workers.start(session)
    streams: list[list[tuple[float, int]]] = [[] for _ in range(STREAMS)]
    tasks = [
        asyncio.create_task(request(session, urls, workers.kv_port, f"s{i}", prompt(64, i), streams[i]))
        for i in range(STREAMS)
    ]
    await asyncio.sleep(3.0)  # warm-up, then steady decoding
    windows = []
    for arrival in range(arrivals):
        sent = time.perf_counter()
        big, first = prompt(BIG_PROMPT, seed=100 + arrival), list[tuple[float, int]]()
        # One token: the prefill worker's, delivered as the cache is committed; the 4,000-token sequence
        # never decodes here, so the window holds the landing alone.
        reply = await request(session, urls, workers.kv_port, f"big{arrival}", big, first, max_tokens=1)
        windows.append((sent, first[0][0] - reply["transfer_seconds"], first[0][0]))
        await asyncio.sleep(1.2)  # the next "before" second is clear of this arrival
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    samples = [gap for lines in streams for gap in gaps(lines)]

    def overlapping(phase: list[tuple[float, float]]) -> list[float]:
        return [itl for start, end, itl in samples if any(start < hi and end > lo for lo, hi in phase)]

    before = stats(overlapping([(sent - 1.0, sent) for sent, _, _ in windows]))
    landing = stats(overlapping([(begin, end) for _, begin, end in windows]))
    prefill_end = stats(overlapping([(begin - PREFILL_END_S, begin) for _, begin, _ in windows]))
    return {
        "itl_before": before,
        "itl_end_of_prefill": prefill_end,
        "itl_while_landing": landing,
        "p99_ratio": landing["p99"] / before["p99"],
        "p99_ratio_to_end_of_prefill": landing["p99"] / prefill_end["p99"],
        "transfer_ms": [1000 * (end - begin) for _, begin, end in windows],
        "timeline": [[(end, itl) for _, end, itl in gaps(lines)] for lines in streams],
        "windows": windows,
    }


async def run(args: argparse.Namespace, model: Path, workdir: Path) -> dict[str, Any]:
    trees = {"baseline": args.baseline.resolve(), "this_tree": HERE}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    os.sched_setaffinity(0, {0})  # the client shares core 0 with the prefill worker, never the decode core
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for index in range(args.rounds):
            for name, tree in trees.items():
                workers = Workers(tree, model, workdir)
                try:
                    result = await scenario(session, workers, args.arrivals)
                finally:
                    workers.stop()
                rounds[name].append(result)
                before, landing = result["itl_before"]["p99"], result["itl_while_landing"]["p99"]
                transfer = statistics.median(result["transfer_ms"])
                log(
                    f"round {index + 1} {name}: p99 ITL {before * 1000:.1f} ms before, {landing * 1000:.1f} "
                    f"ms while landing (x{result['p99_ratio']:.2f}; transfer {transfer:.1f} ms)"
                )
    for results in rounds.values():  # the plot draws the last round; earlier timelines would be megabytes
        for earlier in results[:-1]:
            del earlier["timeline"]
    return {
        name: {
            "p99_ratio_per_round": [r["p99_ratio"] for r in results],
            "median_p99_ratio": statistics.median(r["p99_ratio"] for r in results),
            "p99_ratio_to_end_of_prefill_per_round": [r["p99_ratio_to_end_of_prefill"] for r in results],
            "median_p99_ratio_to_end_of_prefill": statistics.median(
                r["p99_ratio_to_end_of_prefill"] for r in results
            ),
            "median_transfer_ms": statistics.median(ms for r in results for ms in r["transfer_ms"]),
            "rounds": results,
        }
        for name, results in rounds.items()
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 1, figsize=(10, 3 * len(results)))
    for axis, (name, data) in zip(axes, results.items(), strict=True):
        last = data["rounds"][-1]
        origin = last["windows"][0][0] - 4.0
        for series in last["timeline"]:
            axis.scatter([t - origin for t, _ in series], [itl * 1000 for _, itl in series], s=2)
        for _, begin, end in last["windows"]:
            axis.axvspan(begin - origin, end - origin, color="purple", alpha=0.3)
        axis.set_yscale("log")
        axis.set_ylabel("ITL (ms)")
        axis.set_title(
            f"{name}: p99 ITL while a {BIG_PROMPT}-token cache lands (purple) / before, per round: "
            + ", ".join(f"x{ratio:.2f}" for ratio in data["p99_ratio_per_round"]),
            fontsize=9,
        )
    axes[-1].set_xlabel("seconds (last round)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the previous release")
    parser.add_argument("--arrivals", type=int, default=8, help="big prompts per scenario")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each tree")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        model = write_tiny_model(workdir / "tiny")
        results = asyncio.run(run(args, model, workdir))
    results["machine"] = {"cores": os.cpu_count(), "load_average_after": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_landing.json").write_text(json.dumps(results, indent=1))
    plot({k: v for k, v in results.items() if k != "machine"}, args.out / "kv_landing.png")
    for name in ("baseline", "this_tree"):
        ratio = results[name]["median_p99_ratio"]
        control = results[name]["median_p99_ratio_to_end_of_prefill"]
        log(f"{name}: p99 ITL while the cache lands / before: {ratio:.2f}, / end of prefill: {control:.2f}")


if __name__ == "__main__":
    main()
