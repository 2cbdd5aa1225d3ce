"""`splitserve up`: a manifest run as local processes, as a newcomer would run it."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from splitserve.contract import names
from splitserve.local.pool import free_port
from tests.conftest import splitserve_command, subprocess_env

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 120


def manifest(tmp_path: Path, model: Path, **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "model": {"name": str(model), "servedName": "tiny", "maxModelLen": 1024},
        "prefill": {"replicas": {"min": 1, "max": 2}, "threads": 1},
        "decode": {"replicas": {"min": 1, "max": 2}, "threads": 1, "kvCacheBytes": "128Mi"},
        "autoscaling": {"enabled": False},
    } | overrides
    path = tmp_path / "pool.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "splitserve.io/v1alpha1",
                "kind": "InferencePool",
                "metadata": {"name": "local-test"},
                "spec": spec,
            }
        )
    )
    return path


class Up:
    """`splitserve up` in the background, its stdout read line by line (every wait bounded)."""

    def __init__(self, *args: str, workdir: Path | None, **env: str) -> None:
        self.port = free_port()
        kept = ["--workdir", str(workdir)] if workdir else []
        self.process = subprocess.Popen(
            splitserve_command("up", *args, "--port", str(self.port), *kept),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(**env),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = READY_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, "".join(self.seen)
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout}s:\n{''.join(self.seen)}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", max_retries=0, timeout=60
        )

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)

    def output(self) -> str:
        """Everything printed so far (after the process ended: everything)."""
        if self.process.poll() is not None:
            self.reader.join(timeout=10)  # the pipe's last lines
        return "".join(self.seen) + "".join(self.lines.queue)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def test_up_runs_the_pool_streams_a_demo_and_stops_cleanly(tiny_model: Path, tmp_path: Path) -> None:
    up = Up(str(manifest(tmp_path, tiny_model)), "--demo", workdir=tmp_path / "run")
    try:
        ready = up.wait_for("ready: OpenAI API at")
        assert f"127.0.0.1:{up.port}/v1" in ready and "prefill 1, decode 1" in ready
        assert "TTFT" in up.wait_for("tokens: TTFT")
        reply = up.client().completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        assert up.interrupt() == 0
        assert "stopped" in "".join(up.seen) + "".join(up.lines.queue)
        with pytest.raises(openai.APIConnectionError):  # the router is gone, and so are the workers
            up.client().models.list()
    finally:
        up.kill()


def test_up_scales_local_workers_on_ttft(tiny_model: Path, tmp_path: Path) -> None:
    """A TTFT target nobody can meet: the autoscaler adds a second prefill process, the router uses it."""
    pool = manifest(
        tmp_path,
        tiny_model,
        prefill={"replicas": {"min": 1, "max": 2}, "threads": 1, "slo": {"ttftSeconds": 0.001}},
        autoscaling={"intervalSeconds": 1, "windowSeconds": 10, "predictive": False},
    )
    up = Up(str(pool), "--prometheus", "off", workdir=tmp_path / "run")
    try:
        ready = up.wait_for("ready: OpenAI API at")
        decisions = re.search(r"its decisions at (\S+/metrics)", ready)
        assert decisions is not None, ready
        stop = threading.Event()

        def traffic() -> None:
            client = up.client()
            deadline = time.monotonic() + 90
            while not stop.is_set() and time.monotonic() < deadline:
                client.completions.create(model="tiny", prompt="hi " * 40, max_tokens=3, temperature=0)

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            up.wait_for("Autoscaled: prefill: 1 -> 2", timeout=90)
            up.wait_for("ready in", timeout=60)  # the new process is in the discovery file once ready
        finally:
            stop.set()
            sender.join(timeout=60)
        # The operator's series, from the same evaluator: desired 2, and the scale-up's reason.
        exported = [
            sample
            for family in text_string_to_metric_families(requests.get(decisions[1], timeout=10).text)
            for sample in family.samples
            if sample.labels.get("pool") == "local-test" and sample.labels.get("role") == "prefill"
        ]
        assert [s.value for s in exported if s.name == names.AUTOSCALER_DESIRED_REPLICAS] == [2.0]
        (last,) = [s for s in exported if s.name == names.AUTOSCALER_LAST_SCALE]
        assert "TTFT" in last.labels["reason"] and last.value > 0
        endpoints = json.loads((tmp_path / "run" / "endpoints.json").read_text())
        assert len(endpoints["prefill"]) == 2 and len(endpoints["decode"]) == 1
        for _ in range(4):
            reply = up.client().completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
            assert reply.usage is not None and reply.usage.completion_tokens == 2
        assert up.interrupt() == 0
    finally:
        up.kill()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "pool.yaml: no such file"),
        ("kind: [unclosed", "not valid YAML"),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            "expected one InferencePool, found kind ConfigMap",
        ),
        (
            "apiVersion: splitserve.io/v1alpha1\nkind: InferencePool\nmetadata: {name: x}\n"
            "spec: {model: {name: m}, prefill: {replicas: {min: 3, max: 2}}}\n",
            "spec.prefill.replicas",
        ),
        (
            "apiVersion: splitserve.io/v1alpha1\nkind: InferencePool\nmetadata: {name: x}\n"
            "spec: {model: {name: /no/such/dir}}\n",
            "does not exist",
        ),
    ],
    ids=["missing-file", "bad-yaml", "wrong-kind", "min-over-max", "missing-model"],
)
def test_bad_manifest_is_one_line_and_a_nonzero_exit(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "pool.yaml"
    if content is not None:
        path.write_text(content)
    result = subprocess.run(
        splitserve_command("up", str(path)), capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitserve up: error:") and message in lines[0]


def test_the_demo_pool_is_packaged_and_is_examples_local_yaml() -> None:
    from splitserve.local.up import DEMO_MANIFEST, TINY_MODEL_DIR, load_manifest

    examples = Path(__file__).resolve().parents[2] / "examples" / "local.yaml"
    assert examples.resolve() == DEMO_MANIFEST.resolve()
    name, spec = load_manifest(DEMO_MANIFEST)
    assert name == "tiny" and spec.model.name == str(TINY_MODEL_DIR)
    assert spec.autoscaling.enabled and spec.prefill.replicas.start == spec.decode.replicas.start == 1
