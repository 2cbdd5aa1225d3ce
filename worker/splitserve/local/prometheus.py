"""A real Prometheus on 127.0.0.1 for `splitserve up` (and the tests), scraping a file of targets.

File-based service discovery: `set_targets()` rewrites the file and Prometheus picks the change up
(it watches the file), so local scaling adds and removes scrape targets without a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from splitserve.local.pool import free_port

READY_TIMEOUT_S = 30.0


def find_prometheus() -> str | None:
    """The binary: $PROMETHEUS_BIN, else `prometheus` on PATH (Debian: apt-get install prometheus)."""
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")


class LocalPrometheus:
    def __init__(
        self, binary: str, workdir: Path, *, scrape_interval: str = "1s", labels: dict[str, str] | None = None
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.labels = labels or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets_file = workdir / "targets.json"
        self.log_path = workdir / "prometheus.log"
        self.scrape_interval = scrape_interval
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def set_targets(self, targets: list[str]) -> None:
        """`host:port` targets serving /metrics; written atomically."""
        staging = self.targets_file.with_suffix(".tmp")
        staging.write_text(json.dumps([{"targets": targets, "labels": self.labels}]))
        staging.replace(self.targets_file)

    def start(self) -> None:
        if not self.targets_file.exists():
            self.set_targets([])
        config = self.workdir / "prometheus.yml"
        config.write_text(
            f"global: {{scrape_interval: {self.scrape_interval}, scrape_timeout: {self.scrape_interval}, "
            f"evaluation_interval: {self.scrape_interval}}}\n"
            "scrape_configs:\n"
            "  - job_name: splitserve\n"
            f"    file_sd_configs: [{{files: ['{self.targets_file}'], refresh_interval: 5s}}]\n"
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=2h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout:g}s; see {self.log_path}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
