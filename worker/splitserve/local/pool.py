"""An InferencePool as local processes: N prefill workers, M decode workers and one router.

What the operator does with Deployments, done with subprocesses on 127.0.0.1: each worker gets a
free port, the router finds them through a discovery file (rewritten on every scale, re-read by the
router), and a worker leaves the discovery file before it is stopped so no new request reaches it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from splitserve.contract.config import EngineConfig
from splitserve.contract.names import WORKER_ROLES, WorkerRole

STARTUP_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0

Progress = Callable[[str], None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def check_port_free(port: int) -> None:
    """ValueError when something listens on 127.0.0.1:`port` already: found before any model loads,
    and before the other listener's /health could pass for our router's."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no owner
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise ValueError(
                f"port {port} is already in use (another `splitserve up`?); stop it or pass --port"
            ) from error


def splitserve_argv(*args: str) -> list[str]:
    """This interpreter running our CLI, so a checkout works as well as an installed package."""
    return [sys.executable, "-m", "splitserve", *args]


@dataclass(eq=False)
class LocalProcess:
    name: str
    port: int
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: Ctrl-C in the terminal reaches `up`, which stops children in order.
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.started_at = time.monotonic()

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def wait_ready(self, session: aiohttp.ClientSession, limit_s: float = STARTUP_TIMEOUT_S) -> float:
        """Poll /health until 200; seconds it took. Raises with the log's tail if the process died."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.exit_code() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.exit_code()}:\n{self.log_tail()}")
            try:
                async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as reply:
                    if reply.status == 200:
                        return time.monotonic() - self.started_at
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready after {limit_s:g}s:\n{self.log_tail()}")

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM (the worker drains), then SIGKILL after `grace` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        """Die without draining (tests of failure handling)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class LocalPool:
    """The processes of one pool, and the discovery file that tells the router about the workers."""

    name: str
    config: EngineConfig
    workdir: Path
    router_port: int
    threads: dict[WorkerRole, int | None] = field(default_factory=dict)
    log_level: str = "info"
    progress: Progress = print
    env: dict[str, str] | None = None
    workers: dict[WorkerRole, list[LocalProcess]] = field(
        default_factory=lambda: {role: [] for role in WORKER_ROLES}
    )
    router: LocalProcess | None = None
    starting: list[LocalProcess] = field(default_factory=list)  # started, not yet ready
    _serial: int = 0

    @property
    def engine_file(self) -> Path:
        return self.workdir / "engine.json"

    @property
    def discovery_file(self) -> Path:
        return self.workdir / "endpoints.json"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def replicas(self, role: WorkerRole) -> int:
        return len(self.workers[role])

    def processes(self) -> list[LocalProcess]:
        return [*self.workers["prefill"], *self.workers["decode"], *([self.router] if self.router else [])]

    async def start(self, prefill: int, decode: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.engine_file.write_text(self.config.model_dump_json(exclude_none=True, indent=2))
        self._write_discovery()
        self.router = self._process(
            "router",
            self.router_port,
            ["router", "--config", str(self.engine_file), "--discovery-file", str(self.discovery_file)],
        )
        self.router.start()
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(self._add("prefill", prefill, session), self._add("decode", decode, session))
            await self._ready(self.router, session)

    async def scale(self, role: WorkerRole, replicas: int) -> None:
        """Add workers (in the discovery file once ready) or remove them (out of it before stopping)."""
        if replicas > self.replicas(role):
            async with aiohttp.ClientSession() as session:
                await self._add(role, replicas - self.replicas(role), session)
        elif replicas < self.replicas(role):
            leaving = self.workers[role][replicas:]
            del self.workers[role][replicas:]
            self._write_discovery()
            await asyncio.gather(*(asyncio.to_thread(process.stop) for process in leaving))
            for process in leaving:
                self.progress(f"  {process.name:<10} stopped")

    async def stop(self) -> None:
        """Every process, including those still loading (a Ctrl-C during start-up)."""
        everyone = [*self.starting, *self.processes()]
        await asyncio.gather(*(asyncio.to_thread(process.stop) for process in everyone))

    def kill(self) -> None:
        """SIGKILL everything now (a second Ctrl-C); a `stop` under way then returns at once."""
        for process in [*self.starting, *self.processes()]:
            process.kill()

    def dead(self) -> list[LocalProcess]:
        return [process for process in self.processes() if process.exit_code() is not None]

    async def _add(self, role: WorkerRole, count: int, session: aiohttp.ClientSession) -> None:
        new = []
        for _ in range(count):
            port = free_port()
            argv = ["worker", "--role", role, "--config", str(self.engine_file)]
            if role == "decode":
                argv += ["--kv-port", str(free_port())]
            if self.threads.get(role):
                argv += ["--threads", str(self.threads[role])]
            self._serial += 1
            process = self._process(f"{role}-{self._serial}", port, argv)
            process.start()
            new.append(process)
        self.starting.extend(new)
        await asyncio.gather(*(self._ready(process, session) for process in new))
        self.starting = [process for process in self.starting if process not in new]
        self.workers[role].extend(new)
        self._write_discovery()

    async def _ready(self, process: LocalProcess, session: aiohttp.ClientSession) -> None:
        what = "" if process is self.router else f" (loading {self.config.model})"
        self.progress(f"  {process.name:<10} starting{what}")
        seconds = await process.wait_ready(session)
        self.progress(f"  {process.name:<10} ready in {seconds:.1f}s at {process.url}")

    def _process(self, name: str, port: int, argv: list[str]) -> LocalProcess:
        argv = [
            *argv,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--pool",
            self.name,
            "--log-level",
            self.log_level,
        ]
        return LocalProcess(
            name, port, splitserve_argv(*argv), self.workdir / "logs" / f"{name}.log", self.env
        )

    def _write_discovery(self) -> None:
        """Atomic rewrite, so the router never reads half a file."""
        urls = {role: [process.url for process in self.workers[role]] for role in WORKER_ROLES}
        staging = self.discovery_file.with_suffix(".tmp")
        staging.write_text(json.dumps(urls))
        staging.replace(self.discovery_file)
