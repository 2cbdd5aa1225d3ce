"""What a model's files say without loading weights: its tokenizer and its context window.

Torch-free, so the router (which tokenizes and checks lengths but never runs the model) reads the
same answers as the workers without importing the engine's forward pass or attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitserve.contract.config import looks_like_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def check_model_source(model: str) -> str:
    """`model` unchanged when it can be loaded as given: a hub id, or a directory with a config.json.
    A path that is not one raises ValueError naming it, instead of the hub's repo-id complaint that
    transformers gives for any string it cannot find on disk."""
    if not looks_like_path(model):
        return model
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json in it)")
    return model


def load_tokenizer(model: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model, revision=revision)
    return tokenizer


def context_length(model: str, revision: str | None = None, max_model_len: int | None = None) -> int:
    """The context window to serve: `max_model_len` if given, within the model's positions."""
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(model, revision=revision).get_text_config()
    return served_context_length(text_config, max_model_len, model)


def served_context_length(text_config: Any, max_model_len: int | None, model: str) -> int:
    """`max_model_len` checked against a loaded config's `max_position_embeddings` (the default)."""
    positions = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        if max_model_len:
            return max_model_len
        raise ValueError(f"{model}: the config has no max_position_embeddings; set --max-model-len")
    if max_model_len and max_model_len > positions:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's {positions} positions")
    return max_model_len or positions
