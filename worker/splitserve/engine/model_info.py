"""What a model's files say without loading weights: its tokenizer and its context window.

Torch-free, so the router (which tokenizes and checks lengths but never runs the model) reads the
same answers as the workers without importing the engine's forward pass or attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
