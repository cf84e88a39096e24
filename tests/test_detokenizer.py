"""Tests for engine/detokenizer.py: incremental text, stop strings, held-back visible text."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pagedserve.engine.detokenizer import BackendDecoder, IncrementalText, fast_decoder

TEXTS = [
    "Hello world, the cat sat on the mat.",
    "café au lait, crème brûlée et déjà vu",
    "Tokyo is 東京 and Kyoto is 京都; naïve façade",
    "emoji 🙂 and math ∑ x² — done",
    "  leading spaces,\nnew lines\n\tand tabs  ",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    return AutoTokenizer.from_pretrained(tiny_llama)


@dataclass
class Stream:
    text: IncrementalText
    num_output_tokens: int = 0
    chunks: list[str] = field(default_factory=list)  # what update_text returned per token
    visible: list[str] = field(default_factory=list)  # visible_text after each token
    stop: str | None = None


def stream(
    tokenizer,
    prompt: str,
    output_ids: list[int],
    stop: list[str] = (),
    skip_special_tokens: bool = True,
) -> Stream:
    """Feed `output_ids` one at a time the way the engine does, stopping on a stop string."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    result = Stream(IncrementalText(prompt_ids, skip_special_tokens))
    for token in output_ids:
        new = result.text.append(tokenizer, token)
        result.num_output_tokens += 1
        result.chunks.append(new)
        result.stop = result.text.cut_at_stop(stop, len(new))
        finished = result.stop is not None
        result.visible.append(result.text.visible(stop, finished))
        if finished:
            break
    else:
        result.visible.append(result.text.visible(stop, True))
    return result


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def spans_token_boundary(tokenizer, ids: list[int], stop: str) -> bool:
    return not any(stop in tokenizer.decode([i]) for i in ids)


# --- incremental detokenization -------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_decoding_all_output_tokens(tokenizer, text: str) -> None:
    ids = encode(tokenizer, text)
    result = stream(tokenizer, "The answer:", ids)
    assert result.text.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert result.text.text == text
    assert "".join(result.chunks) == text


def test_non_ascii_characters_really_are_split_across_tokens(tokenizer) -> None:
    # Guards the tests above: the tiny tokenizer must split these characters into bytes.
    for char in ("東", "京", "🙂"):
        ids = encode(tokenizer, char)
        assert len(ids) > 1
        assert all(tokenizer.decode([i]) == "\ufffd" for i in ids)


def test_an_incomplete_character_is_held_back_not_emitted_as_a_replacement(tokenizer) -> None:
    ids = encode(tokenizer, "東京")
    result = stream(tokenizer, "City:", ids)
    emitted = ""
    for chunk in result.chunks:
        emitted += chunk
        assert "\ufffd" not in emitted
        assert "東京".startswith(emitted)
    assert result.chunks[0] == "", "the first byte of 東 alone is not text yet"
    assert emitted == "東京"


def test_incremental_text_with_an_empty_prompt_window(tokenizer) -> None:
    ids = encode(tokenizer, "déjà 東京")
    text = IncrementalText([encode(tokenizer, "x")[0]])
    for token in ids:
        text.append(tokenizer, token)
    assert text.text == "déjà 東京"


def test_special_tokens_are_skipped_like_decode_does(tokenizer) -> None:
    ids = encode(tokenizer, "one two") + [tokenizer.eos_token_id] + encode(tokenizer, " three")
    result = stream(tokenizer, "Count:", ids)
    assert result.text.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "</s>" not in result.text.text


def test_special_tokens_are_kept_when_asked(tokenizer) -> None:
    ids = encode(tokenizer, "one") + [tokenizer.eos_token_id]
    result = stream(tokenizer, "Count:", ids, skip_special_tokens=False)
    assert result.text.text == tokenizer.decode(ids, skip_special_tokens=False)
    assert result.text.text.endswith("</s>")


# --- stop strings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("one two STOP three", "STOP"),
        ("Hello world, the cat sat on the mat.", "at on"),
        ("Tokyo is 東京 and Kyoto", "東京"),
        ("Tokyo is 東京 and Kyoto", "is 東"),
        ("café au lait", "é a"),
    ],
)
def test_stop_string_spanning_tokens_cuts_the_text_before_it(tokenizer, text, stop) -> None:
    ids = encode(tokenizer, text)
    assert spans_token_boundary(tokenizer, ids, stop)
    result = stream(tokenizer, "Say:", ids, stop=[stop])
    assert result.stop == stop
    assert result.text.text == text[: text.index(stop)]
    assert stop not in result.text.text
    assert result.visible[-1] == text[: text.index(stop)]


def test_generation_stops_at_the_token_that_completes_the_stop_string(tokenizer) -> None:
    text = "one two STOP three"
    ids = encode(tokenizer, text)
    result = stream(tokenizer, "Say:", ids, stop=["STOP"])
    decoded = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    completing = next(i for i, t in enumerate(decoded) if "STOP" in t)
    assert result.num_output_tokens == completing + 1


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    text = "alpha beta gamma delta"
    ids = encode(tokenizer, text)
    # "beta gam" starts before "gamma" and is complete no later than it.
    result = stream(tokenizer, "Say:", ids, stop=["gamma", "beta gam"])
    assert result.stop == "beta gam"
    assert result.text.text == "alpha "


def test_earliest_starting_stop_string_wins_when_both_complete_on_one_token() -> None:
    text = IncrementalText([1])
    text.text = "abcde"
    assert text.cut_at_stop(["cd", "bcd"], 5) == "bcd"
    assert text.text == "a"


def test_stop_string_already_passed_is_not_found_again() -> None:
    # Only the new characters (and the stop string's length before them) are searched.
    text = IncrementalText([1])
    text.text = "xxabyyyy"
    assert text.cut_at_stop(["ab"], 2) is None
    assert text.text == "xxabyyyy"


def test_no_stop_string_leaves_the_text_whole(tokenizer) -> None:
    text = "one two three"
    result = stream(tokenizer, "Say:", encode(tokenizer, text), stop=["four"])
    assert result.stop is None
    assert result.text.text == text
    assert result.visible[-1] == text, "a finished sequence shows all its text"


# --- visible text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("one two STOP three", ["STOP"]),
        ("one two STAMP STOP three", ["STOP", "STAMP S"]),
        ("Tokyo is 東京 and Kyoto", ["東京 a"]),
        ("no stop in here at all", ["zzz"]),
        ("S ST STO STOP", ["STOP"]),
    ],
)
def test_visible_text_only_grows_over_a_stream(tokenizer, text, stops) -> None:
    result = stream(tokenizer, "Say:", encode(tokenizer, text), stop=stops)
    for before, after in pairwise(result.visible):
        assert after.startswith(before), f"{before!r} shrank to {after!r}"
    for shown in result.visible:
        assert not any(stop in shown for stop in stops)
    assert result.visible[-1] == result.text.text


def test_visible_text_holds_back_a_possible_stop_string_prefix(tokenizer) -> None:
    text = IncrementalText([1])
    text.text = "one two ST"
    assert text.visible(["STOP"], False) == "one two", "len('STOP') - 1 characters are held back"
    assert text.visible(["STOP"], True) == "one two ST", "at the end nothing is held back"


def test_visible_text_without_stop_strings_is_the_whole_text() -> None:
    text = IncrementalText([1])
    text.text = "abc"
    assert text.visible([], False) == "abc"


def test_the_backend_decoder_decodes_as_the_tokenizer(tokenizer):
    """The fast path the output processor takes: the `tokenizers` backend, where it decodes
    exactly as transformers does (every window of ids, special tokens kept or skipped);
    a tokenizer that cleans up spaces keeps transformers' decode."""
    decoder = fast_decoder(tokenizer)
    assert isinstance(decoder, BackendDecoder)
    ids = [i for text in TEXTS for i in tokenizer.encode(text)] + tokenizer.all_special_ids
    for start in range(len(ids) - 3):
        for skip in (True, False):
            window = ids[start : start + 4]
            want = tokenizer.decode(window, skip_special_tokens=skip)
            assert decoder.decode(window, skip_special_tokens=skip) == want
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert fast_decoder(tokenizer) is tokenizer
    finally:
        tokenizer.clean_up_tokenization_spaces = False
