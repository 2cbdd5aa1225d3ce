"""A small asyncio Kubernetes client for the calls kopf does not make for us: children and Secrets.

kopf watches and patches the InferencePool itself; creating and patching its children needs a client.
This one speaks plain JSON over aiohttp with the same credentials kopf logged in with, so the operator
image needs neither the `kubernetes` package nor a thread pool.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import kopf

MERGE_PATCH: Final = "application/merge-patch+json"


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the API."""

    api_version: str
    plural: str

    def path(self, namespace: str, name: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{prefix}/namespaces/{namespace}/{self.plural}"
        return f"{path}/{name}" if name else path


KINDS: Final = {
    "ConfigMap": Kind("v1", "configmaps"),
    "Service": Kind("v1", "services"),
    "Secret": Kind("v1", "secrets"),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "Deployment": Kind("apps/v1", "deployments"),
    "PodMonitor": Kind("monitoring.coreos.com/v1", "podmonitors"),
}


class ApiError(Exception):
    """A failed API call, with the apiserver's own status code, reason and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


Credentials = Callable[[], kopf.ConnectionInfo | None]


def _as_file(path: object, data: str | bytes | None) -> str | None:
    """ssl wants files; kubeconfigs often embed certificates and keys as data (kind does)."""
    if data:
        with tempfile.NamedTemporaryFile("wb", prefix="splitserve-", delete=False) as handle:
            handle.write(data if isinstance(data, bytes) else data.encode())
        return handle.name
    return os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else None


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    if not info.server.startswith("https"):
        return True
    context = ssl.create_default_context(cafile=_as_file(info.ca_path, info.ca_data))
    certificate = _as_file(info.certificate_path, info.certificate_data)
    key = _as_file(info.private_key_path, info.private_key_data)
    if certificate and key:
        context.load_cert_chain(certificate, key)
    return context


class KubeClient:
    """JSON calls against the apiserver; re-reads credentials once on a 401 (rotated tokens)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _open(self, refresh: bool) -> tuple[aiohttp.ClientSession, kopf.ConnectionInfo]:
        if self._session is None or self._info is None or refresh:
            await self.close()
            info = self._credentials()
            if info is None:
                raise ApiError(401, "Unauthorized", "no Kubernetes credentials found")
            headers = {"Accept": "application/json", "User-Agent": "splitserve-operator"}
            headers.update(info.as_http_headers())
            connector = aiohttp.TCPConnector(ssl=_ssl_context(info), limit=32)
            timeout = aiohttp.ClientTimeout(total=30)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout)
            self._info = info
        return self._session, self._info

    async def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, content_type: str | None = None
    ) -> dict[str, Any]:
        for attempt in range(2):
            session, info = await self._open(refresh=attempt > 0)
            headers = {"Content-Type": content_type or "application/json"} if body is not None else {}
            data = json.dumps(body) if body is not None else None
            url = info.server.rstrip("/") + path
            async with session.request(method, url, data=data, headers=headers) as resp:
                if resp.status == 401 and attempt == 0:
                    continue
                payload = await resp.json(content_type=None) if resp.content_length != 0 else {}
                if resp.status >= 400:
                    payload = payload if isinstance(payload, dict) else {}
                    raise ApiError(
                        resp.status,
                        str(payload.get("reason") or resp.reason),
                        str(payload.get("message") or payload),
                    )
                return payload if isinstance(payload, dict) else {}
        raise AssertionError("unreachable")  # the loop returns or raises

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", KINDS[kind].path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self.request("POST", KINDS[obj["kind"]].path(meta["namespace"]), obj)

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        return await self.request("PATCH", KINDS[kind].path(namespace, name), patch, MERGE_PATCH)

    async def has_resource(self, api_version: str, plural: str) -> bool:
        """API discovery: whether the cluster serves `plural` in `api_version` (e.g. a CRD is installed)."""
        try:
            doc = await self.request("GET", f"/apis/{api_version}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(resource.get("name") == plural for resource in doc.get("resources") or [])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
