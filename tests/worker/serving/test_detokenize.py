"""Incremental detokenization and stop strings, on the tiny model's real byte-level BPE tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from transformers import PreTrainedTokenizerBase

from splitserve.engine.params import FinishReason, GenerationChunk, SamplingParams
from splitserve.serving.detokenize import Delta, IncrementalDetokenizer, OutputStream

MULTIBYTE = "héllo 世界 🙂 ça va? ÄÖÜ ok"


def feed(
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[int],
    params: SamplingParams,
    chunk: int = 1,
    finish: FinishReason = "length",
    prompt: Sequence[int] = (5, 6, 7),
) -> list[Delta]:
    """Run `ids` through an OutputStream in chunks; the last chunk carries `finish`."""
    stream = OutputStream(tokenizer, prompt, params)
    deltas = []
    for start in range(0, len(ids), chunk):
        last = start + chunk >= len(ids)
        deltas.append(
            stream.add(
                GenerationChunk(
                    token_ids=tuple(ids[start : start + chunk]), finish_reason=finish if last else None
                )
            )
        )
        if deltas[-1].finish_reason:
            break
    return deltas


def text_of(deltas: list[Delta]) -> str:
    return "".join(delta.text for delta in deltas)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_multibyte_text_round_trips_without_replacement_chars(
    tokenizer: PreTrainedTokenizerBase, chunk: int
) -> None:
    ids = tokenizer.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE) // 2, "the tiny tokenizer should split these characters into bytes"
    deltas = feed(tokenizer, ids, SamplingParams(), chunk=chunk)
    assert all("\ufffd" not in delta.text for delta in deltas)
    assert text_of(deltas) == MULTIBYTE
    assert sum(delta.tokens for delta in deltas) == len(ids)


def test_incomplete_character_is_held_then_flushed(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("🙂")
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.add([token]) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.add(ids[-1:]) == "🙂"
    # Bytes that never complete a character come out at the end, as the tokenizer decodes them.
    truncated = IncrementalDetokenizer(tokenizer, [])
    assert truncated.add(ids[:2]) == ""
    assert truncated.flush() == tokenizer.decode(ids[:2])


def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = [*tokenizer.encode("Hello"), tokenizer.eos_token_id]
    deltas = feed(tokenizer, ids, SamplingParams(), finish="stop")
    assert text_of(deltas) == "Hello"
    assert deltas[-1].finish_reason == "stop"
    assert sum(delta.tokens for delta in deltas) == len(ids)


def test_stop_string_spanning_tokens_truncates_and_is_never_shown(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Hello, world! How are you today?"
    ids = tokenizer.encode(text)
    stop = "world! How"
    deltas = feed(tokenizer, ids, SamplingParams(stop=(stop,)))
    assert text_of(deltas) == "Hello, "
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stopped_by_string
    assert len(deltas) < len(ids), "the stream must end at the stop string, not at the script's end"
    # Nothing of the stop string leaked before the cut: every prefix was held back.
    assert all("w" not in delta.text for delta in deltas)


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    deltas = feed(tokenizer, ids, SamplingParams(stop=("lazy", "brown")), chunk=50)
    assert text_of(deltas) == "The quick "


def test_held_back_prefix_is_released_when_it_diverges(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("sea shells by the sea shore")
    deltas = feed(tokenizer, ids, SamplingParams(stop=("sea horse",)))
    assert text_of(deltas) == "sea shells by the sea shore"
    assert deltas[-1].finish_reason == "length" and not deltas[-1].stopped_by_string


def test_stop_strings_wait_for_min_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "cat sat on the mat. The cat sat"
    ids = tokenizer.encode(text)
    first_cat = len(tokenizer.encode("cat"))
    params = SamplingParams(stop=("cat",), min_tokens=first_cat + 2, max_tokens=64)
    deltas = feed(tokenizer, ids, params)
    assert text_of(deltas) == "cat sat on the mat. The "


def test_stop_token_id_ends_output_without_its_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("Hello world")
    params = SamplingParams(stop_token_ids=(ids[-1],))
    deltas = feed(tokenizer, ids, params, finish="stop")
    assert text_of(deltas) == tokenizer.decode(ids[:-1])
    assert sum(delta.tokens for delta in deltas) == len(ids)


def test_tokens_of_held_text_are_released_with_it(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("世界")
    deltas = [d for d in feed(tokenizer, ids, SamplingParams()) if d.text or d.finish_reason]
    assert [d.text for d in deltas] == ["世", "界"]
    assert sum(d.tokens for d in deltas) == len(ids)


def test_eager_tokens_release_every_token_while_text_is_held(tokenizer: PreTrainedTokenizerBase) -> None:
    """return_token_ids: a client counting tokens must see each one when it arrives."""
    ids = tokenizer.encode("🙂🙂")
    stream = OutputStream(tokenizer, (5, 6), SamplingParams(), eager_tokens=True)
    deltas = [stream.add(GenerationChunk(token_ids=(token,))) for token in ids]
    assert [delta.token_ids for delta in deltas] == [(token,) for token in ids]
    assert "".join(delta.text for delta in deltas) == "🙂🙂"


def test_every_token_of_ascii_text_is_released_on_its_own(tokenizer: PreTrainedTokenizerBase) -> None:
    """One delta per token, so a stream carries one event per token and clients can measure ITL."""
    ids = [*tokenizer.encode("Hello, world!"), tokenizer.eos_token_id, *tokenizer.encode(" How are you?")]
    deltas = feed(tokenizer, ids, SamplingParams(ignore_eos=True))
    assert [delta.token_ids for delta in deltas] == [(token,) for token in ids]
    assert deltas[ids.index(tokenizer.eos_token_id)].text == ""  # a special token: its own empty delta
    assert text_of(deltas) == "Hello, world! How are you?"


def test_tokens_are_coalesced_only_while_text_is_held_back(tokenizer: PreTrainedTokenizerBase) -> None:
    head, emoji, tail = tokenizer.encode("ab"), tokenizer.encode("🙂"), tokenizer.encode(" ok then")
    assert tokenizer.convert_ids_to_tokens(tail) == ["Ġ", "o", "k", "Ġthe", "n"]
    deltas = feed(tokenizer, [*head, *emoji, *tail], SamplingParams(stop=(" ok?",)))
    # The emoji's four bytes wait for each other; " ", " o", " ok" wait to see whether " ok?" follows.
    released = [delta.token_ids for delta in deltas if delta.token_ids]
    assert released == [*[(t,) for t in head], tuple(emoji), tuple(tail[:4]), tuple(tail[4:])]
    assert text_of(deltas) == "ab🙂 ok then"
