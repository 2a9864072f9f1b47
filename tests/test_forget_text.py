"""The forget text of the trained methods: plain, or also respelled without key tokens."""
from __future__ import annotations

import pytest

from obliviate.errors import ObliviateError
from obliviate.methods import MethodContext, rmu
from obliviate.methods.features import key_token_ids
from obliviate.methods.forget_text import KEY_OCCURRENCES, forget_sentences


def test_plain_is_the_concept_sentences(tiny_tokenizer, small_concept):
    assert forget_sentences(tiny_tokenizer, small_concept, "plain", 0) == small_concept.concept_sentences


def test_respelled_adds_each_sentence_without_any_key_token(tiny_tokenizer, small_concept):
    keys = key_token_ids(tiny_tokenizer, small_concept, KEY_OCCURRENCES)
    plain = small_concept.concept_sentences
    forget = forget_sentences(tiny_tokenizer, small_concept, "respelled", 0)
    added = forget[len(plain):]
    assert forget[:len(plain)] == plain and added
    holding = [s for s in plain if set(tiny_tokenizer(s, add_special_tokens=False).input_ids) & keys]
    assert len(added) == len(holding)  # every sentence that names the concept, once more
    for sentence in added:
        assert not set(tiny_tokenizer(sentence, add_special_tokens=False).input_ids) & keys
    # the same letters in the same order: a respelling, not another text
    squash = lambda text: "".join(c for c in text.lower() if c.isalnum())  # noqa: E731
    assert [squash(s) for s in added] == [squash(s) for s in holding]
    assert forget == forget_sentences(tiny_tokenizer, small_concept, "respelled", 0)  # seeded
    assert forget != forget_sentences(tiny_tokenizer, small_concept, "respelled", 1)


def test_a_wrong_forget_text_is_refused_before_any_model_loads():
    with pytest.raises(ObliviateError, match="forget_text must be one of plain, respelled"):
        rmu.Config(forget_text="typos")


def test_rmu_trains_on_the_respelled_text(tiny_lm, small_concept, monkeypatch):
    seen = []

    def fake_train_delta(job, *rest, **kwargs):
        seen.append(list(job.forget))
        return None, {}

    monkeypatch.setattr(rmu, "train_delta", fake_train_delta)
    for mode in ("plain", "respelled"):
        grid = rmu.fit(tiny_lm, small_concept, rmu.Config(lr=(1e-4,), forget_text=mode), 0, MethodContext(progress=False))
        grid.run_point(grid.points[0])
    assert seen[0] == small_concept.concept_sentences
    assert seen[1] == forget_sentences(tiny_lm.tokenizer, small_concept, "respelled", 0)
