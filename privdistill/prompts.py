"""The prompt allow-list: what a prompt (or a class name) leaving a site may contain. A prompt is read
the way the text encoder's tokenizer reads it (NFKC, lower-casing, Unicode-aware word split), every
character must come from a small ASCII set, and every word must be in a vocabulary. Used by the
packager, the site's export gate and the coordinator (with its own vocabulary); no torch import."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable

from privdistill.errors import ShardVerificationError

# letters, digits, one plain space and a little punctuation; no tab, newline, zero-width or combining
# character, no other script (homoglyphs), no full-width form, no digit of another numeral system
ALLOWED_CHARS = frozenset(string.ascii_letters + string.digits + " -,.'()")
MAX_PROMPT_CHARS = 256
MAX_NAME_CHARS = 64
# the tokenizers library's Whitespace pre-tokenizer (privdistill.text.train_tokenizer): \w+|[^\w\s]+
_PIECE = re.compile(r"\w+|[^\w\s]+")


def normalize(text: str) -> str:
    """What the tokenizer sees: NFKC, then Unicode lower-casing (the tokenizer's Lowercase normalizer; on the
    allowed ASCII set this equals case folding)."""
    return unicodedata.normalize("NFKC", text).lower()


def pieces(text: str) -> list[str]:
    """Words and punctuation runs of the normalized text, split as the tokenizer splits them."""
    return _PIECE.findall(normalize(text))


def words(text: str) -> list[str]:
    """The words (letter/digit runs, Unicode-aware) of the normalized text: what the vocabulary must hold."""
    return [p for p in pieces(text) if p[0].isalnum() or p[0] == "_"]


def describe_char(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed character')}"


def character_problem(text: object, *, limit: int = MAX_PROMPT_CHARS) -> str | None:
    """Why ``text`` may not leave a site as conditioning text, or None. The text itself is never quoted:
    it may be a patient's name."""
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not text"
    if not text.strip():
        return "is empty"
    if len(text) > limit:
        return f"is {len(text)} characters long (limit {limit})"
    for i, ch in enumerate(text):
        if ch not in ALLOWED_CHARS:
            return (f"character {i + 1} is {describe_char(ch)}, outside the allowed set (ASCII letters, digits, "
                    "space and - , . ' ( )): other scripts, full-width forms, other digits, zero-width and "
                    "combining characters are refused")
    if "  " in text or text != text.strip():
        return "has leading, trailing or repeated spaces"
    return None


def is_vocabulary_word(word: str) -> bool:
    """One allowed word as the tokenizer would produce it (lowercase ASCII letters/digits)."""
    return character_problem(word, limit=MAX_NAME_CHARS) is None and words(word) == [word]


def prompt_problem(prompt: object, vocabulary: Iterable[str]) -> tuple[str, str] | None:
    """(reason, message) when ``prompt`` may not leave a site, else None; characters first, then words."""
    problem = character_problem(prompt)
    if problem is not None or not isinstance(prompt, str):  # (character_problem refuses anything but text)
        return "prompt_disallowed_character", f"a prompt {problem}"
    allowed = vocabulary if isinstance(vocabulary, (set, frozenset)) else set(vocabulary)
    outside = sorted({w for w in words(prompt) if w not in allowed})
    if outside:
        return "prompt_outside_vocabulary", (f"a prompt uses {len(outside)} word(s) outside the allow-listed "
                                             "vocabulary")
    return None


def check_prompts(prompts: Iterable[object], vocabulary: Iterable[str], *, where: str = "") -> None:
    """Raise ShardVerificationError (reason prompt_disallowed_character / prompt_outside_vocabulary) for the
    first prompt that may not leave a site."""
    vocab = frozenset(vocabulary)
    for i, prompt in enumerate(prompts):
        found = prompt_problem(prompt, vocab)
        if found is not None:
            reason, message = found
            at = where or f"prompt {i + 1}"
            raise ShardVerificationError(f"{at}: {message}", reason)


def words_outside(prompts: Iterable[str], vocabulary: Iterable[str]) -> list[str]:
    """Words of ``prompts`` that the vocabulary does not contain (sorted, unique)."""
    allowed = set(vocabulary)
    return sorted({w for p in prompts for w in words(p) if w not in allowed})


def vocabulary_from(template: str | None, class_names: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """The allow-list of prompt words: the template's fixed words, the class names' words and ``extra``;
    only words that are themselves allowed (a class name in another script adds nothing)."""
    found = set(words((template or "").replace("{label}", " "))) | set(extra)
    for name in class_names:
        found.update(words(name))
    return sorted(w for w in found if is_vocabulary_word(w))
