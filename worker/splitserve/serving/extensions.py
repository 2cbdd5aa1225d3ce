"""vLLM's request extensions, as the ecosystem's load generators and clients send them.

Benchmark clients written for vLLM (guidellm, aiperf, inference-perf) add vLLM's fields to OpenAI
requests. Strict parsing refuses unknown fields, so each of vLLM's extension fields is declared here
and falls into one of three groups, taken from vLLM's `vllm/entrypoints/openai/protocol.py`:

- implemented (declared with the rest of the request in `protocol`): `top_k`, `min_tokens`,
  `ignore_eos`, `stop_token_ids`, `return_token_ids`, `stream_options.continuous_usage_stats`;
- accepted whatever their value, because they cannot change the output here: `priority` 0 (one
  queue, as vLLM without priority scheduling);
- accepted only at the value that changes nothing (`_NEUTRAL`), refused otherwise with a 400 naming
  the field: each needs machinery we do not have (beam search, constrained decoding, prompt logprobs,
  custom chat templates, logits processors, client-steered KV transfer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict


def _unset(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _is(*neutral: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == v and type(value) is type(v) for v in neutral)


class VllmExtensions(BaseModel):
    """Both endpoints' vLLM sampling and extra parameters that no result here depends on."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cache_salt: str | None = None
    priority: int = 0
    min_p: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None


class VllmCompletionExtensions(VllmExtensions):
    add_special_tokens: Any = None  # we add them, as vLLM does by default for completions
    prompt_embeds: Any = None


class VllmChatExtensions(VllmExtensions):
    add_special_tokens: Any = None  # the chat template has them; vLLM's default is false here
    echo: Any = None  # refused unless false, by protocol's own table (as for completions)
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    documents: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    mm_processor_kwargs: Any = None
    reasoning_effort: Any = None
    include_reasoning: Any = None


# Field -> "this value changes nothing". A field set to anything else is refused with a 400.
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "priority": lambda value: value == 0,
    "min_p": _is(0, 0.0),
    "use_beam_search": _is(False),
    "length_penalty": _is(1, 1.0),  # only beam search reads it
    "include_stop_str_in_output": _is(False),
    "skip_special_tokens": _is(True),
    "spaces_between_special_tokens": _is(True),  # only read when special tokens are kept
    "truncate_prompt_tokens": _unset,
    "prompt_logprobs": _unset,
    "allowed_token_ids": _unset,
    "bad_words": _unset,
    "guided_json": _unset,
    "guided_regex": _unset,
    "guided_choice": _unset,
    "guided_grammar": _unset,
    "guided_decoding_backend": _unset,
    "guided_whitespace_pattern": _unset,
    "structural_tag": _unset,
    "logits_processors": _unset,
    "return_tokens_as_token_ids": _is(False),  # only read with logprobs, which we refuse
    "kv_transfer_params": _unset,  # the router decides where KV goes, never the client
    # A tenant's salt asks for a prefix cache of its own; ignoring it would silently share blocks.
    "cache_salt": _unset,
    "vllm_xargs": _unset,
    "prompt_embeds": _unset,
    "add_generation_prompt": _is(True),
    "continue_final_message": _is(False),
    "documents": _unset,
    "chat_template": _unset,
    "chat_template_kwargs": _unset,
    "mm_processor_kwargs": _unset,
    "reasoning_effort": _unset,
    "include_reasoning": _is(True),  # nothing reasons here, so nothing is hidden or shown
}

# add_special_tokens is neutral at each endpoint's own default, which is what the frontend does.
COMPLETION_NEUTRAL = {**NEUTRAL, "add_special_tokens": _is(True)}
CHAT_NEUTRAL = {**NEUTRAL, "add_special_tokens": _is(False)}
