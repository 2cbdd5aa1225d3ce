"""Reconcile N InferencePools against the emulated apiserver and measure the operator.

The operator runs as its real CLI (`python -m splitserve_operator`) in a subprocess, with a
kubeconfig pointing at an in-process emulated apiserver (tests/operator/apiserver.py), so its peak
memory is its own. Reports: time until every pool has its 7 children and a status, API calls per pool
on that first reconcile, API calls per pool during no-op resyncs (target: zero writes), peak RSS.

    PYTHONPATH=operator:worker python -m bench.reconcile.bench --pools 200 --out bench/reconcile/results
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import kmock
from tests.operator.apiserver import ApiServer

ROOT = Path(__file__).resolve().parents[2]

SPEC = {
    "model": {"name": "/opt/splitserve/models/tiny", "maxModelLen": 256},
    "decode": {"kvCacheBytes": "64Mi"},
}
CHILDREN = 7  # ConfigMap, 3 Services, 3 Deployments (no PodMonitor CRD here)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_requests(server: ApiServer, start: int, stop: int | None = None) -> list[Any]:
    return [
        r
        for r in server.log[start:stop]
        if r.headers.get("User-Agent", "").startswith(("kopf/", "splitserve-operator"))
    ]


def classify(requests: list[Any], pools: int) -> dict[str, Any]:
    """Calls per pool by verb and resource; watch streams are long-lived and counted apart."""
    by_kind: collections.Counter[str] = collections.Counter()
    for request in requests:
        plural = request.resource.plural if request.resource is not None else None
        if plural is None:
            by_kind["discovery"] += 1
            continue
        resource = plural + (f"/{request.subresource}" if request.subresource else "")
        verb = request.action.value.lower() if request.action is not None else request.method.value
        by_kind[f"{verb} {resource}"] += 1
    writes = sum(n for key, n in by_kind.items() if key.split()[0] in ("create", "update", "delete"))
    reads = sum(n for key, n in by_kind.items() if key.split()[0] in ("fetch", "list"))
    return {
        "writes_per_pool": round(writes / pools, 3),
        "reads_per_pool": round(reads / pools, 3),
        "watch_streams": by_kind.get("watch", 0)
        + sum(n for k, n in by_kind.items() if k.startswith("watch")),
        "by_call": dict(sorted(by_kind.items())),
    }


async def probe(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        return dict(await response.json())


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


async def run(pools: int, resync: float) -> dict[str, Any]:
    async with ApiServer() as server, kmock.Server(server):
        server.declare()
        tmp = Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "bench",
                    "clusters": [{"name": "bench", "cluster": {"server": str(server.url)}}],
                    "users": [{"name": "bench", "user": {"token": "bench"}}],
                    "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
                }
            )
        )
        health = f"http://127.0.0.1:{free_port()}/healthz"
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "worker")]),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "splitserve_operator",
            "--all-namespaces",
            "--liveness",
            health,
            "--poll-seconds",
            "1",
            "--resync-seconds",
            str(resync),
            "--log-level",
            "warning",
            env=env,
        )
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    try:
                        await probe(session, health)
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                start, t0 = server.count(), time.monotonic()
                path = "/apis/splitserve.io/v1alpha1/namespaces/bench/inferencepools"
                for i in range(pools):
                    body = {
                        "apiVersion": "splitserve.io/v1alpha1",
                        "kind": "InferencePool",
                        "metadata": {"name": f"pool-{i:03d}", "namespace": "bench"},
                        "spec": SPEC,
                    }
                    async with server.post(path, json=body) as response:
                        assert response.status < 300, await response.text()
                created = time.monotonic() - t0
                curve = []
                while True:
                    done = sum(
                        1
                        for (res, _, _), obj in server.objects.items()
                        if res.plural == "inferencepools"
                        and not obj.deleted
                        and (obj.raw.get("status") or {}).get("observedGeneration") == 1
                    )
                    children = sum(
                        1
                        for (res, _, _), obj in server.objects.items()
                        if res.plural in ("deployments", "services", "configmaps") and not obj.deleted
                    )
                    curve.append((round(time.monotonic() - t0, 2), done))
                    if done == pools and children == pools * CHILDREN:
                        break
                    if time.monotonic() - t0 > 600:
                        raise TimeoutError(f"only {done}/{pools} pools converged in 600 s")
                    await asyncio.sleep(0.25)
                converged = time.monotonic() - t0
                await asyncio.sleep(2)  # let the last events land before the window closes
                first = classify(operator_requests(server, start), pools)

                mark, reconciles = server.count(), (await probe(session, health))["reconciles"]
                window_start = time.monotonic()
                while True:  # at least two resync periods, and two full reconciles per pool
                    resynced = (await probe(session, health))["reconciles"] >= reconciles + 2 * pools
                    if resynced and time.monotonic() - window_start >= 2 * resync:
                        break
                    await asyncio.sleep(0.5)
                after = (await probe(session, health))["reconciles"]
                noop = classify(operator_requests(server, mark), pools)
                noop.update(
                    window_seconds=round(time.monotonic() - window_start, 1),
                    full_reconciles_per_pool=round((after - reconciles) / pools, 2),
                )
                memory = memory_kib(process.pid)
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
    result = {
        "pools": pools,
        "children_per_pool": CHILDREN,
        "pools_created_seconds": round(created, 2),
        "converge_seconds": round(converged, 2),
        "first_reconcile": first,
        "noop_resync": noop,
        "operator_peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
        "operator_rss_at_end_mib": round(memory["VmRSS"] / 1024, 1),
        "settings": {"poll_seconds": 1, "resync_seconds": resync},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "curve": curve,
    }
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    times, done = zip(*result["curve"], strict=True)
    left.plot(times, done)
    left.set(
        xlabel="seconds since the first pool was created",
        ylabel="pools with children and status",
        title=f"{result['pools']} pools converge in {result['converge_seconds']} s",
    )
    labels = ["first reconcile", "no-op resync"]
    writes = [result["first_reconcile"]["writes_per_pool"], result["noop_resync"]["writes_per_pool"]]
    reads = [result["first_reconcile"]["reads_per_pool"], result["noop_resync"]["reads_per_pool"]]
    x = range(len(labels))
    right.bar([i - 0.2 for i in x], writes, width=0.4, label="writes")
    right.bar([i + 0.2 for i in x], reads, width=0.4, label="reads (get/list)")
    right.set_xticks(list(x), labels)
    right.set(ylabel="API calls per pool", title=f"peak RSS {result['operator_peak_rss_mib']} MiB")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=200)
    parser.add_argument("--resync", type=float, default=10.0, help="operator --resync-seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    result = asyncio.run(run(args.pools, args.resync))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"reconcile-{args.pools}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / f"reconcile-{args.pools}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
