"""Examples, the CLI entry point, and the operator's import path (no data plane in it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitserve_operator.main import main, parse_args
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.render import Pool, build_children
from tests.conftest import splitserve_command, without_packages

from .apiserver import eventually
from .conftest import NAMESPACE, Cluster
from .test_crd import SCHEMA, apply_defaults, cel_errors

ROOT = Path(__file__).resolve().parents[2]


# The gpu example downloads from the hub, so it has a model cache claim; tiny-cpu's model is in the image.
@pytest.mark.parametrize(("example", "count"), [("tiny-cpu.yaml", 8), ("gpu-llama-8b.yaml", 9)])
def test_examples_are_valid_pools(example: str, count: int) -> None:
    (pool,) = [doc for doc in yaml.safe_load_all((ROOT / "examples" / example).read_text()) if doc]
    assert (pool["apiVersion"], pool["kind"]) == ("splitserve.io/v1alpha1", "InferencePool")
    spec = InferencePoolSpec.model_validate(pool["spec"])
    assert cel_errors(SCHEMA, apply_defaults(SCHEMA, pool)) == []
    children = build_children(Pool(pool["metadata"]["name"], "default", spec, "worker"), pod_monitor=True)
    assert len(children) == count


def test_operator_imports_no_data_plane() -> None:
    """What operator/Dockerfile ships: no torch/transformers, and of the worker package only the contract."""
    code = (
        "import sys, splitserve_operator.main, splitserve_operator.crd; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'zlib_ng') "
        "or (m.startswith('splitserve.') and not m.startswith('splitserve.contract'))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "worker")])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
async def test_the_operator_runs_without_the_data_plane(cluster: Cluster, tmp_path: Path) -> None:
    """`splitserve operator` as its own process, torch and transformers unimportable (the operator
    image's `operator` extra), logs in through a kubeconfig and reconciles a pool into its children."""
    kubeconfig = tmp_path / "kubeconfig"
    server = {"name": "emulated", "cluster": {"server": str(cluster.server.url)}}
    context = {"name": "test", "context": {"cluster": "emulated", "user": "test", "namespace": NAMESPACE}}
    config = {"apiVersion": "v1", "kind": "Config", "clusters": [server], "contexts": [context]}
    config |= {"users": [{"name": "test", "user": {"token": "unused"}}], "current-context": "test"}
    kubeconfig.write_text(yaml.safe_dump(config))
    env = without_packages(tmp_path / "site", "torch", "transformers")
    env["KUBECONFIG"] = str(kubeconfig)
    args = ("-n", NAMESPACE, "--liveness", "", "--poll-seconds", "0.2", "--resync-seconds", "1")
    process = await asyncio.create_subprocess_exec(
        *splitserve_command("operator", *args), env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await cluster.create_pool("planes")
        deployments = [f"planes-{role}" for role in ("prefill", "decode", "router")]

        def children() -> bool:
            assert process.returncode is None, "the operator exited"
            return all(cluster.get("apps/v1/deployments", name) for name in deployments)

        await eventually(children, limit=60, what="children created by the operator process")
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
            process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert b"ModuleNotFoundError" not in stderr, stderr.decode()[-2000:]


def test_cli_flags() -> None:
    args = parse_args(
        ["-n", "a", "-n", "b", "--prometheus-url", "http://prom:9090", "--peering", "splitserve"]
    )
    assert args.namespaces == ["a", "b"] and args.peering == "splitserve"
    assert parse_args([]).worker_image == "ghcr.io/splitserve/worker:0.1.0"
    assert main(["--poll-seconds", "0"]) == 2
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "--all-namespaces"])
