"""Load any Hugging Face causal LM and its tokenizer, from a local directory or a hub id."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from splitserve.contract.config import EngineConfig
from splitserve.engine import attention
from splitserve.engine.kv_cache import KVLayout
from splitserve.engine.model_info import load_tokenizer, served_context_length

log = logging.getLogger(__name__)

CPU_KV_BUDGET_BYTES = 2 << 30
GPU_KV_MEMORY_FRACTION = 0.9

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: KVLayout
    device: torch.device
    max_model_len: int
    eos_token_ids: frozenset[int]
    kv_budget_bytes: int

    @property
    def vocab_size(self) -> int:
        """The token ids this model can read (rows of its embedding, and the logits' width)."""
        return int(self.model.config.get_text_config().vocab_size)


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(config: EngineConfig) -> LoadedModel:
    """Load weights with splitserve's ragged attention plugged in, and size the KV budget."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    log.info(
        "loading model",
        extra={
            "model": config.model,
            "revision": config.revision,
            "device": str(device),
            "dtype": str(dtype),
            "kv_cache_dtype": config.kv_cache_dtype,
        },
    )
    started = time.monotonic()
    tokenizer = load_tokenizer(config.model, config.revision)
    model = AutoModelForCausalLM.from_pretrained(
        config.model, revision=config.revision, dtype=dtype, attn_implementation=attention.ATTENTION_NAME
    )
    # In place, through nn.Module: transformers' decorated .to()/.eval() are opaque to mypy.
    torch.nn.Module.to(model, device)
    torch.nn.Module.eval(model)
    text_config = model.config.get_text_config()
    _check_supported(model, text_config)
    layout = kv_layout(text_config, torch.int8 if config.kv_cache_dtype == "int8" else dtype)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        device=device,
        max_model_len=served_context_length(text_config, config.max_model_len, config.model),
        eos_token_ids=_eos_ids(model, tokenizer),
        kv_budget_bytes=config.kv_cache_bytes or _default_kv_budget(device),
    )
    log.info(
        "model loaded",
        extra={
            "seconds": round(time.monotonic() - started, 2),
            "parameters": sum(p.numel() for p in model.parameters()),
            "kv_bytes_per_token": layout.bytes_per_token,
            "kv_budget_tokens": loaded.kv_budget_bytes // layout.bytes_per_token,
        },
    )
    return loaded


def kv_layout(text_config: Any, dtype: torch.dtype) -> KVLayout:
    """KV shape from a transformers config (num_key_value_heads and head_dim are optional there),
    stored as `dtype` (the model's, or int8)."""
    heads = text_config.num_attention_heads
    return KVLayout(
        num_layers=text_config.num_hidden_layers,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        dtype=dtype,
    )


def _check_supported(model: PreTrainedModel, text_config: Any) -> None:
    """Refuse architectures whose attention cannot be swapped for ours, with a reason."""
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not support pluggable attention in transformers")
    if getattr(text_config, "attn_logit_softcapping", None):
        raise ValueError(f"{name} uses attention logit soft-capping, which splitserve does not implement")


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    generation_eos = getattr(model.generation_config, "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return frozenset(ids)


def _default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_MEMORY_FRACTION)
    return CPU_KV_BUDGET_BYTES
