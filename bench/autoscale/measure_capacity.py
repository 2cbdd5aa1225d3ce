"""Measure the tiny model's prefill and decode cost on one CPU thread and write a capacity file.

The bench's capacity model (see capacity.py for the schema) needs two curves: how long a prefill of
L prompt tokens takes, and how long one decode step over a batch of b sequences takes. Until the
worker benchmarks land, this script measures them directly on the model the tests use: a randomly
initialised `LlamaForCausalLM` (hidden 256, 4 layers, 8 heads / 4 KV heads, vocab 1024), float32,
with HF's DynamicCache, one torch thread.

    PYTHONPATH=operator:worker python -m bench.autoscale.measure_capacity \
        --out bench/autoscale/results/capacity-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

PROMPT_LENGTHS = (16, 32, 64, 128, 256, 512)
BATCH_SIZES = tuple(range(1, 33))
CPU_KV_BYTES = 2 << 30


LAYERS, KV_HEADS, HEAD_DIM = 4, 4, 32
# 2 (K and V) x layers x KV heads x head_dim x 4 bytes (float32).
KV_BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4


def tiny_model() -> tuple[LlamaForCausalLM, LlamaConfig]:
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=1024,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # random init, float32 (torch's default dtype)
    torch.nn.Module.eval(model)
    return model, config


def time_prefill(model: LlamaForCausalLM, config: LlamaConfig, length: int, repeats: int) -> float:
    """Median seconds of one prefill forward of `length` tokens (batch 1), as a prefill worker runs it."""
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    samples = []
    for i in range(repeats + 2):  # two warm-up runs
        cache = DynamicCache(config=config)
        start = time.perf_counter()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_decode_step(
    model: LlamaForCausalLM, config: LlamaConfig, batch: int, context: int, steps: int
) -> float:
    """Median seconds of one decode step over `batch` sequences that already hold `context` tokens."""
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, config.vocab_size, (batch, context), generator=generator)
    cache = DynamicCache(config=config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    samples = []
    for i in range(steps + 2):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(repeats: int, steps: int, context: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, config = tiny_model()
    prefill, decode = [], []
    with torch.inference_mode():
        for length in PROMPT_LENGTHS:
            seconds = time_prefill(model, config, length, repeats)
            prefill.append({"prompt_tokens": length, "seconds": round(seconds, 6)})
            print(f"prefill {length:4d} tokens: {seconds * 1e3:7.2f} ms", file=sys.stderr)
        time_decode_step(model, config, max(BATCH_SIZES), context, steps)  # warm the allocator up
        for batch in BATCH_SIZES:
            seconds = time_decode_step(model, config, batch, context, steps)
            decode.append({"batch_size": batch, "step_seconds": round(seconds, 6)})
            print(f"decode batch {batch:2d}: {seconds * 1e3:6.2f} ms/step", file=sys.stderr)
    return {
        "schema": "splitserve.capacity/v1",
        "description": "tiny random LlamaForCausalLM (hidden 256, 4 layers, 8/4 heads, head_dim 32, "
        f"vocab 1024), float32, 1 CPU thread, HF DynamicCache; decode context {context} tokens",
        "measured_on": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": 1,
        },
        "prefill": {"points": prefill},
        "decode": {"context_tokens": context, "max_num_seqs": max(BATCH_SIZES), "points": decode},
        # The worker's CPU default KV budget (2 GiB) over the model's bytes per token.
        "kv_capacity_tokens": CPU_KV_BYTES // KV_BYTES_PER_TOKEN,
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
