"""Examples, the CLI entry point, and the operator's import path (no data plane in it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitserve_operator.main import main, parse_args
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.render import Pool, build_children

from .test_crd import SCHEMA, apply_defaults, cel_errors

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("example", ["tiny-cpu.yaml", "gpu-llama-8b.yaml"])
def test_examples_are_valid_pools(example: str) -> None:
    (pool,) = [doc for doc in yaml.safe_load_all((ROOT / "examples" / example).read_text()) if doc]
    assert (pool["apiVersion"], pool["kind"]) == ("splitserve.io/v1alpha1", "InferencePool")
    spec = InferencePoolSpec.model_validate(pool["spec"])
    assert cel_errors(SCHEMA, apply_defaults(SCHEMA, pool)) == []
    children = build_children(Pool(pool["metadata"]["name"], "default", spec, "worker"), pod_monitor=True)
    assert len(children) == 11  # ConfigMap, PodMonitor, and per role a Service, Deployment and PDB


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


def test_cli_flags() -> None:
    args = parse_args(
        ["-n", "a", "-n", "b", "--prometheus-url", "http://prom:9090", "--peering", "splitserve"]
    )
    assert args.namespaces == ["a", "b"] and args.peering == "splitserve"
    assert parse_args([]).worker_image == "ghcr.io/splitserve/worker:0.1.0"
    assert main(["--poll-seconds", "0"]) == 2
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "--all-namespaces"])
