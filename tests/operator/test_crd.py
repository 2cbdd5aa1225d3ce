"""The CRD: generated from the models, structural, and its CEL rules agree with the pydantic validators."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from pydantic import ValidationError

from splitserve_operator import crd
from splitserve_operator.models import InferencePoolSpec

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
ALLOWED_KEYS = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "anyOf",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


@pytest.mark.parametrize("directory", ["crds", "charts/splitserve/crds"])
def test_committed_crd_matches_the_models(directory: str) -> None:
    committed = (ROOT / directory / crd.FILENAME).read_text()
    assert committed == crd.render_yaml(), (
        "run: python -m splitserve_operator.crd --out crds/ --out charts/splitserve/crds/"
    )
    assert crd.main(["--check", "--out", str(ROOT / directory)]) == 0


def test_check_flags_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / crd.FILENAME).write_text("stale")
    assert crd.main(["--check", "--out", str(tmp_path)]) == 1
    assert crd.main(["--out", str(tmp_path)]) == 0
    assert yaml.safe_load((tmp_path / crd.FILENAME).read_text()) == crd.crd_manifest()


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        found += walk(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += walk(node[key], f"{path}[]")
    return found


def test_schema_is_structural() -> None:
    for path, node in walk(SCHEMA):
        assert set(node) <= ALLOWED_KEYS, (path, set(node) - ALLOWED_KEYS)
        if "anyOf" in node:  # only int-or-string quantities
            assert node.get("x-kubernetes-int-or-string") and "type" not in node, path
        else:
            assert "type" in node, f"{path} has no type"
        if node.get("type") == "object" and "properties" not in node and path != ".metadata":
            assert "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not isinstance(node.get("exclusiveMinimum"), int | float) or node["exclusiveMinimum"] is True


def test_crd_names_printer_columns_and_status() -> None:
    spec = crd.crd_manifest()["spec"]
    assert spec["group"] == "splitserve.io"  # not inference.networking.x-k8s.io: both install side by side
    assert spec["names"]["shortNames"] and spec["names"]["categories"] == ["splitserve"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["TTFT"] == ".status.prefill.observedLatencySeconds"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Hit"] == ".status.prefixHitRatio"
    assert list(columns)[-1] == "Age"


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the apiserver does before validation: fill defaults, top-down."""
    if not isinstance(value, dict):
        return value
    result = dict(value)
    for key, sub in (schema.get("properties") or {}).items():
        if key not in result and "default" in sub:
            result[key] = copy.deepcopy(sub["default"])
        if key in result:
            result[key] = apply_defaults(sub, result[key])
    return result


def cel_errors(schema: dict[str, Any], value: Any) -> list[str]:
    """Evaluate every x-kubernetes-validations rule of `schema` on `value`, recursively (cel-python)."""
    env = celpy.Environment()
    messages = []
    for rule in schema.get("x-kubernetes-validations") or []:
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            messages.append(rule["message"])
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                messages += cel_errors(sub, value[key])
    return messages


CASES: list[dict[str, Any]] = [
    {},
    {"prefill": {"replicas": {"min": 3, "max": 2}}},
    {"prefill": {"replicas": {"min": 2, "max": 2, "initial": 2}}},
    {"decode": {"replicas": {"min": 1, "max": 4, "initial": 5}}},
    {"decode": {"replicas": {"min": 2, "max": 4, "initial": 1}}},
    {"prefill": {"replicas": {"min": 0, "max": 2, "initial": 0}}},
    {"decode": {"replicas": {"min": 0, "max": 2}}},
    {"decode": {"replicas": {"min": 0, "max": 2, "initial": 1}}},
    {"prefill": {"replicas": {"min": 0}}, "autoscaling": {"budget": {"maxReplicasTotal": 2}}},
    {"autoscaling": {"intervalSeconds": 30, "windowSeconds": 20}},
    {"autoscaling": {"intervalSeconds": 30, "windowSeconds": 30}},
    {"model": {"name": "m", "source": {"hub": {}, "pvc": {"claimName": "w"}}}},
    {"model": {"name": "m", "source": {"hostPath": {"path": "/cache"}}}},
    {"model": {"name": "m", "source": {"pvc": {"claimName": "w"}, "hostPath": {"path": "/c"}, "hub": {}}}},
    {"kvCache": {"prefixCaching": False}},
    {"kvCache": {"prefixCaching": False, "host": {"size": "1Gi"}}},
    {"kvCache": {"host": {"size": "8Gi", "ttlSeconds": 600}, "disk": {"volume": {"emptyDir": {}}}}},
    {"kvCache": {"disk": {"volume": {"emptyDir": {}, "hostPath": {"path": "/nvme"}}}}},
    {"kvCache": {"disk": {"volume": {}}}},
    {"kvCache": {"dtype": "int8"}},
    {"autoscaling": {"budget": {}}},
    {"autoscaling": {"budget": {"maxReplicasTotal": 3}}, "decode": {"replicas": {"min": 3, "max": 4}}},
    {"autoscaling": {"budget": {"maxReplicasTotal": 4}}, "decode": {"replicas": {"min": 3, "max": 4}}},
    {
        "autoscaling": {"budget": {"maxAcceleratorsTotal": 5}},
        "prefill": {"replicas": {"min": 2, "max": 4}, "resources": {"limits": {"nvidia.com/gpu": 2}}},
        "decode": {"resources": {"requests": {"nvidia.com/gpu": "2"}}},
    },
    {
        "autoscaling": {"budget": {"maxAcceleratorsTotal": 6}},
        "prefill": {"replicas": {"min": 2, "max": 4}, "resources": {"limits": {"nvidia.com/gpu": 2}}},
        "decode": {"resources": {"requests": {"nvidia.com/gpu": "2"}}},
    },
    {
        "autoscaling": {"budget": {"maxAcceleratorsTotal": 1, "accelerator": "amd.com/gpu"}},
        "prefill": {"replicas": {"min": 2, "max": 4}, "resources": {"limits": {"nvidia.com/gpu": 2}}},
    },
]


@pytest.mark.parametrize("overrides", CASES)
def test_cel_rules_agree_with_pydantic(overrides: dict[str, Any]) -> None:
    spec = {"model": {"name": "org/model"}, **overrides}
    try:
        InferencePoolSpec.model_validate(spec)
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    spec_schema = SCHEMA["properties"]["spec"]
    assert (cel_errors(spec_schema, apply_defaults(spec_schema, spec)) == []) == pydantic_ok


def test_defaults_match_pydantic() -> None:
    """The apiserver's defaulting yields the same spec pydantic does."""
    spec_schema = SCHEMA["properties"]["spec"]
    defaulted = apply_defaults(spec_schema, {"model": {"name": "m"}})
    assert InferencePoolSpec.model_validate(defaulted) == InferencePoolSpec.model_validate(
        {"model": {"name": "m"}}
    )
    assert defaulted["autoscaling"]["scaleDown"]["stabilizationWindowSeconds"] == 300


@pytest.mark.parametrize(
    ("name", "ok"), [("tiny", True), ("a" * 55, True), ("a" * 56, False), ("9lives", False), ("Upper", False)]
)
def test_name_rules(name: str, ok: bool) -> None:
    assert (cel_errors(SCHEMA, {"metadata": {"name": name}}) == []) == ok


def test_readme_crd_reference_matches_the_models() -> None:
    readme = ROOT / "README.md"
    assert crd.with_reference(readme.read_text()) == readme.read_text(), (
        "README's CRD reference is stale: python -m splitserve_operator.crd --readme README.md"
    )
    assert crd.main(["--check", "--readme", str(readme)]) == 0
