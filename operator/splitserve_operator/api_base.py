"""What every InferencePool API model shares: the API's names, Kubernetes quantities, CEL rules, the
camelCase base model. `crd.py` turns the models built on it into the CRD under crds/.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

API_GROUP = "splitserve.io"
API_VERSION = "v1alpha1"
KIND = "InferencePool"
PLURAL = "inferencepools"

# The apiserver's own grammar for resource quantities ("500m", "2", "16Gi", "1e3").
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY_PATTERN = rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"


def _quantity_str(value: object) -> object:
    """Quantities are int-or-string in Kubernetes: `nvidia.com/gpu: 1` is as valid as `"1"`."""
    if isinstance(value, bool):
        return value  # rejected by the str schema, as the apiserver would
    return str(value) if isinstance(value, int | float) else value


# A Kubernetes resource quantity such as "500m", 2, "16Gi" or "1e3" (int-or-string on the wire).
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_str),
    Field(
        pattern=QUANTITY_PATTERN,
        max_length=64,
        # pydantic leaves `pattern` out of the JSON schema behind a BeforeValidator; say it again.
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN},
    ),
]
# Free-form Kubernetes core objects (tolerations, affinity, env) that we pass through unchanged.
KubeObject = dict[str, Any]


def cel(rule: str, message: str) -> JsonDict:
    """One `x-kubernetes-validations` entry: the CRD's copy of a cross-field pydantic validator."""
    return {"rule": rule, "message": message}


def validations(*rules: JsonDict) -> ConfigDict:
    """Model config carrying CEL rules; crd.py copies them into the CRD schema of that object."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class ApiModel(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )
