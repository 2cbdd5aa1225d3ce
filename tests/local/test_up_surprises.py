"""`splitserve up` and the CLI as a newcomer meets them: no surprise on a taken port, a stop or a typo."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import aiohttp
import openai
import pytest

from splitserve.contract import names
from splitserve.contract.config import EngineConfig
from splitserve.local.pool import STOP_GRACE_S, LocalProcess, check_port_free, free_port
from tests.conftest import splitserve_command, subprocess_env
from tests.local.test_up import Up, manifest

NOISE = ("Unclosed", "Traceback", "Task was destroyed", "Exception ignored")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        splitserve_command(*args), capture_output=True, text=True, env=subprocess_env(), timeout=120
    )


def test_a_taken_port_is_one_line_and_exit_2_before_any_model_loads(tiny_model: Path, tmp_path: Path) -> None:
    with socket.socket() as other_pool:
        other_pool.bind(("127.0.0.1", 0))
        other_pool.listen()
        port = other_pool.getsockname()[1]
        result = run_cli("up", str(manifest(tmp_path, tiny_model)), "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"splitserve up: error: port {port} is already in use (another `splitserve up`?); "
        "stop it or pass --port"
    )
    assert "starting" not in result.stdout and "ready" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("prometheus", ["off", "auto"], ids=["direct-scrape", "local-prometheus"])
def test_stop_is_quiet_and_the_temp_dir_goes_and_no_false_metrics_warning(
    tiny_model: Path, tmp_path: Path, prometheus: str
) -> None:
    """Direct scraping or a real Prometheus (when installed), two prefill workers idle: the
    autoscaler's first scale-down is an event that proves evaluations ran, and none of them may say
    MetricsUnavailable."""
    pool = manifest(
        tmp_path,
        tiny_model,
        prefill={"replicas": {"min": 1, "max": 2, "initial": 2}, "threads": 1},
        autoscaling={
            "intervalSeconds": 1,
            "windowSeconds": 10,
            "scaleDown": {"stabilizationWindowSeconds": 0},
        },
    )
    temp = tmp_path / "tmp"
    temp.mkdir()
    up = Up(str(pool), "--prometheus", prometheus, workdir=None, TMPDIR=str(temp))
    try:
        up.wait_for("ready: OpenAI API at")
        assert [path.name.startswith("splitserve-local-test-") for path in temp.iterdir()] == [True]
        up.wait_for("Autoscaled: prefill: 2 -> 1", timeout=60)
        assert up.interrupt() == 0
        output = up.output()
        assert "MetricsUnavailable" not in output
        assert not any(noise in output for noise in NOISE), output
        assert output.rstrip().endswith("stopped")
        assert list(temp.iterdir()) == []
    finally:
        up.kill()


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_a_second_ctrl_c_kills_everything_at_once(tiny_model: Path, tmp_path: Path) -> None:
    """A worker that cannot drain (stopped with SIGSTOP) holds a graceful stop for STOP_GRACE_S; the
    second Ctrl-C kills it and everything else at once."""
    up = Up(str(manifest(tmp_path, tiny_model)), "--prometheus", "off", workdir=tmp_path / "run")
    try:
        up.wait_for("ready: OpenAI API at")
        processes = children(up.process.pid)
        assert len(processes) == 3  # router, prefill, decode
        os.kill(processes[-1], signal.SIGSTOP)
        up.process.send_signal(signal.SIGINT)
        up.wait_for("Ctrl-C again to kill")
        up.process.send_signal(signal.SIGINT)
        assert up.process.wait(timeout=STOP_GRACE_S / 2) == 130
        assert "killing every process" in up.output()
        for pid in processes:  # reaped by `up`: no such process any more
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        check_port_free(up.port)
    finally:
        up.kill()


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "splitserve 0.1.0"


def test_worker_with_a_missing_model_directory_is_one_line() -> None:
    result = run_cli("worker", "--role", "both", "--model", "/nonexistent/model", "--port", str(free_port()))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "splitserve worker: error: model directory /nonexistent/model does not exist"
    )


@pytest.mark.parametrize(
    ("model", "served"),
    [
        ("/models/llama-3-8b", "llama-3-8b"),
        ("./tiny/", "tiny"),
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
    ],
)
def test_the_served_name_defaults_to_a_model_directorys_name(model: str, served: str) -> None:
    assert EngineConfig(model=model).name == served
    assert EngineConfig(model=model, served_model_name="x").name == "x"


async def wait_healthy(port: int, worker: subprocess.Popen[bytes]) -> None:
    process = LocalProcess("both", port, [], Path("/dev/null"), process=worker)
    async with aiohttp.ClientSession() as session:
        await process.wait_ready(session, limit_s=120)


@pytest.mark.slow
def test_a_worker_run_by_hand_serves_its_directory_name(tiny_model: Path) -> None:
    """The README's `model="tiny"` works against `splitserve worker --model path/to/tiny`; the worker
    exports how long it took to start (the autoscaler's first start-up estimate)."""
    port = free_port()
    worker = subprocess.Popen(
        splitserve_command("worker", "--role", "both", "--model", str(tiny_model), "--port", str(port)),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        asyncio.run(wait_healthy(port, worker))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=60)
        assert [model.id for model in client.models.list()] == ["tiny"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        (startup,) = [line for line in metrics.splitlines() if line.startswith(names.STARTUP_SECONDS + "{")]
        assert float(startup.split()[-1]) > 0, "the worker measured its own start-up"
        reply = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 2
    finally:
        worker.terminate()
        worker.wait(60)
