"""int8 KV against the model dtype: bytes per token, streams held in one KV budget, KV transfer time.

    PYTHONPATH=worker python -m bench.int8_kv [--reps N]

1. Bytes per token (`KVLayout.bytes_per_token`, what the pool, the tiers and the wire count) of the
   tiny test model and of two real layouts, int8 against bf16 and fp32.
2. Streams held at one `kvCacheBytes`, through the real runtime on the tiny model: k requests at once
   (distinct 96-token prompts, 32 output tokens each, prefix caching off); the largest k whose streams
   all run at once with no preemption. The budget is what bf16 needs for exactly 8 such streams. The
   same count on a Llama-3-8B-shaped pool (32 layers, 8 KV heads, head_dim 128), by admitting 1,024-token
   sequences into the real allocator until it refuses (the budget holds 32 in bf16). A row's 2-byte
   scale costs 2 / (2 * head_dim) of bf16's bytes, so int8 holds 1.88x bf16's streams at head_dim 32
   and 1.97x at 128 (block rounding aside).
3. What int8 costs in compute on CPU: decode tokens/s of the tiny model (fp32 weights) with fp32 and
   int8 KV, 16 streams of 256-token contexts (bench/paged_kv.py's measure: CPU time), 5 interleaved rounds.
4. KV transfer time of a 4,000-token cache over loopback: the receiver is bench/kv_transfer.py's (a
   child process landing frames in a real pool, pinned to the last core), interleaved repetitions,
   int8 against the model dtype, for the tiny model (fp32) and the Llama-3-8B shape (bf16).
Writes bench/results/int8_kv.json and int8_kv.png; runs in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.kv_transfer import SENDER_CORE, Case, _pin, _serve
from splitserve.engine.blocks import NoFreeBlocksError
from splitserve.engine.kv_cache import KVLayout, KVPool
from splitserve.transfer.frames import KVHeader
from splitserve.transfer.tcp import TcpKVSender

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
LAYOUTS = {  # (layers, kv heads, head_dim)
    "tiny test model": (4, 4, 32),
    "Llama-3.2-1B shape": (16, 8, 64),
    "Llama-3-8B shape": (32, 8, 128),
}
KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
PROMPT, OUTPUT, BF16_STREAMS = 96, 32, 8
LONG_SEQUENCE, LONG_BF16_STREAMS = 1024, 32
TRANSFER_TOKENS = 4000


def layout(name: str, dtype: torch.dtype) -> KVLayout:
    layers, heads, head_dim = LAYOUTS[name]
    return KVLayout(layers, heads, head_dim, dtype)


def bytes_per_token() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name in LAYOUTS:
        row: dict[str, Any] = {key: layout(name, dtype).bytes_per_token for key, dtype in KV_DTYPES.items()}
        row["int8_over_bf16"] = round(row["int8"] / row["bf16"], 4)
        row["int8_over_fp32"] = round(row["int8"] / row["fp32"], 4)
        table[name] = row
    return table


async def run_together(engine: Any, config: Any, streams: int) -> tuple[int, int]:
    """(most streams running at once, preemptions) for `streams` requests submitted together."""
    from splitserve.engine.params import GenerationRequest, SamplingParams
    from splitserve.engine.runtime import EngineRuntime
    from splitserve.serving.metrics import Metrics

    metrics = Metrics("bench", "both")
    runtime = EngineRuntime(engine, config, "both", metrics)
    sampling = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    peak = 0

    async def client(index: int) -> None:
        nonlocal peak
        prompt = tuple(4 + (index * 37 + i * 11) % 296 for i in range(PROMPT))
        request = GenerationRequest(request_id=f"s{index}", prompt_token_ids=prompt, sampling=sampling)
        async for _ in runtime.generate(request):
            peak = max(peak, runtime.load().running)

    await runtime.start()
    try:
        await asyncio.gather(*(client(i) for i in range(streams)))
    finally:
        await runtime.close()
    preempted = metrics.registry.get_sample_value(
        "splitserve_preemptions_total", {"pool": "bench", "role": "both"}
    )
    return peak, int(preempted or 0)


def streams_held_by_runtime(model: Path, budget: int) -> dict[str, int]:
    """Per KV dtype: the largest k whose k streams all ran at once without a preemption."""
    from splitserve.contract.config import EngineConfig
    from splitserve.engine.forward import Engine
    from splitserve.engine.loader import load_model

    held: dict[str, int] = {}
    for name, (model_dtype, kv_dtype) in {
        "fp32": ("float32", "auto"),
        "bf16": ("bfloat16", "auto"),
        "int8": ("float32", "int8"),
    }.items():
        config = EngineConfig(
            model=str(model),
            threads=1,
            dtype=model_dtype,
            kv_cache_dtype=kv_dtype,
            kv_cache_bytes=budget,
            enable_prefix_caching=False,
            block_size=BLOCK,
            max_num_seqs=256,
        )
        engine = Engine(load_model(config))
        streams = 1
        while streams <= 64:
            peak, preempted = asyncio.run(run_together(engine, config, streams))
            print(f"  {name}: {streams} streams -> {peak} at once, {preempted} preemptions", flush=True)
            if peak < streams or preempted:
                break
            streams += 1
        held[name] = streams - 1
    return held


def decode_speed(model: Path, rounds: int = 5) -> dict[str, Any]:
    """Decode tokens/s (CPU time) with fp32 and int8 KV, rounds interleaved; medians and their ratio."""
    from bench.paged_kv import decode_rate
    from splitserve.contract.config import EngineConfig
    from splitserve.engine.forward import Engine
    from splitserve.engine.loader import load_model

    engines = {
        kind: Engine(load_model(EngineConfig(model=str(model), threads=1, kv_cache_dtype=config)))
        for kind, config in (("fp32", "auto"), ("int8", "int8"))
    }
    rates: dict[str, list[float]] = {kind: [] for kind in engines}
    for _ in range(rounds):
        for kind, engine in engines.items():
            rates[kind].append(decode_rate(engine, 16))
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    return {
        "streams": 16,
        "context_tokens": 256,
        "tokens_per_s_median": medians,
        "int8_over_fp32": medians["int8"] / medians["fp32"],
        "samples": rates,
    }


def streams_admitted(pool_layout: KVLayout, budget: int) -> int:
    """Sequences of LONG_SEQUENCE distinct tokens the real allocator admits into a pool of `budget` bytes
    (pages of an `empty` CPU tensor that are never written cost no memory)."""
    pool = KVPool.for_budget(pool_layout, budget, BLOCK, torch.device("cpu"))
    admitted = 0
    while True:
        try:
            pool.sequence().grow(LONG_SEQUENCE)
        except NoFreeBlocksError:
            return admitted
        admitted += 1


def transfer_times(reps: int) -> dict[str, dict[str, Any]]:
    """Median and samples of the wall time of one 4,000-token transfer, per layout and KV dtype."""
    cases = {
        ("tiny test model", "fp32"): torch.float32,
        ("tiny test model", "int8"): torch.int8,
        ("Llama-3-8B shape", "bf16"): torch.bfloat16,
        ("Llama-3-8B shape", "int8"): torch.int8,
    }
    context = mp.get_context("spawn")
    ports = context.Queue()
    child = context.Process(target=_serve, args=(ports, "protocol"), daemon=True)
    child.start()
    try:
        port, _ = ports.get(timeout=60)
        _pin(SENDER_CORE)
        sender, target = TcpKVSender(), f"127.0.0.1:{port}"
        prepared = {}
        for (name, kind), dtype in cases.items():
            layers, heads, head_dim = LAYOUTS[name]
            kv = Case(name, layers, heads, head_dim, TRANSFER_TOKENS, dtype).sequence()
            shape = (layers, heads, head_dim, dtype)
            prepared[name, kind] = (kv, KVHeader.for_blocks("bench", 1, TRANSFER_TOKENS, shape, BLOCK))
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
        with asyncio.Runner() as runner:
            for rep in range(reps + 1):  # the first is a warm-up
                for key, (kv, header) in prepared.items():
                    started = time.perf_counter()
                    runner.run(sender.send(target, header, kv))
                    if rep:
                        samples[key].append(time.perf_counter() - started)
    finally:
        child.kill()
    out: dict[str, dict[str, Any]] = {}
    for (name, kind), values in samples.items():
        nbytes = prepared[name, kind][1].total_nbytes
        median = statistics.median(values)
        out.setdefault(name, {})[kind] = {
            "bytes": nbytes,
            "median_s": median,
            "min_s": min(values),
            "median_GBps": nbytes / median / 1e9,
            "samples_s": values,
        }
    return out


def paired_speedups(transfers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layout: the median over repetitions of (model-dtype time / int8 time). Repetitions interleave,
    so the two times of one repetition share that moment's load on this shared machine."""
    speedups = {}
    for name, kinds in transfers.items():
        (model_dtype,) = (kind for kind in kinds if kind != "int8")
        pairs = zip(kinds[model_dtype]["samples_s"], kinds["int8"]["samples_s"], strict=True)
        speedups[name] = {"over": model_dtype, "median": statistics.median(a / b for a, b in pairs)}
    return speedups


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (sizes, held, moved) = plt.subplots(1, 3, figsize=(14, 4))
    names = list(LAYOUTS)
    for offset, kind in zip((-0.27, 0, 0.27), KV_DTYPES, strict=True):
        values = [result["bytes_per_token"][name][kind] / 1024 for name in names]
        sizes.bar([i + offset for i in range(len(names))], values, 0.27, label=kind)
    sizes.set_xticks(range(len(names)), [n.replace(" shape", "\nshape") for n in names], fontsize=8)
    sizes.set(ylabel="KiB per token (log)", yscale="log", title="KV bytes per token")
    sizes.legend()
    streams = result["streams_held"]
    groups = {"tiny model, runtime": streams["runtime"], "Llama-3-8B pool, allocator": streams["allocator"]}
    for offset, kind in zip((-0.27, 0, 0.27), KV_DTYPES, strict=True):
        values = [group[kind] for group in groups.values()]
        bars = held.bar([i + offset for i in range(len(groups))], values, 0.27, label=kind)
        held.bar_label(bars, fontsize=8)
    held.set_xticks(range(len(groups)), list(groups), fontsize=8)
    held.set(ylabel="streams held at once", title="Streams in one KV budget")
    held.legend()
    transfers = result["transfer_4000_tokens"]
    labels, times = [], []
    for name, kinds in transfers.items():
        for kind, entry in kinds.items():
            labels.append(f"{name.replace(' shape', '')}\n{kind}, {entry['bytes'] / 1e6:.0f} MB")
            times.append(entry["median_s"] * 1e3)
    bars = moved.bar(range(len(labels)), times, color=["C0", "C2", "C1", "C2"])
    moved.bar_label(bars, fmt="%.0f ms", fontsize=8)
    moved.set_xticks(range(len(labels)), labels, fontsize=7)
    moved.set(ylabel="ms (median)", yscale="log", title="KV transfer of 4,000 tokens, loopback")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=7, help="repetitions of each transfer")
    args = parser.parse_args()
    from splitserve.engine.tiny_model import write_tiny_model

    torch.set_num_threads(1)
    result: dict[str, Any] = {"bytes_per_token": bytes_per_token()}
    tiny_bf16 = layout("tiny test model", torch.bfloat16)
    budget = BF16_STREAMS * BLOCK * -(-(PROMPT + OUTPUT) // BLOCK) * tiny_bf16.bytes_per_token
    with tempfile.TemporaryDirectory() as scratch:
        print("streams held, through the runtime:", flush=True)
        model = write_tiny_model(Path(scratch) / "tiny")
        runtime = streams_held_by_runtime(model, budget)
        print("decode speed:", flush=True)
        result["decode_speed"] = decode_speed(model)
    long_budget = (
        LONG_BF16_STREAMS * LONG_SEQUENCE * layout("Llama-3-8B shape", torch.bfloat16).bytes_per_token
    )
    allocator = {
        kind: streams_admitted(layout("Llama-3-8B shape", dtype), long_budget)
        for kind, dtype in KV_DTYPES.items()
    }
    result["streams_held"] = {
        "runtime": runtime,
        "runtime_budget_bytes": budget,
        "runtime_stream": {"prompt_tokens": PROMPT, "output_tokens": OUTPUT},
        "allocator": allocator,
        "allocator_budget_bytes": long_budget,
        "allocator_sequence_tokens": LONG_SEQUENCE,
        "int8_over_bf16": {
            "runtime": round(runtime["int8"] / runtime["bf16"], 3),
            "allocator": round(allocator["int8"] / allocator["bf16"], 3),
        },
    }
    print("transfers:", flush=True)
    result["transfer_4000_tokens"] = transfer_times(args.reps)
    result["transfer_int8_speedup"] = paired_speedups(result["transfer_4000_tokens"])
    result["machine"] = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8_kv.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "int8_kv.png")
    summary = {key: value for key, value in result.items() if key != "transfer_4000_tokens"}
    print(json.dumps(summary, indent=2))
    for name, kinds in result["transfer_4000_tokens"].items():
        print(name, {kind: f"{entry['median_s'] * 1e3:.1f} ms" for kind, entry in kinds.items()})


if __name__ == "__main__":
    main()
