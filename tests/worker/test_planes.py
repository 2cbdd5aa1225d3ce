"""The data plane runs without the control plane: every role, with kopf, kubernetes and the Prometheus
API client unimportable (what the worker image's `worker` extra leaves out)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from splitserve.contract.config import EngineConfig
from splitserve.local.pool import LocalPool, free_port
from tests.conftest import splitserve_command, without_packages

pytestmark = pytest.mark.slow
CONTROL_PLANE = ("kopf", "kubernetes", "prometheus_api_client")


def complete(base_url: str) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    return reply.choices[0].text


async def healthy(url: str, process: subprocess.Popen[bytes], limit: float = 120.0) -> None:
    """Poll GET /health until it answers 200 (bounded; fails fast if the process died)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(int(limit / 0.2)):
            assert process.poll() is None, f"worker exited with {process.returncode}"
            try:
                async with session.get(url + "/health") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never became healthy")


def test_the_block_really_blocks(tmp_path: Path) -> None:
    env = without_packages(tmp_path / "site", *CONTROL_PLANE)
    probe = subprocess.run([sys.executable, "-c", "import kopf"], env=env, capture_output=True, timeout=60)
    assert probe.returncode != 0 and b"ModuleNotFoundError" in probe.stderr


def test_every_worker_role_serves_without_the_control_plane(tiny_model: Path, tmp_path: Path) -> None:
    env = without_packages(tmp_path / "site", *CONTROL_PLANE)
    config = EngineConfig(model=str(tiny_model), served_model_name="tiny", max_model_len=256)
    pool = LocalPool("planes", config, tmp_path / "pool", free_port(), progress=lambda _: None, env=env)
    port = free_port()
    both = subprocess.Popen(
        splitserve_command(
            "worker", "--role", "both", "--model", str(tiny_model), "--served-model-name", "tiny",
            "--port", str(port), "--threads", "1",
        ),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        asyncio.run(pool.start(prefill=1, decode=1))  # prefill, decode and router processes
        assert complete(pool.url)  # router -> prefill -> KV handoff -> decode
        asyncio.run(healthy(f"http://127.0.0.1:{port}", both))
        assert complete(f"http://127.0.0.1:{port}")
    finally:
        both.terminate()
        both.wait(timeout=30)
        asyncio.run(pool.stop())
