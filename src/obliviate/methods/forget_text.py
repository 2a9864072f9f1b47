"""The forget text a trained method trains on: the concept's sentences, and with
``respelled`` each sentence again with its key words respelled (case, hyphenated or split
halves, data/respelling.py) so that no key token remains.

Why: an edit of token rows, or a method trained only on the usual spellings, can lean on
those tokens; an input that names the concept in other tokens is then answered as before
(the respell attack). Training the forget term on both spellings asks the trained layers
to lose the concept where the spellings' representations meet, not only at the tokens.
Each word's spelling is drawn with the seed from every spelling free of key tokens.
"""
from __future__ import annotations

import random

from obliviate.data.concepts import ConceptData
from obliviate.data.respelling import rewrite_text, spellings, word_tokens
from obliviate.methods.features import key_token_ids
from obliviate.training.loop import ForgetText

KEY_OCCURRENCES = 3  # a key token: concept-only and seen this often in the concept sentences


def forget_sentences(tokenizer, data: ConceptData, mode: ForgetText, seed: int) -> list[str]:
    """The forget side of training: the concept sentences, and for ``respelled`` also each
    one that holds a key token, rewritten without any."""
    if mode == "plain":
        return list(data.concept_sentences)
    keys = key_token_ids(tokenizer, data, KEY_OCCURRENCES)
    rng = random.Random(seed)

    def holds_key(word: str, spaced: bool) -> bool:
        return bool(word_tokens(tokenizer, word, spaced) & keys)

    def respelled(word: str, spaced: bool) -> str | None:
        free = [s for s in spellings(word) if not holds_key(s, spaced)]
        return rng.choice(free) if free else None

    rewritten = [rewrite_text(sentence, holds_key, respelled) for sentence in data.concept_sentences]
    return list(data.concept_sentences) + [new for new, old in zip(rewritten, data.concept_sentences) if new != old]
