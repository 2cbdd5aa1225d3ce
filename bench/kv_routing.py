"""Multi-turn chat over 2 prefill + 2 decode workers: KV-aware routing against least-loaded, same run.

    PYTHONPATH=worker python -m bench.kv_routing [--conversations 16] [--turns 8]

Each mode gets a fresh pool of processes on 127.0.0.1 (`splitserve up`'s LocalPool: router, 2 prefill
and 2 decode workers, the tiny model, one thread each, the default engine and routing settings but
`routing.strategy`). CONVERSATIONS chats run at once; each starts from its own system prompt and, turn
after turn and a think time, resends its whole history plus a new user message (greedy answers of
ANSWER tokens, sent as token ids through the official `openai` client, streaming). Reported per mode:
- TTFT p50/p90 over every turn, as the client sees it;
- KV bytes moved prefill -> decode (the decode workers' splitserve_kv_transfer_bytes_total);
- prefill placements (the router's splitserve_prefills_total: remote vs local);
- prefix hit ratio: prompt tokens the chosen decode worker already held (its prefix-cache hits when it
  prefilled locally, its pinned blocks when KV was handed off) over all prompt tokens, against an
  oracle that knows every cache and never loses a block: each turn, every full block of the previous
  turn's prompt + answer (but the last answer token, never computed) is held somewhere.
Writes bench/results/kv_routing.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# A turn's new tokens (the last answer and the next question, 224) stay under routing's default
# local_prefill_max_tokens (256): on the worker holding the history they are prefilled there.
SYSTEM, USER, ANSWER = 1024, 128, 96
# Before each turn a user thinks for up to this long (uniform, seeded): without it every conversation
# would send its turns in lockstep, a pattern that lets even least-loaded keep each on one worker.
THINK_SECONDS = 3.0
MODES = ("least-loaded", "kv-aware")
BLOCK = 16  # EngineConfig's default block size, which the pool uses


async def conversation(api: Any, index: int, turns: int, ttfts: list[float], oracle: list[int]) -> int:
    """One chat, turn after turn; appends each turn's TTFT and the oracle's hit; returns prompt tokens."""
    rng = random.Random(index)
    history = [rng.randrange(4, 300) for _ in range(SYSTEM)]
    held, sent = 0, 0  # tokens of the history some worker has computed
    for _ in range(turns):
        await asyncio.sleep(rng.uniform(0, THINK_SECONDS))  # the user reads and types: turns interleave
        history += [rng.randrange(4, 300) for _ in range(USER)]
        oracle.append(held // BLOCK * BLOCK)
        sent += len(history)
        started, first = time.perf_counter(), True
        stream = await api.completions.create(
            model="tiny",
            prompt=history,
            max_tokens=ANSWER,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": ANSWER, "return_token_ids": True},
        )
        answer: list[int] = []
        async for chunk in stream:
            for choice in chunk.choices:
                ids = getattr(choice, "token_ids", None) or []
                if first and ids:
                    ttfts.append(time.perf_counter() - started)
                    first = False
                answer += ids
        history += answer
        held = len(history) - 1
    return sent


async def scrape(url: str) -> dict[str, float]:
    """A process's /metrics as {series with labels: value}."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as reply:
        body = await reply.text()
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def total(samples: list[dict[str, float]], name: str, **labels: str) -> float:
    """Sum over processes of one metric's series that carry `labels`."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        value
        for process in samples
        for series, value in process.items()
        if series.split("{")[0] == name and all(label in series for label in wanted)
    )


async def run_mode(model: Path, workdir: Path, mode: str, conversations: int, turns: int) -> dict[str, Any]:
    import openai

    from splitserve.contract.config import EngineConfig, RoutingConfig
    from splitserve.local.pool import LocalPool, free_port

    config = EngineConfig(
        model=str(model),
        served_model_name="tiny",
        max_model_len=4096,
        kv_cache_bytes=256 << 20,
        routing=RoutingConfig(strategy=mode),
    )
    threads: dict[Any, int | None] = {"prefill": 1, "decode": 1}
    pool = LocalPool(
        f"bench-{mode}", config, workdir / mode, free_port(), threads=threads, progress=lambda _: None
    )
    await pool.start(prefill=2, decode=2)
    api = openai.AsyncOpenAI(base_url=pool.url + "/v1", api_key="-", max_retries=0, timeout=300)
    try:
        ttfts: list[float] = []
        oracle: list[int] = []
        started = time.perf_counter()
        sent = await asyncio.gather(
            *(conversation(api, i, turns, ttfts, oracle) for i in range(conversations))
        )
        elapsed = time.perf_counter() - started
        decode = [await scrape(worker.url) for worker in pool.workers["decode"]]
        router = [await scrape(pool.url)]
    finally:
        await api.close()
        await pool.stop()
    prompt_tokens = sum(sent)
    hits = total(decode, "splitserve_prefix_cache_hits_total")
    pinned = total(decode, "splitserve_kv_handoff_blocks_total", source="cached") * BLOCK
    deciles = statistics.quantiles(ttfts, n=10)
    return {
        "ttft_p50_seconds": statistics.median(ttfts),
        "ttft_p90_seconds": deciles[8],
        "kv_bytes_moved": total(decode, "splitserve_kv_transfer_bytes_total"),
        "prefills": {p: total(router, "splitserve_prefills_total", placement=p) for p in ("remote", "local")},
        "prefix_hit_ratio": (hits + pinned) / prompt_tokens,
        "oracle_hit_ratio": sum(oracle) / prompt_tokens,
        "prompt_tokens": prompt_tokens,
        "requests": len(ttfts),
        "wall_seconds": elapsed,
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ttft, moved) = plt.subplots(1, 2, figsize=(9, 4))
    for offset, key in ((-0.2, "ttft_p50_seconds"), (0.2, "ttft_p90_seconds")):
        ttft.bar([i + offset for i in range(2)], [summary[m][key] * 1000 for m in MODES], 0.4, label=key[5:8])
    labels = [
        f"{m}\nhit {summary[m]['prefix_hit_ratio']:.2f} (oracle {summary[m]['oracle_hit_ratio']:.2f})"
        for m in MODES
    ]
    ttft.set_xticks(range(2), labels)
    ttft.set(ylabel="TTFT (ms)", title="Chat replay, 2 prefill + 2 decode")
    ttft.legend()
    moved.bar(range(2), [summary[m]["kv_bytes_moved"] / 2**20 for m in MODES], 0.5)
    moved.set_xticks(range(2), MODES)
    moved.set(ylabel="MiB", title="KV moved prefill -> decode")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    args = parser.parse_args()
    from splitserve.engine.tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        model = write_tiny_model(Path(scratch) / "tiny")
        summary = {
            mode: asyncio.run(run_mode(model, Path(scratch), mode, args.conversations, args.turns))
            for mode in MODES
        }
    least, aware = summary["least-loaded"], summary["kv-aware"]
    result = {
        "conversations": args.conversations,
        "turns": args.turns,
        "tokens": {"system": SYSTEM, "user": USER, "answer": ANSWER},
        "summary": summary,
        "ttft_p50_ratio": least["ttft_p50_seconds"] / aware["ttft_p50_seconds"],
        "kv_bytes_ratio": least["kv_bytes_moved"] / max(aware["kv_bytes_moved"], 1.0),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv_routing.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, RESULTS / "kv_routing.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
