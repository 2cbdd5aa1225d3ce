"""Engine settings: one model shared by the CLI flags and the operator's ConfigMap.

Torch-free, so the operator can render a ConfigMap from it without importing the data plane.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
RoutingStrategy = Literal["kv-aware", "least-loaded"]
KVCacheDtype = Literal["auto", "int8"]


def looks_like_path(model: str) -> bool:
    """A local directory rather than a hub id (`org/name` is a hub id; `./org/name` is not)."""
    return model.startswith(("/", ".", "~"))


class RoutingConfig(BaseModel):
    """How the router places requests on the pool's workers: one model for the router's config file and
    the InferencePool's `routing` block (the operator renders it into the pool's ConfigMap).

    A decode worker's score is `cache_weight * hit - load_weight * load`: `hit` is the fraction of the
    prompt's full blocks the router believes the worker holds (its index, see `index_ttl_seconds`),
    `load` is the larger of its KV usage and its running + waiting sequences over the busiest
    candidate's plus one (the request being placed: a full hit then beats an idle worker's cold cache
    until `overload_margin` cuts the credit). A stale index costs a recompute, never wrong output: the
    worker checks its own cache.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    strategy: RoutingStrategy = Field(
        "kv-aware", description="kv-aware: score cached prefix against load; least-loaded: load only."
    )
    cache_weight: float = Field(1.0, ge=0, description="Weight of the prompt's cached fraction.")
    load_weight: float = Field(1.0, ge=0, description="Weight of the worker's load (0..1).")
    overload_margin: int = Field(
        4,
        ge=0,
        description="A worker with this many more running + waiting sequences than the least loaded one "
        "gets no credit for its cache: a conversation follows its history unless that worker is swamped.",
    )
    index_ttl_seconds: float = Field(
        600.0, gt=0, description="How long the router assumes a worker keeps the blocks it routed there."
    )
    local_prefill_max_tokens: int = Field(
        256,
        ge=0,
        description="Conditional disaggregation: a prompt whose uncached part on the chosen decode worker "
        "is at most this many tokens is prefilled there (chunked between its decode steps) instead of on "
        "a prefill worker; 0 = always on a prefill worker while one is up. 256: up to there local "
        "prefill was faster and did not stall running streams (bench/results/conditional.json).",
    )
    migration_limit: int = Field(
        1,
        ge=0,
        description="How many times one stream may move to another decode worker when its own dies "
        "(prompt + tokens so far are resubmitted); 0 = the stream ends with an error event.",
    )


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
    kv_cache_dtype: KVCacheDtype = Field(
        "auto",
        description="How KV is stored: auto = the model dtype; int8 = symmetric int8 with a scale per "
        "token, head and K/V (about half the bytes of bfloat16: nearly twice the tokens in one budget). "
        "Prefill and decode workers of a pool must agree.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Keep full KV blocks after their request ends, addressed by content, and reuse them "
        "for prompts that start with the same tokens (the last prompt token is always computed).",
    )
    kv_host_bytes: int = Field(
        0,
        ge=0,
        description="Host-memory tier of the prefix cache: bytes of evicted device blocks kept in RAM "
        "(pinned on CUDA) and loaded back on a hit instead of recomputed; 0 = off.",
    )
    kv_host_ttl_seconds: float | None = Field(
        None, gt=0, description="How long a block stays in the host tier after its last use; none = no limit."
    )
    kv_disk_path: str | None = Field(
        None,
        description="Disk tier: a directory (node-local NVMe, emptyDir or a PVC the pool shares) that "
        "receives what the host tier lets go of; unset = off.",
    )
    kv_disk_bytes: int = Field(10 << 30, ge=1, description="Disk tier budget in bytes of block files.")
    kv_disk_ttl_seconds: float | None = Field(
        None, gt=0, description="How long a block file stays after its last use; none = no limit."
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="Router only: how requests are placed on the workers."
    )
    kv_timeout_seconds: float = Field(
        60.0, gt=0, description="Decode: how long a registered request waits for its KV cache."
    )
    max_transfer_bytes: int = Field(
        8 << 30, ge=1, description="Decode: largest KV cache accepted for one request."
    )

    @model_validator(mode="after")
    def _tiers_need_the_prefix_cache(self) -> EngineConfig:
        if not self.enable_prefix_caching and (self.kv_host_bytes or self.kv_disk_path):
            raise ValueError(
                "kv_host_bytes and kv_disk_path keep prefix-cache blocks: they need enable_prefix_caching"
            )
        return self

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
