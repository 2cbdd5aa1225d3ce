"""Compare what the operator wants with what the apiserver has, and patch only the difference.

The apiserver adds defaults (protocol: TCP, terminationMessagePath, ...) and canonicalizes
quantities, so "desired == actual" never holds on a real cluster. `covers` asks the right question
instead: does the live object already carry every field the operator sets?
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from splitserve_operator.quantity import same_quantity

# Maps whose values are quantities (container resources).
_QUANTITY_MAPS = frozenset({"limits", "requests"})
# Label selectors: an extra key changes what they select, so they must match exactly.
_EXACT_MAPS = frozenset({"selector", "matchLabels"})


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def covers(actual: Any, desired: Any, *, _quantities: bool = False, _exact: bool = False) -> bool:
    """Whether `actual` holds every field of `desired` (extra fields in `actual` are fine).

    `None` in `desired` means "must be absent": that is how a field the operator used to set, and
    no longer does, gets removed (a merge patch deletes keys set to null). Empty containers match
    absent ones, since the apiserver drops empty maps and lists.
    """
    if isinstance(desired, Mapping):
        if _empty(desired) and _empty(actual):
            return True
        if not isinstance(actual, Mapping) or (_exact and set(actual) - set(desired)):
            return False
        for key, want in desired.items():
            have = actual.get(key)
            if want is None or _empty(want):
                if not _empty(have):
                    return False
            elif not covers(
                have, want, _quantities=_quantities or key in _QUANTITY_MAPS, _exact=key in _EXACT_MAPS
            ):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return _empty(desired) and _empty(actual)
        return all(covers(have, want) for have, want in zip(actual, desired, strict=True))
    if _quantities and same_quantity(actual, desired):
        return True
    return bool(actual == desired) and isinstance(actual, bool) == isinstance(desired, bool)


def merge_diff(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest JSON merge patch that turns `current` into one carrying `desired`'s fields.

    Keys absent from `desired` are left alone: other writers (the autoscaler) own them.
    Lists are compared whole, as a merge patch replaces them whole.
    """
    current = current or {}
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = current.get(key)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = merge_diff(have, want)
            if sub:
                patch[key] = sub
        elif have != want or (want is None and key in current):
            patch[key] = want
    return patch


def with_removals(actual: Any, desired: Any, *, _exact: bool = False) -> Any:
    """`desired` plus null for keys someone added to a label selector: how a merge patch drops them."""
    if not isinstance(desired, Mapping) or not isinstance(actual, Mapping):
        return desired
    result = {
        key: with_removals(actual.get(key), want, _exact=key in _EXACT_MAPS) for key, want in desired.items()
    }
    if _exact:
        result.update({key: None for key in actual if key not in desired})
    return result


def strip_nones(value: Any) -> Any:
    """The object without its "must be absent" markers: the form to create it in."""
    if isinstance(value, Mapping):
        return {k: strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nones(v) for v in value]
    return value
