"""Generate the InferencePool CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3.0 schema: no `$ref`, no
`anyOf` for Optional, no `const`, no `additionalProperties: false`, boolean `exclusiveMinimum`, and
`x-kubernetes-*` markers for free-form objects and int-or-string quantities. This module does that
conversion, so the models stay the single source of truth:

    python -m splitserve_operator.crd --out crds/ --out charts/splitserve/crds/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import PydanticUndefined, core_schema

from splitserve_operator import naming
from splitserve_operator.api_base import API_GROUP, API_VERSION, KIND, PLURAL
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.status_models import InferencePoolStatus

Schema = dict[str, Any]

SHORT_NAMES = ["sspool", "ssp"]
CATEGORIES = ["splitserve"]
FILENAME = f"{PLURAL}.{API_GROUP}.yaml"

PRINTER_COLUMNS: list[Schema] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {
        "name": "Prefill",
        "type": "string",
        "jsonPath": ".status.prefill.ready",
        "description": "Ready/desired prefill replicas.",
    },
    {
        "name": "Decode",
        "type": "string",
        "jsonPath": ".status.decode.ready",
        "description": "Ready/desired decode replicas.",
    },
    {
        "name": "TTFT",
        "type": "number",
        "jsonPath": ".status.prefill.observedLatencySeconds",
        "description": "Time to first token (s) at the prefill SLO percentile.",
    },
    {
        "name": "ITL",
        "type": "number",
        "jsonPath": ".status.decode.observedLatencySeconds",
        "description": "Inter-token latency (s) at the decode SLO percentile.",
    },
    {
        "name": "Hit",
        "type": "number",
        "jsonPath": ".status.prefixHitRatio",
        "description": "Prefix-cache hit ratio: cached / looked-up prompt tokens over the window.",
    },
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# The CRD's copy of naming.pool_name_problem(): only the root schema may look at metadata.name.
NAME_RULES: list[Schema] = [
    {"rule": f"self.metadata.name.size() <= {naming.MAX_POOL_NAME}", "message": naming.NAME_TOO_LONG},
    {"rule": f"self.metadata.name.matches('{naming.POOL_NAME_PATTERN}')", "message": naming.NAME_NOT_DNS},
]


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also show `default_factory` defaults, so the apiserver fills nested objects like pydantic does."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        default = schema.get("default", NoDefault)
        return NoDefault if default is PydanticUndefined else default


def _compact(value: Any) -> Any:
    """A default without nulls (pruned on non-nullable fields anyway) or nested empty containers.

    Nested `{}`/`[]` would only add noise to every stored object; the apiserver still applies
    the inner fields' own defaults.
    """
    if isinstance(value, dict):
        items = {k: _compact(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not None and v != {} and v != []}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


class _NoAliases(yaml.SafeDumper):
    """Write shared sub-objects in full: anchors make a CRD hard to read and to diff."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _structural(node: Schema, defs: Schema, keep_defaults: bool) -> Schema:
    """Turn one pydantic JSON-schema node (and its children) into a structural CRD schema node."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        node = {**defs[ref.removeprefix("#/$defs/")], **node}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        # Optional[X] -> X: absence (or a pruned null) means None, as in pydantic.
        options = [option for option in any_of if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions are not structural: {any_of}")
        # Each part once: converting the inner model's properties twice would nest int-or-string.
        return {**_structural(options[0], defs, keep_defaults), **_structural(node, defs, keep_defaults)}
    node.pop("title", None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("Minimum", "Maximum"):
        exclusive = node.get(f"exclusive{bound}")
        if isinstance(exclusive, int | float) and not isinstance(exclusive, bool):
            node[bound.lower()] = exclusive
            node[f"exclusive{bound}"] = True
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "default" in node:
        default = node.pop("default")
        # An empty default only matters on an object with properties: it triggers their defaults.
        meaningful = default not in (None, [], {}) or (default == {} and "properties" in node)
        if keep_defaults and meaningful:
            node["default"] = _compact(default)
    if "properties" in node:
        node["properties"] = {
            key: _structural(value, defs, keep_defaults) for key, value in node["properties"].items()
        }
    extra = node.pop("additionalProperties", None)
    if isinstance(extra, dict):
        node["additionalProperties"] = _structural(extra, defs, keep_defaults)
    elif extra is True and "properties" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in node:
        node["items"] = _structural(node["items"], defs, keep_defaults)
    return node


def openapi_schema(model: type[BaseModel], *, keep_defaults: bool = True) -> Schema:
    """The structural OpenAPI v3 schema of a pydantic model, camelCase as on the wire."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs, keep_defaults)


def crd_manifest() -> Schema:
    """The whole CustomResourceDefinition, as applied to a cluster."""
    root: Schema = {
        "type": "object",
        "description": "A model served with prefill and decode on separate pools, each scaled on its "
        "own latency SLO (TTFT for prefill, ITL for decode).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": openapi_schema(InferencePoolSpec),
            # Status defaults would be invented data; the operator writes every field it owns.
            "status": openapi_schema(InferencePoolStatus, keep_defaults=False),
        },
        "x-kubernetes-validations": NAME_RULES,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {naming.NAME_LABEL: "splitserve", "app.kubernetes.io/part-of": "splitserve"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_yaml() -> str:
    header = (
        "# Generated from operator/splitserve_operator/models.py by `python -m splitserve_operator.crd`.\n"
        "# Do not edit: change the models and regenerate.\n"
    )
    body = yaml.dump(crd_manifest(), Dumper=_NoAliases, sort_keys=True, width=100, allow_unicode=True)
    return header + body


README_START = (
    "<!-- crd-reference:start: generated by `python -m splitserve_operator.crd --readme README.md` -->"
)
README_END = "<!-- crd-reference:end -->"


def reference_markdown() -> str:
    """The spec's fields as a Markdown table, from the same schema the CRD carries."""
    rows = ["| Field | Type | Default | Description |", "|---|---|---|---|"]

    def walk(node: Schema, path: str) -> None:
        required = set(node.get("required", []))
        for name, child in node.get("properties", {}).items():
            field = f"{path}.{name}"
            # Objects' defaults are their fields' defaults, listed on those fields' own rows.
            shown = "default" in child and "properties" not in child
            default = f"`{json.dumps(child['default'])}`" if shown else ""
            text = ("**required.** " if name in required else "") + " ".join(
                child.get("description", "").split()
            )
            text = text.replace("|", "\\|")
            rows.append(f"| `{field}` | {type_name(child)} | {default} | {text} |")
            if "properties" in child:
                walk(child, field)

    walk(openapi_schema(InferencePoolSpec), "spec")
    return "\n".join(rows) + "\n"


def type_name(node: Schema) -> str:
    """A JSON-schema node's type in a reference table: `a` \\| `b`, quantity, []T, map[string]T."""
    if "enum" in node:
        return " \\| ".join(f"`{value}`" for value in node["enum"])
    if node.get("x-kubernetes-int-or-string"):
        return "quantity"
    if node.get("type") == "array":
        return "[]" + type_name(node.get("items", {}))
    values = node.get("additionalProperties")
    if isinstance(values, dict):
        return "map[string]" + type_name(values)
    return str(node.get("type", "object"))


def between_markers(text: str, start_marker: str, end_marker: str, body: str) -> str:
    """`text` with what lies between two marker lines replaced by `body` (generated sections)."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"no {start_marker!r} ... {end_marker!r} markers")
    return text[: start + len(start_marker)] + "\n\n" + body + "\n" + text[end:]


def with_reference(readme: str) -> str:
    """`readme` with the text between the CRD reference markers regenerated."""
    return between_markers(readme, README_START, README_END, reference_markdown())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitserve_operator.crd",
        description="Generate the InferencePool CRD and its reference.",
    )
    parser.add_argument("--out", action="append", type=Path, default=[], help="CRD directory (repeatable)")
    parser.add_argument("--readme", type=Path, help="rewrite the CRD reference section of this README")
    parser.add_argument("--check", action="store_true", help="fail if the files differ instead of writing")
    args = parser.parse_args(argv)
    if not args.out and not args.readme:
        parser.error("give --out and/or --readme")
    wanted = {directory / FILENAME: render_yaml() for directory in args.out}
    if args.readme:
        wanted[args.readme] = with_reference(args.readme.read_text())
    stale = []
    for path, text in wanted.items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m splitserve_operator.crd", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
