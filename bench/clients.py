"""The ecosystem's load generators, unmodified, against `splitserve up`: do their numbers agree with ours?

    python -m bench.clients    # ~4 min (+ ~2 GB of venvs the first time); bench/results/clients.{json,png}

NVIDIA's aiperf 0.13.0 and kubernetes-sigs' inference-perf 0.7.0 are pip-installed into venvs of their
own under ~/.cache/splitserve/bench-clients (Python 3.12; inference-perf needs it). guidellm is not:
it pulls CUDA torch (~6 GB); the requests it sends are test data (tests/worker/data/).

One `splitserve up` (the demo pool with autoscaling off: prefill 1, decode 1, the router) serves every
run. Each tool streams chat and completions with fixed output lengths (ignore_eos, min_tokens) and
server token counts; around each run the router's /metrics is read, so the tool's TTFT, ITL and TPOT
are compared with the router's own histograms over exactly that run (means from _sum/_count; the
router's TPOT is its mean ITL, since every request has the same length). From inference-perf's
record of every SSE event: events with text per generated token, and its gaps between events.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from splitserve.contract import names
from splitserve.local.pool import free_port

RESULTS = Path(__file__).parent / "results"
CACHE = Path("~/.cache/splitserve/bench-clients").expanduser()
TOOLS = {"aiperf": "aiperf==0.13.0", "inference-perf": "inference-perf==0.7.0"}
MODEL_DIR = Path("~/.cache/splitserve/tiny-model").expanduser()
DEMO = Path(__file__).parent.parent / "examples" / "local.yaml"
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def python312() -> str:
    pyenv = sorted(Path("/root/.pyenv/versions").glob("3.12*/bin/python3.12"))
    for candidate in [*map(str, pyenv), shutil.which("python3.12")]:
        if candidate:
            return candidate
    sys.exit("bench.clients: needs a python3.12 (inference-perf requires it)")


def tool_bin(tool: str) -> Path:
    """The tool's console script, installed into its own venv on first use."""
    venv = CACHE / tool
    script = venv / "bin" / tool
    if not script.exists():
        log(f"installing {TOOLS[tool]} into {venv} (first run only)")
        subprocess.run([python312(), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", TOOLS[tool]], check=True)
    return script


class Up:
    """`splitserve up` on the demo manifest with autoscaling off, so every run sees one fixed pool."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        manifest = workdir / "pool.yaml"
        manifest.write_text(DEMO.read_text().replace("enabled: true", "enabled: false"))
        argv = [sys.executable, "-m", "splitserve", "up", str(manifest), "--port", str(self.port)]
        argv += ["--prometheus", "off", "--workdir", str(workdir / "up")]
        self.log_path = workdir / "up.log"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, limit_s: float = 300) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"splitserve up exited:\n{self.log_path.read_text()}")
            if "ready: OpenAI API" in self.log_path.read_text():
                return
            time.sleep(1)
        sys.exit(f"splitserve up not ready after {limit_s:g}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # Ctrl-C: `up` stops every process it started
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ------------------------------------------------------------------------------- the router's side


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(url: str) -> Samples:
    """Every sample of the router's /metrics, by sample name and labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _total(samples: Samples, name: str) -> float:
    return sum(samples.get(name, {}).values())


def _quantile(before: Samples, after: Samples, name: str, q: float) -> float:
    """histogram_quantile over the run's bucket increments (linear inside a bucket, as Prometheus)."""
    buckets = sorted(
        (float(dict(labels)["le"]), value - before.get(f"{name}_bucket", {}).get(labels, 0.0))
        for labels, value in after[f"{name}_bucket"].items()
    )
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for edge, count in buckets:
        if count >= rank:
            if edge == float("inf"):
                return lower
            return lower + (edge - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = edge, count
    return lower


def router_window(before: Samples, after: Samples) -> dict[str, Any]:
    """The router's TTFT, ITL and e2e over one run, in ms: means exact, p50 interpolated in buckets."""
    out: dict[str, Any] = {}
    for key, name in (("ttft", names.TTFT), ("itl", names.ITL), ("e2e", names.E2E_LATENCY)):
        count = _total(after, f"{name}_count") - _total(before, f"{name}_count")
        total = _total(after, f"{name}_sum") - _total(before, f"{name}_sum")
        out[key] = {
            "mean": 1e3 * total / count if count else None,
            "p50": 1e3 * _quantile(before, after, name, 0.5),
            "count": count,
        }
    out["tpot"] = {"mean": out["itl"]["mean"]}
    outcomes = after.get(names.REQUESTS, {})
    out["requests"] = {
        dict(labels)["outcome"]: value - before.get(names.REQUESTS, {}).get(labels, 0.0)
        for labels, value in outcomes.items()
    }
    return out


# ------------------------------------------------------------------------------------ the tools


def aiperf_run(url: str, api: str, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        str(tool_bin("aiperf")), "profile", "-m", "tiny", "--url", url,
        "--endpoint-type", api, "--streaming", "--tokenizer", str(MODEL_DIR),
        "--prompt-input-tokens-mean", str(args.input_tokens), "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(args.output_tokens), "--prompt-output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{args.output_tokens}",
        "--use-server-token-count", "--request-count", str(args.requests),
        "--concurrency", str(args.concurrency), "--random-seed", "1",
        "--ui-type", "none", "--artifact-dir", str(out),
    ]  # fmt: skip


def aiperf_read(out: Path) -> dict[str, Any]:
    data = json.loads((out / "profile_export_aiperf.json").read_text())

    def metric(name: str) -> dict[str, Any]:
        return {"mean": data[name]["avg"], "p50": data[name]["p50"]}

    errors = sum(entry.get("count", 0) for entry in data.get("error_summary") or [])
    events = [
        json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line.strip()
    ]
    return {
        "ttft": metric("time_to_first_token"),
        "itl": metric("inter_token_latency"),  # aiperf's is (e2e - ttft) / (tokens - 1): a TPOT
        "tpot": metric("inter_token_latency"),
        "e2e": metric("request_latency"),
        "inter_chunk": metric("inter_chunk_latency"),
        "requests": len(events),
        "errors": errors,
        "output_tokens": data["output_sequence_length"]["avg"],
        "bodies": json.loads((out / "inputs.json").read_text())["data"][0]["payloads"][:1],
    }


def inference_perf_run(url: str, api: str, out: Path, args: argparse.Namespace) -> list[str]:
    """chat: the mock data set (inference-perf's random and shared-prefix generators send completions
    only) with its fixed 30-token answers; completions: random prompts of fixed lengths."""
    if api == "chat":
        data: dict[str, Any] = {"type": "mock"}
    else:
        data = {
            "type": "random",
            "input_distribution": _fixed(args.input_tokens, args.requests),
            "output_distribution": _fixed(args.output_tokens, args.requests),
        }
    config = {
        "api": {"type": api.removesuffix("s"), "streaming": True},
        "data": data,
        "load": {
            "type": "concurrent",
            "stages": [{"num_requests": args.requests, "concurrency_level": args.concurrency}],
            "num_workers": 1,
        },
        "server": {"type": "vllm", "model_name": "tiny", "base_url": url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(MODEL_DIR)},
        "report": {
            "request_lifecycle": {"summary": True, "per_request": True, "use_server_output_tokens": True}
        },
        "storage": {"local_storage": {"path": str(out)}},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return [str(tool_bin("inference-perf")), "-c", str(path)]


def _fixed(length: int, count: int) -> dict[str, int]:
    return {"min": length, "max": length, "mean": length, "std_dev": 0, "total_count": count}


def inference_perf_read(out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    latency = summary["successes"]["latency"]

    def metric(name: str) -> dict[str, Any]:
        return {"mean": 1e3 * latency[name]["mean"], "p50": 1e3 * latency[name]["median"]}

    requests = json.loads((out / "per_request_lifecycle_metrics.json").read_text())
    events, tokens, zero, chunk_gaps = 0, 0, [], []
    for request in requests:
        metrics = request["info"]["response_metrics"]
        events += len(metrics["chunk_times"])  # SSE events whose text is not empty
        tokens += metrics["server_usage"]["completion_tokens"]
        times = metrics["chunk_times"]
        chunk_gaps += [1e3 * (b - a) for a, b in itertools.pairwise(times)]
        token_times = metrics["output_token_times"]
        zero += [b == a for a, b in itertools.pairwise(token_times)]
    return {
        "ttft": metric("time_to_first_token"),
        # Its ITL re-tokenizes each event's text client-side and gives every token but the first a
        # gap of 0: random bytes re-tokenize into several tokens (see zero_itl_fraction).
        "itl": metric("inter_token_latency"),
        "tpot": metric("time_per_output_token"),
        "e2e": metric("request_latency"),
        "inter_event": {"mean": statistics.fmean(chunk_gaps), "p50": statistics.median(chunk_gaps)},
        "requests": summary["successes"]["count"],
        "errors": summary.get("failures", {}).get("count", 0),
        "sse_events_with_text_per_token": events / tokens,
        "zero_itl_fraction": sum(zero) / len(zero),
        "bodies": [json.loads(requests[0]["request"])],
    }


RUNNERS = {"aiperf": (aiperf_run, aiperf_read), "inference-perf": (inference_perf_run, inference_perf_read)}


def run_one(up: Up, tool: str, api: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    build, read = RUNNERS[tool]
    out = workdir / f"{tool}-{api}"
    argv = build(up.url, api, out, args)
    before = scrape(up.url)
    log(f"{tool} {api}: {args.requests} streamed requests, concurrency {args.concurrency}")
    env = {**os.environ, "NO_COLOR": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    after = scrape(up.url)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"}
    result = {"tool": read(out), "router": router_window(before, after)}
    log(f"  TTFT {_pair(result, 'ttft')}  TPOT {_pair(result, 'tpot')}  ITL {_pair(result, 'itl')}")
    return result


def _pair(result: dict[str, Any], key: str) -> str:
    tool, router = result["tool"][key]["mean"], result["router"][key]["mean"]
    return f"{tool:.2f} vs router {router:.2f} ms"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(name, run) for name, run in results["runs"].items() if "tool" in run]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key in zip(axes, ("ttft", "tpot", "itl"), strict=True):
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [run["tool"][key]["mean"] for _, run in runs], 0.4, label="tool")
        ax.bar([x + 0.2 for x in xs], [run["router"][key]["mean"] for _, run in runs], 0.4, label="router")
        ax.set_xticks(list(xs), [name.replace(" ", "\n") for name, _ in runs], fontsize=8)
        ax.set_title(f"mean {key.upper()} (ms)")
    axes[0].legend()
    fig.suptitle("each tool's own measurement vs the router's histograms over the same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "clients.json")
    args = parser.parse_args()
    for tool in TOOLS:
        tool_bin(tool)
    config = {key: str(value) for key, value in vars(args).items()}
    results: dict[str, Any] = {"config": config, "versions": TOOLS, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="splitserve-clients-") as tmp:
        up = Up(Path(tmp))
        try:
            up.wait_ready()
            for tool in TOOLS:
                for api in ENDPOINTS:
                    results["runs"][f"{tool} {api}"] = run_one(up, tool, api, Path(tmp), args)
        finally:
            up.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
