"""A multi-turn chat replay on one worker, with the prefix cache and without.

    PYTHONPATH=worker python -m bench.chat_replay [--conversations 32] [--turns 6]

Each conversation starts from its own system prompt and, turn after turn, resends its whole history
plus a new user message, as chat clients do; the answer (greedy, ANSWER tokens) joins the history.
All conversations run at once on one `both` runtime (the tiny model, one thread, chunked prefill);
each mode starts a fresh runtime. Reported per mode: the prefix-cache hit ratio (hit tokens / prompt
tokens looked up) and TTFT p50/p90 over every turn. Writes bench/results/chat_replay.json and .png.
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
SYSTEM, USER, ANSWER = 128, 48, 24


async def replay(engine: Any, caching: bool, conversations: int, turns: int) -> dict[str, Any]:
    from splitserve.contract.config import EngineConfig
    from splitserve.engine.params import GenerationRequest, SamplingParams
    from splitserve.engine.runtime import EngineRuntime
    from splitserve.serving.metrics import Metrics

    config = EngineConfig(model="tiny", chunked_prefill=True, enable_prefix_caching=caching, max_num_seqs=64)
    metrics = Metrics("bench", "both")
    runtime = EngineRuntime(engine, config, "both", metrics)
    sampling = SamplingParams(temperature=0.0, max_tokens=ANSWER, min_tokens=ANSWER)
    ttfts: list[float] = []

    async def conversation(index: int) -> None:
        rng = random.Random(index)
        history = [rng.randrange(4, 300) for _ in range(SYSTEM)]
        for turn in range(turns):
            history += [rng.randrange(4, 300) for _ in range(USER)]
            request = GenerationRequest(
                request_id=f"c{index}t{turn}", prompt_token_ids=tuple(history), sampling=sampling
            )
            started = time.perf_counter()
            first = True
            async for chunk in runtime.generate(request):
                if first:
                    ttfts.append(time.perf_counter() - started)
                    first = False
                history += chunk.token_ids

    await runtime.start()
    try:
        started = time.perf_counter()
        await asyncio.gather(*(conversation(i) for i in range(conversations)))
        elapsed = time.perf_counter() - started
    finally:
        await runtime.close()
    labels = {"pool": "bench", "role": "both"}
    queried = metrics.registry.get_sample_value("splitserve_prefix_cache_queries_total", labels) or 0.0
    hit = (
        metrics.registry.get_sample_value("splitserve_prefix_cache_hits_total", {**labels, "tier": "device"})
        or 0.0
    )
    deciles = statistics.quantiles(ttfts, n=10)
    return {
        "hit_ratio": hit / queried if queried else 0.0,
        "ttft_p50_seconds": statistics.median(ttfts),
        "ttft_p90_seconds": deciles[8],
        "wall_seconds": elapsed,
        "requests": len(ttfts),
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    modes = ["without", "with"]
    for offset, key in ((-0.2, "ttft_p50_seconds"), (0.2, "ttft_p90_seconds")):
        axis.bar([i + offset for i in range(2)], [summary[m][key] * 1000 for m in modes], 0.4, label=key[5:8])
    axis.set_xticks(range(2), [f"{m} prefix cache\nhit ratio {summary[m]['hit_ratio']:.2f}" for m in modes])
    axis.set(ylabel="TTFT (ms)", title="Chat replay: every turn resends the history")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    import torch

    from splitserve.contract.config import EngineConfig
    from splitserve.engine.forward import Engine
    from splitserve.engine.loader import load_model
    from splitserve.engine.tiny_model import write_tiny_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        model = write_tiny_model(Path(scratch) / "tiny")
        engine = Engine(load_model(EngineConfig(model=str(model), threads=1)))
        summary = {
            mode: asyncio.run(replay(engine, mode == "with", args.conversations, args.turns))
            for mode in ("without", "with")
        }
    RESULTS.mkdir(exist_ok=True)
    result = {
        "conversations": args.conversations,
        "turns": args.turns,
        "tokens": {"system": SYSTEM, "user": USER, "answer": ANSWER},
        "summary": summary,
    }
    (RESULTS / "chat_replay.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, RESULTS / "chat_replay.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
