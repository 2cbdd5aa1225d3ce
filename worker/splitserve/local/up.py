"""`splitserve up FILE.yaml`: an InferencePool manifest running on this machine.

The same manifest a cluster takes: router, prefill and decode workers become local processes, and
the operator's autoscaler scales them (reading a local Prometheus when one is installed, else the
processes' /metrics directly). Ctrl-C stops everything gracefully; a second Ctrl-C kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import aiohttp
import yaml
from pydantic import ValidationError

from splitserve.contract.errors import one_line
from splitserve.contract.names import WORKER_ROLES
from splitserve.engine.model_info import check_model_source
from splitserve.local.pool import LocalPool, check_port_free
from splitserve.local.prometheus import LocalPrometheus, find_prometheus
from splitserve_operator.api_base import API_GROUP, KIND
from splitserve_operator.autoscaling.evaluator import AutoscalerState, PoolAutoscaler, signal_query
from splitserve_operator.autoscaling.exporter import AutoscalerMetrics
from splitserve_operator.autoscaling.scrape import ScrapeSource
from splitserve_operator.autoscaling.signals import PrometheusSource, SignalSource, SignalsUnavailableError
from splitserve_operator.conditions import Event
from splitserve_operator.engine_configmap import engine_config
from splitserve_operator.models import InferencePoolSpec

# The demo pool `splitserve up` runs without a manifest (examples/local.yaml is a link to it), and its
# model: written here on first use, so the demo needs no network.
DEMO_MANIFEST = Path(__file__).with_name("demo.yaml")
TINY_MODEL_DIR = Path("~/.cache/splitserve/tiny-model")
DEMO_PROMPT = "In one sentence: why run prefill and decode on separate GPU pools?"
WATCH_SECONDS = 1.0
WARM_UP_SECONDS = 30.0


def load_manifest(path: Path) -> tuple[str, InferencePoolSpec]:
    """(name, spec) of the one InferencePool in `path`; ValueError with a readable reason otherwise."""
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except FileNotFoundError as error:
        raise ValueError(f"{path}: no such file") from error
    except IsADirectoryError as error:
        raise ValueError(f"{path}: is a directory, not a manifest") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    pools = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == KIND]
    if len(pools) != 1:
        raise ValueError(f"{path}: expected one {KIND}, found {_kinds(documents)}")
    pool = pools[0]
    if not str(pool.get("apiVersion", "")).startswith(f"{API_GROUP}/"):
        raise ValueError(f"{path}: apiVersion must be {API_GROUP}/v1alpha1")
    name = (pool.get("metadata") or {}).get("name")
    if not name:
        raise ValueError(f"{path}: metadata.name is required")
    try:
        return str(name), InferencePoolSpec.model_validate(pool.get("spec") or {})
    except ValidationError as error:
        raise ValueError(f"{path}: {one_line(error, root='spec')}") from error


def _kinds(documents: list[Any]) -> str:
    """What a manifest holds instead of one InferencePool, e.g. `2 InferencePool` or `kind ConfigMap`."""
    kinds = [
        str(doc.get("kind")) if isinstance(doc, dict) and "kind" in doc else "no kind" for doc in documents
    ]
    if not kinds:
        return "an empty file"
    if kinds.count(KIND) > 1:
        return f"{kinds.count(KIND)} of them"
    return "kind " + ", ".join(dict.fromkeys(kinds))


def local_model(name: str) -> str:
    """A hub id stays as it is; a local path is expanded, and the demo's tiny model written if missing."""
    if not name.startswith(("~", ".", "/")):
        return name
    path = Path(name).expanduser()
    if not path.exists() and path == TINY_MODEL_DIR.expanduser():
        from splitserve.engine.tiny_model import write_tiny_model

        print(f"writing the tiny offline model to {path} (first run only)", flush=True)
        write_tiny_model(path)
    return check_model_source(str(path))


def run_local(args: argparse.Namespace) -> int:
    """Checks everything a user can get wrong (manifest, port, model path) before any process starts."""
    name, spec = load_manifest(args.manifest or DEMO_MANIFEST)
    port = args.port or spec.router.service.port
    check_port_free(port)
    config = engine_config(spec).model_copy(update={"model": local_model(spec.model.name)})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"splitserve-{name}-"))
    pool = LocalPool(
        name,
        config,
        workdir,
        port,
        threads={"prefill": spec.prefill.threads or 1, "decode": spec.decode.threads or 1},
        log_level=args.log_level,
        drain_seconds=max(spec.prefill.drain_seconds, spec.decode.drain_seconds, spec.router.drain_seconds),
    )
    try:
        return asyncio.run(Up(pool, spec, args).run())
    except RuntimeError as error:  # a process failed to start: its log tail is in the message
        print(f"splitserve up: error: {error}", flush=True)
        return 1
    finally:
        if args.workdir is None:  # a temp dir of ours; --workdir keeps logs for later
            shutil.rmtree(workdir, ignore_errors=True)


class Up:
    """The pool's lifetime: start, serve and autoscale until Ctrl-C, then stop every process."""

    def __init__(self, pool: LocalPool, spec: InferencePoolSpec, args: argparse.Namespace) -> None:
        self.pool, self.spec, self.args = pool, spec, args
        self.prometheus: LocalPrometheus | None = None
        self.source: SignalSource | None = None
        self.interrupts = 0
        # The autoscaler's decisions on /metrics (the operator's series), on a free port once started.
        self.decisions = AutoscalerMetrics()
        self.decisions_server: WSGIServer | None = None

    async def run(self) -> int:
        """`_serve` until it ends or a signal cancels it; the processes are stopped either way."""
        loop = asyncio.get_running_loop()
        serving = asyncio.ensure_future(self._serve())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._interrupt, serving)
        kept = "" if self.args.workdir else " (removed on exit; --workdir keeps them)"
        print(
            f"splitserve up: pool {self.pool.name!r}, model {self.pool.config.model}; "
            f"logs in {self.pool.workdir / 'logs'}{kept}",
            flush=True,
        )
        try:
            await asyncio.wait([serving])
            if not serving.cancelled():
                serving.result()  # a process that failed to start raises its RuntimeError here
        finally:
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return 0 if self.interrupts < 2 else 130

    def _interrupt(self, serving: asyncio.Future[None]) -> None:
        """First Ctrl-C: a graceful stop (workers drain). Second: kill every process now."""
        self.interrupts += 1
        if self.interrupts == 1:
            print("stopping... (Ctrl-C again to kill at once)", flush=True)
            serving.cancel()
        elif self.interrupts == 2:
            print("killing every process", flush=True)
            self.pool.kill()
            if self.prometheus is not None:
                self.prometheus.kill()

    async def _serve(self) -> None:
        pool = self.pool
        await pool.start(self.spec.prefill.replicas.start, self.spec.decode.replicas.start)
        if self.spec.autoscaling.enabled:
            self.decisions_server, _ = self.decisions.serve(0, "127.0.0.1")
        self.source = await self._signal_source()
        await self._warm_up(self.source)
        print(
            f"ready: OpenAI API at {pool.url}/v1 (model {pool.config.name!r}); prefill "
            f"{pool.replicas('prefill')}, decode {pool.replicas('decode')}; {self._scaling_note()}; "
            "Ctrl-C stops",
            flush=True,
        )
        if self.args.demo:
            await demo(pool.url, pool.config.name)
        await self._watch(self.source)

    async def _shutdown(self) -> None:
        if self.interrupts == 0:
            print("stopping...", flush=True)
        if isinstance(self.source, ScrapeSource):
            await self.source.close()
        elif isinstance(self.source, PrometheusSource):
            self.source.close()
        await self.pool.stop()
        if self.prometheus is not None:
            await asyncio.to_thread(self.prometheus.stop)
        if self.decisions_server is not None:
            await asyncio.to_thread(self.decisions_server.shutdown)
        print("stopped", flush=True)

    async def _signal_source(self) -> SignalSource:
        binary = find_prometheus() if self.args.prometheus == "auto" else None
        if binary is None or not self.spec.autoscaling.enabled:
            return ScrapeSource(self._metrics_urls())
        self.prometheus = LocalPrometheus(binary, self.pool.workdir / "prometheus")
        self.prometheus.set_targets(self._targets())
        self.prometheus.start()
        await asyncio.to_thread(self.prometheus.wait_ready)
        return PrometheusSource(self.prometheus.url)

    async def _warm_up(self, source: SignalSource) -> None:
        """Until the source shows every process and a request rate at the router: Prometheus applies
        new targets within about 5 s and a rate needs two scrapes, and an evaluation before that
        would report metrics as unavailable that are merely not there yet. Bounded: a source that
        never shows them is then reported by the evaluations, as it should be."""
        if not self.spec.autoscaling.enabled:
            return
        query = signal_query(None, self.pool.name, self.spec)
        deadline = time.monotonic() + WARM_UP_SECONDS
        while time.monotonic() < deadline:
            try:
                signals = await source.read(query)
            except SignalsUnavailableError:
                signals = None
            if signals is not None and signals.request_rate is not None:
                counted = {"prefill": signals.prefill.replicas, "decode": signals.decode.replicas}
                if all(counted[role] == self.pool.replicas(role) for role in WORKER_ROLES):
                    return
            await asyncio.sleep(WATCH_SECONDS / 2)

    def _scaling_note(self) -> str:
        autoscaling = self.spec.autoscaling
        if not autoscaling.enabled:
            return "autoscaling off"
        via = f"Prometheus at {self.prometheus.url}" if self.prometheus else "the workers' /metrics"
        ttft, itl = self.spec.prefill.slo.ttft_seconds, self.spec.decode.slo.itl_seconds
        decisions = f"; its decisions at {self._decisions_url()}" if self.decisions_server else ""
        return (
            f"autoscaling every {autoscaling.interval_seconds}s on TTFT<={ttft}s and ITL<={itl}s via {via}"
            + decisions
        )

    def _decisions_url(self) -> str:
        assert self.decisions_server is not None
        return f"http://127.0.0.1:{self.decisions_server.server_port}/metrics"

    def _targets(self) -> list[str]:
        """What the local Prometheus scrapes: every process, and the autoscaler's decisions."""
        targets = [process.url.removeprefix("http://") for process in self.pool.processes()]
        if self.decisions_server is not None:
            targets.append(f"127.0.0.1:{self.decisions_server.server_port}")
        return targets

    def _metrics_urls(self) -> list[str]:
        return [process.url + "/metrics" for process in self.pool.processes()]

    async def _watch(self, source: SignalSource) -> None:
        """Forever (until cancelled): replace crashed workers, and scale on the autoscaler's interval.

        The first evaluation comes one interval after ready, as in the operator: before that no
        window holds a sample, and evaluating would only report the metrics as missing. Direct
        scraping samples every tick, so its rates have history by then."""
        autoscaler = PoolAutoscaler(source, self.decisions)
        state = AutoscalerState(last_evaluation=time.time())
        while True:
            await self._replace_dead()
            if isinstance(source, ScrapeSource):
                await source.scrape()
            if self.spec.autoscaling.enabled and state.due(
                time.time(), self.spec.autoscaling.interval_seconds
            ):
                current = {role: self.pool.replicas(role) for role in WORKER_ROLES}
                outcome = await autoscaler.evaluate(
                    None, self.pool.name, self.spec, current, state, time.time()
                )
                for event in outcome.events:
                    report(event)
                for role, replicas in outcome.changed.items():
                    await self.pool.scale(role, replicas)
                if outcome.changed:
                    self._retarget(source)
            await asyncio.sleep(WATCH_SECONDS)

    async def _replace_dead(self) -> None:
        dead = self.pool.dead()
        if not dead:
            return
        if self.pool.router in dead:
            raise RuntimeError(
                f"the router exited:\n{self.pool.router.log_tail() if self.pool.router else ''}"
            )
        for process in dead:
            print(f"  {process.name} exited with code {process.exit_code()}; replacing it", flush=True)
        for role in WORKER_ROLES:
            lost = [process for process in self.pool.workers[role] if process in dead]
            if lost:
                keep = self.pool.replicas(role)
                self.pool.workers[role] = [p for p in self.pool.workers[role] if p not in dead]
                await self.pool.scale(role, keep)

    def _retarget(self, source: SignalSource) -> None:
        if self.prometheus is not None:
            self.prometheus.set_targets(self._targets())
        elif isinstance(source, ScrapeSource):
            source.set_targets(self._metrics_urls())


def report(event: Event) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {event.reason}: {event.message}", flush=True)


async def demo(url: str, model: str, max_tokens: int = 48) -> dict[str, Any]:
    """Stream one chat completion to the terminal and print what the client saw: TTFT and ITL."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    print(f"\ndemo> {DEMO_PROMPT}\n", flush=True)
    sent = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + "/v1/chat/completions", json=body) as reply,
    ):
        reply.raise_for_status()
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            print(choice["delta"].get("content", ""), end="", flush=True)
            arrivals.append((time.perf_counter(), len(choice.get("token_ids") or [])))
    gaps = sorted(
        (now - before) / count
        for (before, _), (now, count) in itertools.pairwise(arrivals)
        for _ in range(count)
        if count
    )
    tokens = sum(count for _, count in arrivals)
    stats = {
        "ttft_s": arrivals[0][0] - sent,
        "tokens": tokens,
        "itl_p50_s": gaps[len(gaps) // 2] if gaps else 0.0,
        "itl_p99_s": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else 0.0,
    }
    print(
        f"\n\n(random weights, so the text is gibberish) {tokens} tokens: TTFT "
        f"{stats['ttft_s'] * 1000:.0f} ms, ITL p50 {stats['itl_p50_s'] * 1000:.1f} ms, "
        f"p99 {stats['itl_p99_s'] * 1000:.1f} ms\n",
        flush=True,
    )
    return stats
