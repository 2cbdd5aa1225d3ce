"""Images and chart, released the usual way: what the workflows build is what `make images` builds.

No Docker engine or GitHub runner here, so these check the files themselves: the workflows' structure,
the Makefile's commands (`make -n`), the Dockerfiles' stages, users, pinned bases and extras, and that
every version (chart, app, package, default worker image) is the one tag the release pushes.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

from splitserve_operator.pod_security import WORKER_UID

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CHART = yaml.safe_load((ROOT / "charts" / "splitserve" / "Chart.yaml").read_text())
VERSION = CHART["version"]


def workflow(name: str) -> dict[str, Any]:
    document: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads a bare `on` as true
    return document


def runs(document: dict[str, Any]) -> list[str]:
    return [step.get("run", "") for job in document["jobs"].values() for step in job["steps"]]


def make_dry_run(*targets: str, **variables: str) -> list[str]:
    command = ["make", "-n", "--no-print-directory", *targets]
    command += [f"{key}={value}" for key, value in variables.items()]
    # Run from `make test` (CI), the parent's MAKEFLAGS and MAKELEVEL would leak into this make.
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.splitlines()


def test_every_version_is_the_chart_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    values = yaml.safe_load((ROOT / "charts" / "splitserve" / "values.yaml").read_text())
    assert CHART["appVersion"] == project["version"] == VERSION
    assert values["workerImage"] == f"ghcr.io/splitserve/worker:{VERSION}"
    assert values["image"]["repository"] == "ghcr.io/splitserve/operator" and values["image"]["tag"] == ""


def test_make_images_builds_the_operator_and_both_worker_variants_tagged_with_the_version() -> None:
    assert make_dry_run("images") == [
        f"docker build -f operator/Dockerfile -t ghcr.io/splitserve/operator:{VERSION} .",
        f"docker build -f worker/Dockerfile -t ghcr.io/splitserve/worker:{VERSION} .",
        "docker build -f worker/Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu "
        f"-t ghcr.io/splitserve/worker:{VERSION}-cpu .",
    ]
    pushed = make_dry_run("push-images", REGISTRY="ghcr.io/me")
    assert pushed == [f"docker push ghcr.io/me/{image}" for image in
                      (f"operator:{VERSION}", f"worker:{VERSION}", f"worker:{VERSION}-cpu")]  # fmt: skip


def test_the_release_workflow_builds_with_make_and_pushes_images_and_the_oci_chart_on_a_tag() -> None:
    release = workflow("release.yaml")
    assert release["on"]["push"] == {"tags": ["v*"]}
    assert release["permissions"] == {"contents": "read", "packages": "write"}
    commands = "\n".join(runs(release))
    assert 'make images REGISTRY="$REGISTRY"' in commands
    assert 'make push-images REGISTRY="$REGISTRY"' in commands
    assert "make chart-package" in commands and "helm lint charts/splitserve" in commands
    assert 'helm push "build/splitserve-$VERSION.tgz" "oci://$REGISTRY/charts"' in commands
    assert '"$GITHUB_REF_NAME" != "v$version"' in commands, "the tag must be the chart's version"
    (push,) = [
        step
        for job in release["jobs"].values()
        for step in job["steps"]
        if "make push-images" in step.get("run", "")
    ]
    assert push["if"] == "env.PUBLISH == 'true'", "a manual run builds but never pushes"
    assert make_dry_run("chart-package") == ["helm package charts/splitserve --destination build"]


def test_the_kind_workflow_uses_the_same_build_and_a_restricted_namespace() -> None:
    e2e = workflow("e2e.yaml")
    (job,) = e2e["jobs"].values()
    commands = "\n".join(runs(e2e))
    assert "make image-worker-cpu image-operator" in commands and "docker build" not in commands
    tags = {
        line.rsplit(" -t ", 1)[1].removesuffix(" .")
        for line in make_dry_run("image-worker-cpu", "image-operator")
    }
    assert tags == {job["env"]["WORKER_IMAGE"], job["env"]["OPERATOR_IMAGE"]}
    assert "pod-security.kubernetes.io/enforce=restricted" in commands


def dockerfile(path: str) -> str:
    return (ROOT / path).read_text()


def test_both_dockerfiles_are_multi_stage_non_root_pinned_and_install_their_extra() -> None:
    for path, extra, user in [
        ("operator/Dockerfile", "operator", "65532:65532"),
        ("worker/Dockerfile", "worker", f"{WORKER_UID}:{WORKER_UID}"),
    ]:
        text = dockerfile(path)
        assert f'pip install ".[{extra}]"' in text, path
        stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.MULTILINE)
        assert len(stages) == 2 and stages[0][1] == "build", path
        (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", base), (
            f"{path}: pin the exact base, not {base}"
        )
        assert all(image == "${PYTHON_IMAGE}" for image, _ in stages), path
        final = text[text.rindex("\nFROM ") :]
        assert re.findall(r"^USER (\S+)$", final, re.MULTILINE) == [user], path
        assert "COPY --from=build /opt/venv /opt/venv" in final and "pip install" not in final, path
