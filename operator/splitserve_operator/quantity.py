"""Kubernetes resource quantities ("500m", "16Gi", "1e3") as exact numbers.

Needed twice: byte sizes in the spec become plain integers in the engine config, and the apiserver
rewrites quantities into canonical form ("1000m" -> "1"), so drift detection compares values.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from splitserve_operator.api_base import QUANTITY_PATTERN

_SUFFIXES = {
    "n": Decimal(10) ** -9, "u": Decimal(10) ** -6, "m": Decimal(10) ** -3, "": Decimal(1),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}  # fmt: skip
_SPLIT = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """The exact value of a quantity; ValueError when it is not one."""
    text = str(value).strip()
    if not re.match(QUANTITY_PATTERN, text):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    match = _SPLIT.match(text)
    assert match is not None  # the pattern above guarantees a leading number
    number, suffix = match.groups()
    try:
        if suffix in _SUFFIXES:
            return Decimal(number) * _SUFFIXES[suffix]
        return Decimal(number + suffix)  # decimal exponent: "1e3", "2E-2"
    except InvalidOperation as exc:
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from exc


def quantity_bytes(value: str | int) -> int:
    """A byte size as an integer, rounded up like the apiserver rounds fractional bytes."""
    return math.ceil(parse_quantity(value))


def cpu_threads(value: str | int) -> int:
    """Whole CPUs of a CPU quantity, at least one: the default torch thread count of a worker."""
    return max(1, math.floor(parse_quantity(value)))


def same_quantity(a: object, b: object) -> bool:
    """Whether two values are the same quantity, whatever their spelling ("1" == "1000m" == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if not isinstance(a, str | int) or not isinstance(b, str | int):
        return False
    try:
        return parse_quantity(a) == parse_quantity(b)
    except ValueError:
        return False
