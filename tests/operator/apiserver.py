"""kmock's KubernetesEmulator plus the few apiserver behaviours an operator relies on; and a runner.

The emulator stores objects and streams watch events; a real apiserver also assigns uids and
creation timestamps, bumps metadata.generation on spec changes, and its garbage collector deletes
children whose owner is gone. Those are added here, so the operator is tested against them too.
Also used by bench/reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import kmock
import kopf
from kmock._internal import enums, rendering  # the hooks below extend kmock's internals
from kmock._internal.dicts import patch_dict

from splitserve_operator.handlers import Controller
from splitserve_operator.main import build
from splitserve_operator.settings import OperatorSettings

API_GROUP = "splitserve.io"
POOLS = f"{API_GROUP}/v1alpha1/inferencepools"
WRITE_ACTIONS = frozenset({enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE})


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """An in-memory apiserver over real HTTP, for kopf and for the Helm library alike."""

    _versions = itertools.count(1)
    # Every request, in order. kmock matches each new request against its whole request history
    # (O(n) per request), so only the current one is left there; this is the record to assert on.
    log: list[rendering.Request] = attrs.field(factory=list, init=False)

    def declare(self, *, pod_monitors: bool = False, peering: bool = False) -> None:
        """Serve the built-in API plus the InferencePool CRD (and optional extra APIs) in discovery."""
        self.resources.load_bundled()
        self.resources[POOLS] = kmock.ResourceInfo(
            kind="InferencePool",
            singular="inferencepool",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources={"status"},
        )
        if pod_monitors:
            self.resources["monitoring.coreos.com/v1/podmonitors"] = kmock.ResourceInfo(
                kind="PodMonitor",
                singular="podmonitor",
                namespaced=True,
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
        if peering:
            for plural, kind, namespaced in (
                ("clusterkopfpeerings", "ClusterKopfPeering", False),
                ("kopfpeerings", "KopfPeering", True),
            ):
                self.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
                    kind=kind,
                    singular=kind.lower(),
                    namespaced=namespaced,
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                )

    async def _serve_version(self, request: rendering.Request) -> Any:
        # kmock names the core group-version "/v1"; clients (client-go in Helm) expect "v1".
        doc = await super()._serve_version(request)
        if isinstance(doc, dict) and doc.get("groupVersion") == "/v1":
            doc["groupVersion"] = "v1"
        return doc

    async def _handle(self, request: rendering.Request) -> Any:
        self.log.append(request)
        del self._requests[:-1]
        self._check_json_patch_tests(request)
        data = request.data if isinstance(request.data, dict) else None
        deleted_uid = None
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == enums.action.UPDATE and request.name is not None:
                meta["resourceVersion"] = str(next(self._versions))
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted and request.subresource is None:
                    current = self.objects[key].raw
                    generation = int(current.get("metadata", {}).get("generation", 1))
                    changed = patch_dict(current, data).get("spec") != current.get("spec")
                    meta["generation"] = generation + 1 if changed else generation
        if request.resource is not None and request.action == enums.action.DELETE and request.name:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                deleted_uid = self.objects[key].raw.get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if deleted_uid is not None:
            await self._collect_garbage(deleted_uid)
        return response

    def _check_json_patch_tests(self, request: rendering.Request) -> None:
        """A JSON patch whose `test` op fails is a 422, as kopf's optimistic finalizer removal expects."""
        if request.action != enums.action.UPDATE or not isinstance(request.data, list):
            return
        if request.resource is None or request.name is None:
            return
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
        for op in request.data:
            if (
                op.get("op") == "test"
                and op.get("path") == "/metadata/resourceVersion"
                and current.get("metadata", {}).get("resourceVersion") != op.get("value")
            ):
                raise kmock.KubernetesError(status=422, reason="Invalid", message="the test operation failed")

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete every object owned by `owner_uid`, as the kube-controller-manager's GC does."""
        for (resource, _, _), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs):
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})

    def writes(self, since: int = 0) -> list[rendering.Request]:
        """Requests that changed state (create, patch/update, delete), from request number `since`."""
        return [r for r in self.log[since:] if r.action in WRITE_ACTIONS]

    def count(self) -> int:
        return len(self.log)


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


@contextlib.asynccontextmanager
async def running_operator(
    apiserver: ApiServer, settings: OperatorSettings, peering: str | None = None
) -> AsyncIterator[Controller]:
    """The real kopf operator in its own thread and event loop, talking HTTP to the emulated apiserver.

    A thread (as kopf.testing.KopfRunner does) keeps kopf's shutdown, which cancels its tasks,
    away from the test's event loop.
    """
    logging.getLogger("kopf").setLevel(logging.WARNING)
    url = str(apiserver.url)
    credentials = lambda: kopf.ConnectionInfo(server=url, default_namespace="default")  # noqa: E731
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
