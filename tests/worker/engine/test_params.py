"""The per-token wire type: NDJSON out of a decode worker, validated on the way into the router."""

from __future__ import annotations

import json

import pytest

from splitserve.engine.params import GenerationChunk


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
