"""The engine ConfigMap: an InferencePool spec mapped onto the worker's EngineConfig.

The ConfigMap is validated by the worker's own model (splitserve.contract.config, torch-free), so a field the
worker does not know fails here, in the operator, with a readable condition, not in a crash-looping pod.
"""

from __future__ import annotations

import json
from typing import Any

from splitserve.contract.config import EngineConfig
from splitserve_operator import naming
from splitserve_operator.models import InferencePoolSpec
from splitserve_operator.quantity import quantity_bytes


def engine_config(spec: InferencePoolSpec) -> EngineConfig:
    """Settings every role of the pool shares; per-role ones (threads) travel as flags."""
    decode = spec.decode
    kv = spec.kv_cache
    return EngineConfig(
        model=spec.model.name,
        revision=spec.model.revision,
        served_model_name=spec.model.served_name,
        dtype=spec.model.dtype,
        max_model_len=spec.model.max_model_len,
        prefill_chunk_size=spec.prefill.chunk_size,
        max_num_seqs=decode.max_num_seqs,
        kv_cache_bytes=quantity_bytes(decode.kv_cache_bytes) if decode.kv_cache_bytes is not None else None,
        kv_timeout_seconds=spec.kv_transfer.timeout_seconds,
        max_transfer_bytes=quantity_bytes(spec.kv_transfer.max_transfer_bytes),
        block_size=kv.block_size,
        kv_cache_dtype=kv.dtype,
        enable_prefix_caching=kv.prefix_caching,
        routing=spec.routing.config(),
        **_tiers(spec),
    )


def _tiers(spec: InferencePoolSpec) -> dict[str, Any]:
    """The prefix cache's retention tiers: only those the spec sizes (the rest keep EngineConfig's
    defaults, i.e. off)."""
    host, disk = spec.kv_cache.host, spec.kv_cache.disk
    tiers: dict[str, Any] = {}
    if host is not None:
        tiers.update(kv_host_bytes=quantity_bytes(host.size), kv_host_ttl_seconds=host.ttl_seconds)
    if disk is not None:
        tiers.update(
            kv_disk_path=disk.mount_path,
            kv_disk_bytes=quantity_bytes(disk.size),
            kv_disk_ttl_seconds=disk.ttl_seconds,
        )
    return tiers


def engine_json(spec: InferencePoolSpec) -> str:
    """Deterministic JSON (sorted, unset fields left out) so an unchanged spec gives unchanged bytes."""
    config = engine_config(spec)
    return json.dumps(config.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n"


def build_engine_config_map(name: str, namespace: str, spec: InferencePoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": naming.engine_config_name(name),
            "namespace": namespace,
            "labels": naming.common_labels(name),
        },
        "data": {naming.ENGINE_CONFIG_KEY: engine_json(spec)},
    }
