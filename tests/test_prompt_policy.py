"""The prompt allow-list reads prompts exactly as the text encoder's tokenizer does and refuses every
character outside a small ASCII set before it looks at words."""

from __future__ import annotations

import pytest
from test_coordinator_content import LEAKS

from privdistill.errors import ShardVerificationError
from privdistill.prompts import character_problem, check_prompts, is_vocabulary_word, pieces, vocabulary_from, words

VOCAB = vocabulary_from("an image of a {label}", ["Bag", "T-shirt", "Ankle-boot"])


def test_the_split_is_the_tokenizers() -> None:
    from privdistill.text import train_tokenizer

    prompts = ["an image of a Bag", "an image of a T-shirt", "An image of a ankle-boot, (left).",
               *LEAKS.values(), "ﬁle Ⅻ ½ ＡＢＣ", "straße"]
    tok = train_tokenizer(prompts[:3]).backend_tokenizer
    for p in prompts:
        normalized = tok.normalizer.normalize_str(p)
        expected = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalized)]
        assert pieces(p) == expected, p


def test_the_tokenizer_would_turn_full_width_names_into_vocabulary_words() -> None:
    # why the characters are checked, not only the words: NFKC maps these onto plain ASCII words
    assert words("ＪＯＨＮ ＳＭＩＴＨ") == ["john", "smith"]
    assert words("ｂａｇ") == ["bag"] and character_problem("ｂａｇ") is not None


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_each_leak_is_refused_for_its_characters(case: str) -> None:
    with pytest.raises(ShardVerificationError) as err:
        check_prompts(["an image of a Bag", LEAKS[case]], VOCAB)
    assert err.value.reason == "prompt_disallowed_character"
    assert "prompt 2" in str(err.value) and "U+" in str(err.value)
    assert LEAKS[case] not in str(err.value)  # the text itself is never quoted (it may be a name)


def test_ascii_names_are_refused_for_their_words_and_allowed_prompts_pass() -> None:
    with pytest.raises(ShardVerificationError) as err:
        check_prompts(["an image of a Bag john smith"], VOCAB)
    assert err.value.reason == "prompt_outside_vocabulary" and "2 word(s)" in str(err.value)
    check_prompts(["an image of a Bag", "An image of a T-shirt", "an image of a ankle-boot"], VOCAB)


@pytest.mark.parametrize("bad", ["", " ", "an  image", " an image", "a" * 257])
def test_empty_padded_or_long_prompts_are_refused(bad: str) -> None:
    assert character_problem(bad) is not None


def test_vocabulary_words() -> None:
    assert VOCAB == ["a", "an", "ankle", "bag", "boot", "image", "of", "shirt", "t"]
    assert vocabulary_from(None, ["Иванов", "Bag"]) == ["bag"]  # a class name in another script adds nothing
    assert [is_vocabulary_word(w) for w in ("bag", "Bag", "bag2", "b-g", "bаg", "")] == \
        [True, False, True, False, False, False]
