"""Which decode pod goes on a scale-down: `controller.kubernetes.io/pod-deletion-cost` from its streams.

When a Deployment's replicas drop, the ReplicaSet controller removes the ready pods with the lowest
deletion cost first. Before the operator (autoscaler or spec) lowers a decode pool's replicas, it reads
each decode pod's running sequences from the pod's own /metrics and writes them as that pod's cost, so
the emptiest pods go and the fewest streams have to drain. A pod whose cost is already right is not
patched; a pod whose metrics cannot be read keeps what it has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from splitserve.contract import names
from splitserve_operator import naming
from splitserve_operator.kube import ApiError, KubeClient

log = logging.getLogger(__name__)

DELETION_COST: Final = "controller.kubernetes.io/pod-deletion-cost"
SCRAPE_TIMEOUT_SECONDS: Final = 2.0

Object = Mapping[str, Any]


def metrics_url(pod: Object) -> str | None:
    """http://<pod IP>:<port named http>/metrics, or None for a pod without an IP yet."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                return f"http://{ip}:{port['containerPort']}/metrics"
    return None


def running_sequences(exposition: str) -> float | None:
    """Sequences in the worker's batch plus those queued for it, from its /metrics text."""
    wanted = {names.REQUESTS_RUNNING, names.REQUESTS_WAITING}
    values = [
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name in wanted
    ]
    return float(sum(values)) if values else None


def cost_patches(pods: Sequence[Object], running: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    """Merge patches for the pods whose deletion cost must change: the cost is the pod's sequence count.

    Pods with unknown counts are left as they are (an unready or unreachable pod is removed first by
    the ReplicaSet controller anyway, whatever its cost).
    """
    patches: dict[str, dict[str, Any]] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        count = running.get(meta.get("name", ""))
        if count is None:
            continue
        cost = str(round(count))
        if (meta.get("annotations") or {}).get(DELETION_COST) != cost:
            patches[meta["name"]] = {"metadata": {"annotations": {DELETION_COST: cost}}}
    return patches


async def _scrape(session: aiohttp.ClientSession, url: str | None) -> float | None:
    if url is None:
        return None
    try:
        async with session.get(url) as response:
            response.raise_for_status()
            return running_sequences(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        log.info("no running sequences from %s: %s", url, error)
        return None


async def mark_decode_pods(client: KubeClient, namespace: str, pool: str) -> dict[str, str]:
    """Set the deletion cost of the pool's decode pods from their running sequences; returns the
    costs written (pod name -> cost)."""
    selector = naming.selector_labels(pool, "decode")
    pods = await client.list("Pod", namespace, selector)
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        counts = await asyncio.gather(*(_scrape(session, metrics_url(pod)) for pod in pods))
    running = {pod["metadata"]["name"]: count for pod, count in zip(pods, counts, strict=True)}
    written = {}
    for name, patch in cost_patches(pods, running).items():
        await client.merge_patch("Pod", namespace, name, patch)
        written[name] = patch["metadata"]["annotations"][DELETION_COST]
    return written


async def before_decode_scale_down(client: KubeClient, namespace: str, pool: str) -> None:
    """`mark_decode_pods`, where a failure costs only the choice of pod, never the scale-down."""
    try:
        written = await mark_decode_pods(client, namespace, pool)
    except (ApiError, aiohttp.ClientError, TimeoutError) as error:
        log.warning("%s/%s: decode pods' deletion costs not set: %s", namespace, pool, error)
        return
    if written:
        log.info("%s/%s: decode pods' deletion costs %s", namespace, pool, written)
