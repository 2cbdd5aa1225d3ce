"""One way to put a pydantic ValidationError into words, for every boundary that reports one.

The CLI prints it as one line, the operator writes it into a `Ready=False` condition, the OpenAI API
names the offending field in a 400: all read the same `where: what` pairs from here.
"""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails

# Validator names pydantic puts into `loc`; they are not part of the user's document.
_VALIDATOR_PARTS = frozenset({"function-after", "function-before", "function-wrap", "function-plain"})


def location(error: ErrorDetails, root: str = "") -> str:
    """The dotted path of one error inside the document (`spec.prefill.replicas`), `root` first."""
    parts = [root] if root else []
    parts += [str(part) for part in error["loc"] if part not in _VALIDATOR_PARTS]
    return ".".join(parts)


def message(error: ErrorDetails) -> str:
    """The error's text without pydantic's `Value error, ` prefix (our validators' messages are whole)."""
    return error["msg"].removeprefix("Value error, ")


def one_line(error: ValidationError, root: str = "") -> str:
    """Every error of `error` as `where: what`, joined by `; ` (`root` names an empty location)."""
    return "; ".join(f"{location(item, root) or 'value'}: {message(item)}" for item in error.errors())
