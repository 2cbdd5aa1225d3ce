"""One wording of a ValidationError for every boundary: CLI, operator conditions, OpenAI 400s."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError, field_validator

from splitserve.contract.errors import one_line


def test_validation_message_uses_wire_paths() -> None:
    from splitserve_operator.models import InferencePoolSpec

    with pytest.raises(ValidationError) as info:
        InferencePoolSpec.model_validate(
            {"model": {"name": "m", "maxModelLen": 1}, "prefill": {"replicas": {"min": -1}}}
        )
    message = one_line(info.value, root="spec")
    assert "spec.model.maxModelLen: Input should be greater than or equal to 16" in message
    assert "spec.prefill.replicas.min" in message


class _Thing(BaseModel):
    count: int = Field(ge=1)

    @field_validator("count")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("count must be odd")
        return value


def test_one_line_joins_every_error_and_drops_pydantic_prefixes() -> None:
    with pytest.raises(ValidationError) as info:
        _Thing.model_validate({"count": 2})
    assert one_line(info.value) == "count: count must be odd"
    with pytest.raises(ValidationError) as info:
        _Thing.model_validate([])
    assert one_line(info.value).startswith("value: ")
    assert "\n" not in one_line(info.value, root="spec")
