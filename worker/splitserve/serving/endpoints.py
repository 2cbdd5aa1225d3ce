"""Where the router's workers are and which of them can serve: pools, discovery, health, picking.

Scaling a pool must not need a router restart. Each `--prefill`/`--decode` URL is a *seed*: its
hostname is re-resolved periodically to all its addresses (a Kubernetes headless Service answers
one A record per ready pod), and `--discovery-file` (what `splitserve up` rewrites as it scales
local processes) adds seeds. Each endpoint is polled on /health and /load; a failed request marks
it unhealthy at once, and only a good poll brings it back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from splitserve.contract.names import WORKER_ROLES, WorkerRole

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
# A worker busy with a long forward pass may answer a probe late: only this many timeouts in a row
# make it unhealthy. A refused connection (the process is gone) or a 503 counts at once.
SLOW_PROBES_TOLERATED = 3


@dataclass(frozen=True)
class Seed:
    """A configured worker address whose host may stand for many endpoints."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Seed:
        text = url.strip()
        try:
            parsed = urlsplit(text if "://" in text else f"http://{text}")
            port = parsed.port or 80
        except ValueError:  # a port that is not a number, or out of range
            raise ValueError(f"{url!r}: expected http://HOST:PORT") from None
        if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/"):
            raise ValueError(f"{url!r}: expected http://HOST:PORT")
        return cls(parsed.hostname, port)


def endpoint_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(eq=False)
class Endpoint:
    """One worker process as the router sees it."""

    role: WorkerRole
    host: str
    port: int
    healthy: bool = False
    in_flight: int = 0  # this router's requests on it: the primary load signal, always current
    reported_load: int = 0  # its own running + waiting, from the last /load poll
    kv_cache_usage: float = 0.0
    last_pick: int = 0  # least recently picked wins a tie, so equal workers take turns
    slow_probes: int = 0  # consecutive probes that timed out

    @property
    def url(self) -> str:
        return endpoint_url(self.host, self.port)

    def mark_unhealthy(self, reason: str) -> None:
        if self.healthy:
            log.warning("endpoint unhealthy", extra={"role": self.role, "url": self.url, "reason": reason})
        self.healthy = False


def pick_least_loaded(endpoints: Iterable[Endpoint], exclude: set[str]) -> Endpoint | None:
    candidates = [e for e in endpoints if e.healthy and e.url not in exclude]
    return min(candidates, key=lambda e: (e.in_flight, e.reported_load, e.last_pick), default=None)


Picker = Callable[[Iterable[Endpoint], set[str]], Endpoint | None]
"""Chooses among endpoints, skipping unhealthy ones and the excluded URLs; None when none is left."""


class EndpointPool:
    """The endpoints of one role, updated by discovery without losing their in-flight counts."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self._endpoints: dict[str, Endpoint] = {}
        self._picks = 0

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def any_healthy(self) -> bool:
        return any(endpoint.healthy for endpoint in self._endpoints.values())

    def update(self, addresses: set[tuple[str, int]]) -> list[Endpoint]:
        """Make the pool exactly `addresses`; returns the new endpoints (to probe them now)."""
        wanted = {endpoint_url(host, port): (host, port) for host, port in addresses}
        for url in self._endpoints.keys() - wanted.keys():
            log.info("endpoint removed", extra={"role": self.role, "url": url})
            del self._endpoints[url]  # requests in flight keep their reference and finish normally
        added = []
        for url, (host, port) in wanted.items():
            if url not in self._endpoints:
                log.info("endpoint added", extra={"role": self.role, "url": url})
                self._endpoints[url] = Endpoint(self.role, host, port)
                added.append(self._endpoints[url])
        return added

    def acquire(self, exclude: set[str], pick: Picker = pick_least_loaded) -> Endpoint | None:
        """Pick a healthy endpoint (the least loaded unless told otherwise) and count a request on it
        (release() when done)."""
        endpoint = pick(self._endpoints.values(), exclude)
        if endpoint is not None:
            self._picks += 1
            endpoint.last_pick = self._picks
            endpoint.in_flight += 1
        return endpoint

    @staticmethod
    def release(endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1


async def resolve_all(host: str, port: int) -> list[str]:
    """Every address of `host`; IPv4 when it has any, so a dual-stack pod is not counted twice."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    if host == "localhost":
        return [host]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    by_family: dict[int, set[str]] = {}
    for family, _type, _proto, _name, address in infos:
        by_family.setdefault(family, set()).add(str(address[0]))
    return sorted(by_family.get(socket.AF_INET) or by_family.get(socket.AF_INET6) or ())


def read_discovery_file(path: Path) -> dict[WorkerRole, list[Seed]]:
    """`{"prefill": [urls], "decode": [urls]}`; raises ValueError with the reason."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(r, []), list) for r in WORKER_ROLES):
        raise ValueError(f'{path}: expected {{"prefill": [urls], "decode": [urls]}}')
    return {role: [Seed.parse(str(url)) for url in data.get(role, [])] for role in WORKER_ROLES}


class Discovery:
    """Seeds from flags and the discovery file, resolved to endpoint addresses."""

    def __init__(
        self, seeds: dict[WorkerRole, list[Seed]], file: Path | None, resolver: Resolver = resolve_all
    ) -> None:
        self._static = seeds
        self._file = file
        self._file_stamp: tuple[int, int] | None = None
        self._file_seeds: dict[WorkerRole, list[Seed]] = {role: [] for role in WORKER_ROLES}
        self._resolver = resolver
        self._resolved: dict[Seed, list[str]] = {}  # last good answer, kept through DNS hiccups

    async def addresses(self) -> dict[WorkerRole, set[tuple[str, int]]]:
        self._reload_file()
        seeds = {role: {*self._static.get(role, []), *self._file_seeds[role]} for role in WORKER_ROLES}
        everything = {seed for role_seeds in seeds.values() for seed in role_seeds}
        answers = await asyncio.gather(*(self._resolve(seed) for seed in everything))
        resolved = dict(zip(everything, answers, strict=True))
        return {
            role: {(host, seed.port) for seed in seeds[role] for host in resolved[seed]}
            for role in WORKER_ROLES
        }

    async def _resolve(self, seed: Seed) -> list[str]:
        try:
            async with asyncio.timeout(5.0):
                self._resolved[seed] = await self._resolver(seed.host, seed.port)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot resolve worker host", extra={"host": seed.host, "error": str(exc)})
        return self._resolved.get(seed, [])

    def _reload_file(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._file_stamp:
                self._file_seeds = read_discovery_file(self._file)
                self._file_stamp = stamp
                log.info("discovery file loaded", extra={"path": str(self._file)})
        except (OSError, ValueError) as exc:
            if self._file_stamp != (0, 0):  # warn once per bad state, keep the last good seeds
                log.warning("discovery file unusable", extra={"path": str(self._file), "error": str(exc)})
                self._file_stamp = (0, 0)


async def probe(session: aiohttp.ClientSession, endpoint: Endpoint, limit_s: float) -> None:
    """/health decides readiness; /load refines the pick when the worker offers it."""
    limit = aiohttp.ClientTimeout(total=limit_s)
    try:
        async with session.get(endpoint.url + "/health", timeout=limit) as response:
            ready = response.status == 200
        if ready:
            async with session.get(endpoint.url + "/load", timeout=limit) as response:
                if response.status == 200:
                    load = await response.json()
                    endpoint.reported_load = int(load.get("running", 0)) + int(load.get("waiting", 0))
                    endpoint.kv_cache_usage = float(load.get("kv_cache_usage", 0.0))
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        endpoint.slow_probes += 1
        if endpoint.slow_probes >= SLOW_PROBES_TOLERATED:
            endpoint.mark_unhealthy(f"{endpoint.slow_probes} health probes timed out: {exc!r}")
        return
    except (aiohttp.ClientError, OSError, ValueError, TypeError, AttributeError) as exc:
        endpoint.mark_unhealthy(f"health probe failed: {exc!r}")
        return
    endpoint.slow_probes = 0
    if not ready:
        endpoint.mark_unhealthy("not ready")
    elif not endpoint.healthy:
        log.info("endpoint healthy", extra={"role": endpoint.role, "url": endpoint.url})
        endpoint.healthy = True
