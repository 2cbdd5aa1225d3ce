"""Fixtures: an emulated apiserver and the real kopf operator running against it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from apiserver import POOLS, ApiServer

from splitserve_operator.handlers import Runtime
from splitserve_operator.main import build
from splitserve_operator.settings import OperatorSettings

NAMESPACE = "serving"
TINY_SPEC: dict[str, Any] = {
    "model": {"name": "/opt/splitserve/models/tiny", "maxModelLen": 256},
    "prefill": {"replicas": {"min": 1, "max": 2}},
    "decode": {"replicas": {"min": 1, "max": 2}, "kvCacheBytes": "64Mi"},
}


def pool_body(name: str, spec: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, Any]:
    return {
        "apiVersion": "splitserve.io/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": copy.deepcopy(spec if spec is not None else TINY_SPEC),
    }


async def eventually(check: Callable[[], Any], limit: float = 15.0, what: str = "condition") -> Any:
    """Poll `check` until it returns a truthy value, which is returned; fail after `limit` seconds."""
    deadline = time.monotonic() + limit
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, IndexError, TypeError, ValueError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


class Cluster:
    """Test-side access to the emulated apiserver: apply, read and edit objects over HTTP."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server

    def get(self, resource: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.server.objects or self.server.objects[key].deleted:
            return None
        return copy.deepcopy(self.server.objects[key].raw)

    def pool(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        pool = self.get(POOLS, name, namespace)
        assert pool is not None, f"no pool {name}"
        return pool

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        conditions = (self.pool(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == type_), None)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [
            e.raw
            for (res, _, _), e in self.server.objects.items()
            if str(res.plural) == "events"
            and not e.deleted
            and e.raw.get("involvedObject", {}).get("name") == name
        ]

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/merge-patch+json"
    ) -> dict[str, Any]:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.server.request(method, path, json=body, headers=headers) as resp:
            assert resp.status < 400, await resp.text()
            return dict(await resp.json())

    async def create_pool(
        self, name: str, spec: dict[str, Any] | None = None, namespace: str = NAMESPACE
    ) -> dict[str, Any]:
        path = f"/apis/splitserve.io/v1alpha1/namespaces/{namespace}/inferencepools"
        return await self.request("POST", path, pool_body(name, spec, namespace), "application/json")

    async def patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch)


def path_of(kind: str, name: str, namespace: str = NAMESPACE, status: bool = False) -> str:
    prefix = {
        "deployments": "/apis/apps/v1",
        "inferencepools": "/apis/splitserve.io/v1alpha1",
        "podmonitors": "/apis/monitoring.coreos.com/v1",
    }.get(kind, "/api/v1")
    return f"{prefix}/namespaces/{namespace}/{kind}/{name}" + ("/status" if status else "")


@pytest.fixture()
def apiserver_options() -> dict[str, bool]:
    return {}


@pytest.fixture()
async def apiserver(apiserver_options: dict[str, bool]) -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        server.declare(**apiserver_options)
        yield server


@pytest.fixture()
def cluster(apiserver: ApiServer) -> Cluster:
    return Cluster(apiserver)


@pytest.fixture()
def settings() -> OperatorSettings:
    return OperatorSettings(worker_image="splitserve/worker:test", poll_seconds=0.1, resync_seconds=0.5)


@contextlib.asynccontextmanager
async def running_operator(
    apiserver: ApiServer, settings: OperatorSettings, peering: str | None = None
) -> AsyncIterator[Runtime]:
    """The real kopf operator in its own thread and event loop, talking HTTP to the emulated apiserver.

    A thread (as kopf.testing.KopfRunner does) keeps kopf's shutdown, which cancels its tasks,
    away from the test's event loop.
    """
    logging.getLogger("kopf").setLevel(logging.WARNING)
    url = str(apiserver.url)
    credentials = lambda: kopf.ConnectionInfo(server=url, default_namespace=NAMESPACE)  # noqa: E731
    registry, runtime = build(settings, credentials, peering=peering is not None)
    ready, stop = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=registry,
                    clusterwide=settings.cluster_wide,
                    namespaces=list(settings.namespaces),
                    standalone=peering is None,
                    peering_name=peering,
                    priority=100,
                    ready_flag=ready,
                    stop_flag=stop,
                )
            )
        except BaseException as exc:  # reported to the test below
            failure.append(exc)

    thread = threading.Thread(target=run, name="kopf", daemon=True)
    thread.start()
    try:
        await eventually(ready.is_set, limit=10, what="kopf to start")
        yield runtime
    finally:
        stop.set()
        await eventually(lambda: not thread.is_alive(), limit=15, what="kopf to stop")
    assert not failure, failure


@pytest.fixture()
async def operator(apiserver: ApiServer, settings: OperatorSettings) -> AsyncIterator[Runtime]:
    async with running_operator(apiserver, settings) as runtime:
        yield runtime
