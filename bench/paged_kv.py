"""Paged KV cache against the per-sequence reservation it replaced, in one run on the same core.

    PYTHONPATH=worker python -m bench.paged_kv [--rounds N] [--base COMMIT]

"before" is the worker package of `--base` (the last commit with per-sequence KV tensors and a
token-reservation budget), exported with `git archive`; "after" is this checkout. Each round starts
one child process per side (pinned to core 0, one thread), alternating, so drift hits both alike:
1. Decode tokens/s at 1, 16 and 64 streams, each holding a 256-token context (the bare engine:
   prefill, then timed decode steps).
2. Streams held at one `kvCacheBytes`: 48 requests with max_tokens 2,048 whose clients stop reading
   after 128 tokens (as a chat user does), through the runtime; the most streams running at once.
   Static reservation must hold prompt + 2,048 tokens per stream, the pool only what was produced.
Writes bench/results/paged_kv.json and paged_kv.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
BASE_COMMIT = "89c48b9"  # per-sequence KV tensors, KVBudget of reserved tokens
STREAMS = (1, 16, 64)
CONTEXT = 256
STEPS = {1: 100, 16: 40, 64: 16}
HELD_REQUESTS, HELD_PROMPT, HELD_MAX_TOKENS, HELD_READ = 48, 64, 2048, 128
HELD_STATIC_STREAMS = 4  # the budget is sized so that static reservation holds this many


def _sequences(engine: Any, count: int, capacity: int) -> list[Any]:
    """Empty KV caches in whichever API the measured tree has."""
    new_kv = getattr(engine, "new_kv", None)
    if new_kv is not None:  # before: one tensor per sequence, sized for its whole life
        return [new_kv(capacity) for _ in range(count)]
    pool = engine.new_pool(16)
    return [pool.sequence() for _ in range(count)]


def decode_rate(engine: Any, streams: int) -> float:
    """Tokens/s of decode steps over `streams` sequences of CONTEXT tokens."""
    steps = STEPS[streams]
    kvs = _sequences(engine, streams, CONTEXT + steps + 4)
    for index, kv in enumerate(kvs):
        engine.prefill(kv, [4 + (index + i) % 300 for i in range(CONTEXT)])
    tokens = [7] * streams
    engine.decode_one_token(kvs, tokens)  # warm-up
    started = time.process_time()
    for _ in range(steps):
        tokens = engine.decode_one_token(kvs, tokens).argmax(-1).tolist()
    return streams * steps / (time.process_time() - started)


async def streams_held(engine: Any, budget: int) -> int:
    """Peak running streams of the runtime at `budget` KV bytes (see the module docstring)."""
    from splitserve.contract.config import EngineConfig
    from splitserve.engine.params import GenerationRequest, SamplingParams
    from splitserve.engine.runtime import EngineRuntime
    from splitserve.serving.metrics import Metrics

    engine.loaded.kv_budget_bytes = budget  # "before" sizes its budget from here, "after" from config
    config = EngineConfig(model="tiny", kv_cache_bytes=budget, max_num_seqs=256, prefill_chunk_size=512)
    runtime = EngineRuntime(engine, config, "both", Metrics("bench", "both"))
    await runtime.start()
    peak = 0
    sampling = SamplingParams(temperature=0.0, max_tokens=HELD_MAX_TOKENS, ignore_eos=True)

    async def client(index: int) -> None:
        nonlocal peak
        prompt = tuple(4 + (index * 31 + i) % 300 for i in range(HELD_PROMPT))
        chunks = runtime.generate(
            GenerationRequest(request_id=f"h{index}", prompt_token_ids=prompt, sampling=sampling)
        )
        received = 0
        async for _ in chunks:
            peak = max(peak, runtime.load().running)
            received += 1
            if received >= HELD_READ:
                break
        await chunks.aclose()

    try:
        await asyncio.gather(*(client(i) for i in range(HELD_REQUESTS)))
    finally:
        await runtime.close()
    return peak


def measure_child() -> dict[str, Any]:
    """One side's measurements, in this (child) process."""
    import torch

    from splitserve.contract.config import EngineConfig
    from splitserve.engine.forward import Engine
    from splitserve.engine.loader import load_model

    torch.set_num_threads(1)
    engine = Engine(load_model(EngineConfig(model=os.environ["PAGED_BENCH_MODEL"], threads=1)))
    rates = {str(streams): decode_rate(engine, streams) for streams in STREAMS}
    bytes_per_token = engine.loaded.layout.bytes_per_token
    budget = HELD_STATIC_STREAMS * (HELD_PROMPT + HELD_MAX_TOKENS) * bytes_per_token
    held = asyncio.run(streams_held(engine, budget))
    return {"decode_tokens_per_s": rates, "streams_held": held, "kv_cache_bytes": budget}


def run_side(worker: Path, model: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{worker}{os.pathsep}{REPO}", PAGED_BENCH_MODEL=str(model))
    command = ["taskset", "-c", "0", sys.executable, "-m", "bench.paged_kv", "--child"]
    output = subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def median_rate(side: str, streams: int) -> float:
        return float(statistics.median(run["decode_tokens_per_s"][str(streams)] for run in runs[side]))

    decode = {
        str(streams): {
            "before": round(median_rate("before", streams), 1),
            "after": round(median_rate("after", streams), 1),
            "after_over_before": round(median_rate("after", streams) / median_rate("before", streams), 3),
        }
        for streams in STREAMS
    }
    held = {side: max(run["streams_held"] for run in runs[side]) for side in runs}
    return {
        "decode_tokens_per_s_median": decode,
        "streams_held": {**held, "after_over_before": round(held["after"] / held["before"], 2)},
        "kv_cache_bytes": runs["after"][0]["kv_cache_bytes"],
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, held) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(streams) for streams in STREAMS]
    positions = range(len(labels))
    decode = summary["decode_tokens_per_s_median"]
    for offset, side in ((-0.2, "before"), (0.2, "after")):
        rates.bar([p + offset for p in positions], [decode[s][side] for s in labels], 0.4, label=side)
    rates.set_xticks(list(positions), labels)
    rates.set(xlabel="concurrent streams", ylabel="decode tokens/s (1 core)", title="Decode speed")
    rates.legend()
    streams = summary["streams_held"]
    held.bar(["static reservation", "paged"], [streams["before"], streams["after"]], color=["C0", "C1"])
    held.set(
        ylabel="streams running at once", title=f"Streams held at {summary['kv_cache_bytes'] >> 20} MiB KV"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default=BASE_COMMIT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child()))
        return
    from splitserve.engine.tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        archive = subprocess.run(
            ["git", "archive", args.base, "worker"], cwd=REPO, check=True, capture_output=True
        ).stdout
        (root / "base.tar").write_bytes(archive)
        with tarfile.open(root / "base.tar") as tar:
            tar.extractall(root / "base", filter="data")
        model = write_tiny_model(root / "tiny")
        trees = {"before": root / "base" / "worker", "after": REPO / "worker"}
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for round_index in range(args.rounds):
            for side in ("before", "after") if round_index % 2 == 0 else ("after", "before"):
                runs[side].append(run_side(trees[side], model))
    summary = summarize(runs)
    RESULTS.mkdir(exist_ok=True)
    result = {"base_commit": args.base, "rounds": args.rounds, "summary": summary, "runs": runs}
    (RESULTS / "paged_kv.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, RESULTS / "paged_kv.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
