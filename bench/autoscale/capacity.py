"""The pools' capacity model: prefill time over prompt length, decode step time over batch size.

Capacity file (`--capacity FILE`, JSON, schema "splitserve.capacity/v1"):

    {
      "schema": "splitserve.capacity/v1",
      "description": "what was measured, on what",              # free text
      "prefill": {"points": [{"prompt_tokens": 256, "seconds": 0.028}, ...]},
      "decode": {"max_num_seqs": 32, "context_tokens": 128,
                 "points": [{"batch_size": 1, "step_seconds": 0.0031}, ...]},
      "kv_capacity_tokens": 524288                              # optional: KV budget per decode replica
    }

`prefill.points`: seconds for one prefill forward of `prompt_tokens` tokens (batch 1) on one replica;
`decode.points`: seconds of one decode step over `batch_size` sequences on one replica. Lines are
fitted to both by least squares (time = base + per_unit * x), so any worker benchmark that reports
such points can feed the bench; at least two points each. Extra keys are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

SCHEMA = "splitserve.capacity/v1"
# Scalars or numpy arrays of them: the simulator prices a second's sampled requests at once.
Num = TypeVar("Num", float, NDArray[np.float64])


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), intercept clamped at zero (no negative fixed costs)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("need at least two distinct points to fit a line")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    intercept = mean_y - slope * mean_x
    if intercept < 0:  # refit through the origin
        return 0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    return intercept, slope


@dataclass(frozen=True)
class Capacity:
    prefill_base: float  # seconds per prompt
    prefill_per_token: float  # seconds per prompt token
    decode_base: float  # seconds per step
    decode_per_seq: float  # seconds per sequence in the batch
    max_num_seqs: int
    kv_capacity_tokens: float
    description: str = ""

    def prefill_seconds(self, prompt_tokens: Num) -> Num:
        return self.prefill_base + self.prefill_per_token * prompt_tokens

    def step_seconds(self, batch: Num) -> Num:
        return self.decode_base + self.decode_per_seq * batch

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capacity:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"capacity file: expected schema {SCHEMA!r}, got {data.get('schema')!r}")
        try:
            prefill = [(float(p["prompt_tokens"]), float(p["seconds"])) for p in data["prefill"]["points"]]
            decode = [(float(p["batch_size"]), float(p["step_seconds"])) for p in data["decode"]["points"]]
            max_num_seqs = int(data["decode"].get("max_num_seqs", max(b for b, _ in decode)))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"capacity file: malformed points ({error})") from error
        p_base, p_slope = fit_line(*zip(*prefill, strict=True))
        d_base, d_slope = fit_line(*zip(*decode, strict=True))
        return cls(
            p_base,
            p_slope,
            d_base,
            d_slope,
            max_num_seqs,
            float(data.get("kv_capacity_tokens", 1e12)),
            str(data.get("description", "")),
        )

    @classmethod
    def load(cls, path: Path) -> Capacity:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read capacity file {path}: {error}") from error

    def summary(self) -> dict[str, float | int | str]:
        return {
            "prefill_base_seconds": self.prefill_base,
            "prefill_seconds_per_token": self.prefill_per_token,
            "decode_step_base_seconds": self.decode_base,
            "decode_step_seconds_per_seq": self.decode_per_seq,
            "max_num_seqs": self.max_num_seqs,
            "kv_capacity_tokens": self.kv_capacity_tokens,
        }
