"""Measure splitserve's engine on the tiny model and write the autoscale bench's capacity file.

The bench's capacity model (see capacity.py for the schema) needs two curves: how long a prefill of
L prompt tokens takes, and how long one decode step over a batch of b sequences takes. Both are
measured on the worker's own engine (`splitserve.engine.Engine`: chunked `prefill`, batched
`decode_one_token` over per-sequence KV caches), loading the model `splitserve make-tiny-model`
writes, float32, one torch thread, as a pinned CPU worker runs it.

    PYTHONPATH=operator:worker python -m bench.autoscale.measure_capacity \
        --out bench/autoscale/results/capacity-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from splitserve.contract.config import EngineConfig
from splitserve.engine.forward import Engine
from splitserve.engine.loader import CPU_KV_BUDGET_BYTES, load_model
from splitserve.engine.tiny_model import write_tiny_model

PROMPT_LENGTHS = (16, 32, 64, 128, 256, 512)
BATCH_SIZES = tuple(range(1, 33))
CHUNK = 512  # the worker's default prefill chunk size


def time_prefill(engine: Engine, length: int, repeats: int) -> float:
    """Median seconds to prefill `length` prompt tokens (batch 1), as a prefill worker runs it."""
    tokens = [4 + (i * 7919) % 300 for i in range(length)]
    samples = []
    pool = engine.new_pool(block_size=16)
    for i in range(repeats + 2):  # two warm-up runs
        kv = pool.sequence()
        start = time.perf_counter()
        for offset in range(0, length, CHUNK):
            engine.prefill(kv, tokens[offset : offset + CHUNK])
        kv.release()
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_decode_step(engine: Engine, batch: int, context: int, steps: int) -> float:
    """Median seconds of one decode step over `batch` sequences that already hold `context` tokens."""
    pool = engine.new_pool(block_size=16)
    kvs = [pool.sequence() for _ in range(batch)]
    for kv in kvs:
        engine.prefill(kv, [5] * context)
    tokens = [7] * batch
    samples = []
    for i in range(steps + 2):
        start = time.perf_counter()
        tokens = engine.decode_one_token(kvs, tokens).argmax(-1).tolist()
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(repeats: int, steps: int, context: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_tiny_model(Path(scratch) / "tiny")
        engine = Engine(load_model(EngineConfig(model=str(model_dir), threads=1)))
    layout = engine.loaded.layout
    prefill, decode = [], []
    for length in PROMPT_LENGTHS:
        seconds = time_prefill(engine, length, repeats)
        prefill.append({"prompt_tokens": length, "seconds": round(seconds, 6)})
        print(f"prefill {length:4d} tokens: {seconds * 1e3:7.2f} ms", file=sys.stderr)
    time_decode_step(engine, max(BATCH_SIZES), context, steps)  # warm the allocator up
    for batch in BATCH_SIZES:
        seconds = time_decode_step(engine, batch, context, steps)
        decode.append({"batch_size": batch, "step_seconds": round(seconds, 6)})
        print(f"decode batch {batch:2d}: {seconds * 1e3:6.2f} ms/step", file=sys.stderr)
    return {
        "schema": "splitserve.capacity/v1",
        "description": "splitserve's engine on the tiny model (`splitserve make-tiny-model`: Llama, hidden "
        f"256, 4 layers, 8/4 heads, head_dim 32), float32, 1 CPU thread; decode context {context} tokens",
        "measured_on": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        },
        "prefill": {"points": prefill},
        "decode": {"context_tokens": context, "max_num_seqs": max(BATCH_SIZES), "points": decode},
        # The worker's CPU default KV budget over the model's bytes per token (the seeds' formula).
        "kv_capacity_tokens": CPU_KV_BUDGET_BYTES // layout.bytes_per_token,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Capacity JSON to write.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed prefills per prompt length.")
    parser.add_argument("--steps", type=int, default=24, help="Timed decode steps per batch size.")
    parser.add_argument("--context", type=int, default=128, help="Tokens already in each decode sequence.")
    args = parser.parse_args()
    result = measure(args.repeats, args.steps, args.context)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
