"""TTFT of a long prompt whose prefix is cached, from each tier, against the same prompt uncached.

    PYTHONPATH=worker python -m bench.prefix_cache [--rounds N]

One process, one engine (the tiny model, one thread), a `both` runtime per measurement. The prompt
has PROMPT tokens, of which the first PREFIX are shared with a request run before it (the cache holds
whole blocks: 218 blocks = 3,488 tokens of the 3,500). Scenarios, interleaved round by round so that
drift hits all alike:
- uncached: prefix caching off.
- device: the prefix's blocks are still on the device.
- host: a prompt that fills the pool (sized for one prompt) pushed them off; the host tier has them.
  Admitting the measured prompt then evicts that prompt's blocks in turn, synchronously, inside the
  measured TTFT (as on a full worker).
- disk: the same, with a host tier of 0 bytes and a disk tier in a temporary directory.
TTFT is `generate()` to its first token (max_tokens 1). Writes bench/results/prefix_cache.json and .png.
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
PROMPT, PREFIX, BLOCK = 4000, 3500, 16
SCENARIOS = ("uncached", "device", "host", "disk")


def tokens(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 300) for _ in range(count)]


async def ttft(engine: Any, scenario: str, seed: int, scratch: Path) -> float:
    from splitserve.contract.config import EngineConfig
    from splitserve.engine.params import GenerationRequest, SamplingParams
    from splitserve.engine.runtime import EngineRuntime
    from splitserve.serving.metrics import Metrics

    blocks = PROMPT // BLOCK + 3  # one prompt's blocks, and the 1 % watermark of 2 blocks
    settings: dict[str, Any] = {"enable_prefix_caching": scenario != "uncached"}
    if scenario == "host":
        settings["kv_host_bytes"] = 1 << 30
    if scenario == "disk":
        settings["kv_disk_path"] = str(scratch / f"disk-{seed}")
    config = EngineConfig(
        model="tiny",
        block_size=BLOCK,
        prefill_chunk_size=512,
        kv_cache_bytes=blocks * BLOCK * engine.loaded.layout.bytes_per_token,
        **settings,
    )
    metrics = Metrics("bench", "both")
    runtime = EngineRuntime(engine, config, "both", metrics)
    prefix = tokens(PREFIX, seed)
    sampling = SamplingParams(temperature=0.0, max_tokens=1)

    async def run(prompt: list[int], rid: str, params: SamplingParams = sampling) -> float:
        started = time.perf_counter()
        request = GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), sampling=params)
        async for chunk in runtime.generate(request):
            if params is sampling or chunk.finish_reason is not None:
                break
        return time.perf_counter() - started

    await runtime.start()
    try:
        await run(prefix + tokens(PROMPT - PREFIX, seed + 1), "warm")
        if scenario in ("host", "disk"):
            # The largest admissible prompt, then decoding into the last free blocks: every block of
            # the pool is taken, so the whole prefix leaves the device.
            longest = (blocks - 2) * BLOCK
            fill = SamplingParams(temperature=0.0, max_tokens=2 * BLOCK, min_tokens=2 * BLOCK)
            await run(tokens(longest, seed + 2), "evict", fill)
        elapsed = await run(prefix + tokens(PROMPT - PREFIX, seed + 3), "measured")
    finally:
        await runtime.close()
    hits = {
        tier: metrics.registry.get_sample_value(
            "splitserve_prefix_cache_hits_total", {"pool": "bench", "role": "both", "tier": tier}
        )
        for tier in ("device", "host", "disk")
    }
    expected = {"device": 0.0, "host": 0.0, "disk": 0.0}
    if scenario != "uncached":
        expected[scenario] = float(PREFIX // BLOCK * BLOCK)
    if hits != expected:
        raise RuntimeError(f"{scenario}: cache hits {hits}, expected {expected}")
    return elapsed


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    ratios = [summary[s]["ratio"] for s in SCENARIOS]
    axis.bar(SCENARIOS, ratios, color=["C7", "C0", "C1", "C2"])
    axis.axhline(0.125, color="k", linestyle=":", label="500 of 4,000 tokens computed")
    axis.set(ylabel="TTFT / uncached TTFT (median)", title="4,000-token prompt, 3,500 cached")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch

    from splitserve.contract.config import EngineConfig
    from splitserve.engine.forward import Engine
    from splitserve.engine.loader import load_model
    from splitserve.engine.tiny_model import write_tiny_model

    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        engine = Engine(load_model(EngineConfig(model=str(write_tiny_model(root / "tiny")), threads=1)))
        asyncio.run(ttft(engine, "uncached", 0, root))  # warm-up
        for round_index in range(args.rounds):
            order = SCENARIOS if round_index % 2 == 0 else SCENARIOS[::-1]
            for scenario in order:
                runs[scenario].append(asyncio.run(ttft(engine, scenario, 10 * round_index + 1, root)))
    uncached = statistics.median(runs["uncached"])
    summary = {
        s: {"median_seconds": statistics.median(runs[s]), "ratio": statistics.median(runs[s]) / uncached}
        for s in SCENARIOS
    }
    RESULTS.mkdir(exist_ok=True)
    result = {"prompt": PROMPT, "prefix": PREFIX, "block_size": BLOCK, "summary": summary, "runs": runs}
    (RESULTS / "prefix_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, RESULTS / "prefix_cache.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
