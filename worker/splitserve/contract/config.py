"""Engine settings: one model shared by the CLI flags and the operator's ConfigMap.

Torch-free, so the operator can render a ConfigMap from it without importing the data plane.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def looks_like_path(model: str) -> bool:
    """A local directory rather than a hub id (`org/name` is a hub id; `./org/name` is not)."""
    return model.startswith(("/", ".", "~"))


class EngineConfig(BaseModel):
    """Everything a worker needs to load a model and size its batches; each field says why it exists."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, description="Hugging Face model id or local directory.")
    revision: str | None = Field(None, description="Hub revision, so rollouts pin exact weights.")
    served_model_name: str | None = Field(
        None,
        description="Name clients use in requests; defaults to `model`, or a local model directory's name.",
    )
    dtype: Dtype = Field("auto", description="auto = bfloat16 on CUDA, float32 on CPU (CPU bf16 is slow).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present.")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads; pin to the cores the worker owns so pools don't contend."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context window; defaults to the model's max_position_embeddings."
    )
    prefill_chunk_size: int = Field(
        512, ge=16, description="Prompt tokens per forward: bounds activation memory of long prompts."
    )
    chunked_prefill: bool = Field(
        False,
        description="`both` only: interleave prefill chunks with decode steps (Sarathi-Serve) so a long "
        "prompt does not stall running streams.",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one decode batch.")
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="KV budget; defaults to 90% of free GPU memory, or 2 GiB on CPU."
    )
    block_size: int = Field(
        16,
        ge=1,
        le=4096,
        description="Tokens per KV block: sequences take memory one block at a time as they grow.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Keep full KV blocks after their request ends, addressed by content, and reuse them "
        "for prompts that start with the same tokens (the last prompt token is always computed).",
    )
    kv_timeout_seconds: float = Field(
        60.0, gt=0, description="Decode: how long a registered request waits for its KV cache."
    )
    max_transfer_bytes: int = Field(
        8 << 30, ge=1, description="Decode: largest KV cache accepted for one request."
    )

    @property
    def name(self) -> str:
        """The served name: `/models/llama-3` serves as `llama-3` (what a client would guess), a hub
        id as itself (as vLLM does)."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).expanduser().name if looks_like_path(self.model) else self.model

    @classmethod
    def from_file(cls, path: Path, **overrides: object) -> EngineConfig:
        """Load YAML or JSON (the operator mounts `engine.json`), then apply CLI overrides."""
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of engine settings")
        data.update({key: value for key, value in overrides.items() if value is not None})
        return cls.model_validate(data)
