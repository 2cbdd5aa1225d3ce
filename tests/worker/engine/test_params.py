"""The per-token wire type (NDJSON out of a decode worker, validated on the way into the router), and
the request limits every boundary applies."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from splitserve.contract.errors import location
from splitserve.engine.params import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MIN_TEMPERATURE,
    GenerationChunk,
    GenerationError,
    SamplingParams,
    check_vocabulary,
)


def test_round_trip() -> None:
    chunk = GenerationChunk((5, 6), "length")
    assert GenerationChunk.from_json(json.loads(chunk.to_json())) == chunk
    assert GenerationChunk.from_json({"token_ids": [7]}) == GenerationChunk((7,))


@pytest.mark.parametrize(
    "line",
    [
        [1, 2],
        {"token_ids": "12"},
        {"token_ids": [1.5]},
        {"token_ids": [True]},
        {"token_ids": [1], "finish_reason": "eos"},
        {"token_ids": [1], "extra": 1},
    ],
)
def test_malformed_lines_are_refused(line: object) -> None:
    with pytest.raises(ValueError):
        GenerationChunk.from_json(line)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"temperature": 1e-45}, "temperature"),
        ({"temperature": 5e-324}, "temperature"),
        ({"temperature": MIN_TEMPERATURE / 2}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"stop_token_ids": (-5000,)}, "stop_token_ids.0"),
        ({"stop_token_ids": (2**70,)}, "stop_token_ids.0"),
        ({"stop_token_ids": tuple(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
        ({"stop": ("x" * (MAX_STOP_CHARS + 1),)}, "stop.0"),
        ({"stop": ("",)}, "stop.0"),
        ({"stop": ("x",) * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"top_k": 2**40}, "top_k"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ],
)
def test_sampling_limits_are_enforced_wherever_params_are_built(
    fields: dict[str, object], where: str
) -> None:
    """The same model validates the OpenAI request's sampling and the internal API's bodies."""
    with pytest.raises(ValidationError) as caught:
        SamplingParams.model_validate(fields)
    assert location(caught.value.errors()[0]) == where


def test_limits_admit_their_edges() -> None:
    SamplingParams(temperature=0.0)
    SamplingParams(temperature=MIN_TEMPERATURE, seed=-(2**63), stop_token_ids=(0,) * MAX_STOP_TOKEN_IDS)
    SamplingParams(stop=("x" * MAX_STOP_CHARS,) * MAX_STOP_STRINGS, min_tokens=16, max_tokens=16)


def test_token_ids_are_checked_against_the_vocabulary() -> None:
    check_vocabulary([0, 345], SamplingParams(stop_token_ids=(345,)), 346)
    for prompt, stops, field in (([346], (), "prompt"), ([1], (346,), "stop_token_ids")):
        with pytest.raises(GenerationError) as caught:
            check_vocabulary(prompt, SamplingParams(stop_token_ids=stops), 346)
        assert (caught.value.status, caught.value.param) == (400, field)
