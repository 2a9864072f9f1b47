"""Spellings of a word that a reader takes for the same word, and rewriting text word by
word: the token-free rewrite attack asks questions with them, and a trained method can
train on them (its forget text then names the concept without its usual tokens)."""
from __future__ import annotations

import re
from typing import Callable, Iterator

WORD = re.compile(r"\w+", re.UNICODE)


def spellings(word: str) -> Iterator[str]:
    """Spellings of ``word`` a reader takes for the same word, most natural first: case
    (upper, capitalised, lower), hyphenated or space-split halves (from the middle
    outward), and letters joined by hyphens last."""
    yield from dict.fromkeys((word.upper(), word.capitalize(), word.lower()))
    middle = len(word) // 2
    cuts = sorted(range(1, len(word)), key=lambda cut: (abs(cut - middle), cut))
    for cut in cuts:
        yield f"{word[:cut]}-{word[cut:]}"
        yield f"{word[:cut]} {word[cut:]}"
    yield "-".join(word)


def rewrite_text(text: str, holds_target: Callable[[str, bool], bool], replace: Callable[[str, bool], str | None]) -> str:
    """``text`` with every word that holds a target replaced (kept where ``replace`` finds
    nothing); both callables take the word and whether a space precedes it."""
    def rewritten(match: re.Match) -> str:
        spaced = match.start() > 0 and text[match.start() - 1].isspace()
        word = match.group(0)
        if not holds_target(word, spaced):
            return word
        return replace(word, spaced) or word
    return WORD.sub(rewritten, text)


def word_tokens(tokenizer, word: str, spaced: bool) -> set[int]:
    """The word's token ids as it stands in text (after a space, or not)."""
    return set(tokenizer((" " if spaced else "") + word, add_special_tokens=False).input_ids)
