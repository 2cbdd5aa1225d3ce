"""Kubernetes quantities: parsing, comparison and the helpers the renderer uses."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from splitserve_operator.models import KvTransferSpec, ResourceRequirements
from splitserve_operator.quantity import cpu_threads, parse_quantity, quantity_bytes, same_quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 << 30),
        ("500m", Decimal("0.5")),
        ("1e3", 1000),
        ("2G", 2 * 10**9),
        (".5Ki", 512),
        (3, 3),
        ("+1", 1),
    ],
)
def test_parse_quantity(text: str | int, value: Decimal | int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1..2", "Gi", "1GB", "1 Gi", "-"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_quantity_helpers_and_model() -> None:
    assert quantity_bytes("1.5Ki") == 1536 and quantity_bytes("1500m") == 2
    assert cpu_threads("500m") == 1 and cpu_threads("3.9") == 3
    assert same_quantity("1", "1000m") and same_quantity(2, "2") and not same_quantity("1", "1Ki")
    assert not same_quantity(True, "1")
    assert ResourceRequirements.model_validate({"limits": {"nvidia.com/gpu": 1}}).limits == {
        "nvidia.com/gpu": "1"
    }
    with pytest.raises(ValidationError):
        KvTransferSpec(max_transfer_bytes="1..2")
