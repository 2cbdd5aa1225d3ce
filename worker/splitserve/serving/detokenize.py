"""Token ids -> text, incrementally, with stop strings: what a stream may show the client right now.

Every token is released as soon as its text can be shown, so a stream carries one event per token
(a special token, whose text is empty, too) and a client can measure inter-token latency. Tokens are
coalesced only while text is held back, for the two reasons below.

Byte-level BPE splits one multi-byte UTF-8 character across several tokens, so decoding each token
alone would emit U+FFFD mid-stream. vLLM's answer, used here: keep a window of converted tokens
between a *prefix* offset and a *read* offset, decode the window with and without the new tokens,
and emit only the difference, holding it back while it still ends in an incomplete character.
Decoding a small window (never the whole output) keeps every step O(1) in the output length, and
starting the window inside the prompt keeps tokenizers that drop a leading space (SentencePiece)
correct.

Stop strings are matched on text (OpenAI semantics): the output is cut before the stop string, and a
stream holds back any tail that could still become one, so the client never sees half of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitserve.engine.params import FinishReason, GenerationChunk, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens that seed the window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing sequence of output tokens into text deltas (special tokens skipped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._tokens: list[str] = self._convert(context)
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def _convert(self, token_ids: list[int]) -> list[str]:
        tokens = self._tokenizer.convert_ids_to_tokens(token_ids, skip_special_tokens=True)
        return [tokens] if isinstance(tokens, str) else tokens

    def add(self, token_ids: Sequence[int]) -> str:
        """Text completed by these tokens; "" while the tail is an incomplete character."""
        self._tokens.extend(self._convert(list(token_ids)))
        prefix, full = self._window()
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
            return full[len(prefix) :]
        return ""

    @property
    def holding(self) -> bool:
        """Whether converted tokens wait for the rest of their character."""
        return self._read_offset < len(self._tokens)

    def flush(self) -> str:
        """Whatever is held back, at the end of the output (invalid bytes then show as U+FFFD)."""
        prefix, full = self._window()
        self._prefix_offset = self._read_offset = len(self._tokens)
        return full[len(prefix) :]

    def _window(self) -> tuple[str, str]:
        to_string = self._tokenizer.convert_tokens_to_string
        prefix: str = to_string(self._tokens[self._prefix_offset : self._read_offset])
        full: str = to_string(self._tokens[self._prefix_offset :])
        return prefix, full


@dataclass(frozen=True)
class Delta:
    """What to send for one choice now. `token_ids`: the output tokens this delta releases."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    stopped_by_string: bool = False

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


class OutputStream:
    """One choice's output: detokenizes backend chunks and applies stop strings and stop tokens."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        eager_tokens: bool = False,
    ) -> None:
        """`eager_tokens`: release every token at once, even while its text is held back (a partial
        UTF-8 character, a possible stop string) — for `return_token_ids`, where clients count tokens."""
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._params = params
        self._stops = params.stop
        self._max_stop = max((len(stop) for stop in self._stops), default=0)
        self._text = ""  # everything decoded so far (after a stop-string cut: up to the cut)
        self._sent = 0  # chars of _text already released
        self._pending_ids: list[int] = []
        self._eager_tokens = eager_tokens
        self.generated = 0
        self.finished = False

    def add(self, chunk: GenerationChunk) -> Delta:
        if self.finished:
            raise RuntimeError("output already finished")
        ids = chunk.token_ids
        self.generated += len(ids)
        self._pending_ids.extend(ids)
        # A stop token ends the output without showing up in it (vLLM); EOS is special, so skipped anyway.
        if chunk.finish_reason == "stop" and ids and ids[-1] in self._params.stop_token_ids:
            ids = ids[:-1]
        new = self._detokenizer.add(ids)
        if chunk.finish_reason is not None:
            new += self._detokenizer.flush()
        self._text += new
        finish = chunk.finish_reason
        stopped = self._cut_at_stop_string(len(new))
        if stopped:
            finish = "stop"
        release = len(self._text) if finish else len(self._text) - self._held_back()
        text = self._text[self._sent : release]
        if not text and finish is None:
            # Nothing to show: a special token (released now, its own event) or text held back
            # (an incomplete character, a possible stop string: released with the text).
            held = self._detokenizer.holding or release < len(self._text)
            if not self._pending_ids or (held and not self._eager_tokens):
                return Delta("")
        self._sent = release
        token_ids, self._pending_ids = tuple(self._pending_ids), []
        self.finished = finish is not None
        return Delta(text, token_ids, finish, stopped)

    def _cut_at_stop_string(self, new_chars: int) -> bool:
        """Truncate `_text` before the earliest stop string that the new text completed."""
        if not self._stops or self.generated < self._params.min_tokens or not new_chars:
            return False
        start = max(self._sent, len(self._text) - new_chars - self._max_stop + 1)
        found = [i for i in (self._text.find(stop, start) for stop in self._stops) if i >= 0]
        if not found:
            return False
        self._text = self._text[: min(found)]
        return True

    def _held_back(self) -> int:
        """Length of the unsent tail that is a proper prefix of some stop string."""
        unsent = len(self._text) - self._sent
        for size in range(min(unsent, self._max_stop - 1), 0, -1):
            tail = self._text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
