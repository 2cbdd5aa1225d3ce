"""Fixtures: an emulated apiserver and the real kopf operator running against it."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest

from splitserve_operator.handlers import Controller
from splitserve_operator.settings import OperatorSettings

from .apiserver import POOLS, ApiServer, running_operator

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


@pytest.fixture()
async def operator(apiserver: ApiServer, settings: OperatorSettings) -> AsyncIterator[Controller]:
    async with running_operator(apiserver, settings) as runtime:
        yield runtime
