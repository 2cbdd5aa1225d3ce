"""The InferencePool's KV cache settings: block size, prefix caching and its retention tiers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from splitserve_operator.api_base import ApiModel, KubeObject, Quantity, cel, validations


class KvHostTier(ApiModel):
    """Evicted prefix-cache blocks kept in each worker's host memory (pinned on GPUs)."""

    size: Quantity = Field(description="Host memory per worker for evicted KV blocks, e.g. `16Gi`.")
    ttl_seconds: float | None = Field(
        None, gt=0, description="How long a block is kept after its last use; unset: until room is needed."
    )


class KvDiskTier(ApiModel):
    """Blocks the host tier lets go of, as checked files on a volume: node-local NVMe (hostPath or a
    local PV), an emptyDir, or a ReadWriteMany claim the pool's workers share."""

    model_config = validations(cel("size(self.volume) == 1", "kvCache.disk.volume takes exactly one source"))

    volume: KubeObject = Field(
        description="A core v1 volume source, e.g. `{emptyDir: {}}` or `{persistentVolumeClaim: {claimName: "
        "kv}}`; mounted in every prefill and decode pod."
    )
    mount_path: str = Field("/var/cache/splitserve/kv", pattern=r"^/", description="Where it is mounted.")
    size: Quantity = Field("10Gi", description="Budget of block files per worker.")
    ttl_seconds: float | None = Field(
        None,
        gt=0,
        description="How long a block file is kept after its last use; unset: until room is needed.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> KvDiskTier:
        if len(self.volume) != 1:
            raise ValueError(f"kvCache.disk.volume takes exactly one source, got {sorted(self.volume)}")
        return self


class KvCacheSpec(ApiModel):
    """The workers' KV cache: block size, prefix caching, and its retention tiers below the device."""

    model_config = validations(
        cel(
            "self.prefixCaching || (!has(self.host) && !has(self.disk))",
            "kvCache.host and kvCache.disk keep prefix-cache blocks: they need prefixCaching",
        )
    )

    block_size: int = Field(16, ge=1, le=4096, description="Tokens per KV block (the unit of reuse).")
    dtype: Literal["auto", "int8"] = Field(
        "auto",
        description="How workers store KV: auto = the model dtype; int8 = symmetric int8 with a scale per "
        "token and head (about half the bytes of bfloat16, so nearly twice the tokens in `kvCacheBytes`), "
        "stored, retained and transferred as int8.",
    )
    prefix_caching: bool = Field(
        True, description="Keep full KV blocks after their request and reuse them for equal prompt prefixes."
    )
    host: KvHostTier | None = Field(None, description="Host-memory tier; off unless sized.")
    disk: KvDiskTier | None = Field(
        None, description="Disk tier behind the host tier; off unless a volume is given."
    )

    @model_validator(mode="after")
    def _tiers_need_prefix_caching(self) -> KvCacheSpec:
        if not self.prefix_caching and (self.host is not None or self.disk is not None):
            raise ValueError(
                "kvCache.host and kvCache.disk keep prefix-cache blocks: they need prefixCaching"
            )
        return self
