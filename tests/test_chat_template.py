"""Letter scoring for instruct models (METHOD.md section 4): the chat template, options
shuffled with a fixed seed, BOS exactly once, and the predicted letter mapped back to
the right option."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from obliviate.data.concepts import load_benchmark_concept
from obliviate.evaluation.multiple_choice import (
    LETTERS, chat_prompt_ids, correct_from_scores, option_scores, prepare, resolve_mode, shuffled_order,
)
from obliviate.models.loading import LoadedModel

from conftest import make_tiny_lm

BOS_ID = 2  # conftest's tiny tokenizer: <pad> 0, <eos> 1, <bos> 2
# A Gemma/Llama-style template that writes BOS itself, and one that leaves it to the tokenizer.
TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATE_WITHOUT_BOS = TEMPLATE_WITH_BOS.replace("{{ bos_token }}", "")


def chat_lm(tiny_tokenizer, template: str) -> LoadedModel:
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the session tokenizer stays template-free
    tokenizer.chat_template = template
    return make_tiny_lm(tokenizer, "llama", tie=False)


@pytest.fixture(scope="module")
def qa_questions(data_dir):
    return load_benchmark_concept("Harry Potter", data_dir, general_questions=8).questions["qa_train"]


@pytest.mark.parametrize("template", [TEMPLATE_WITH_BOS, TEMPLATE_WITHOUT_BOS], ids=["bos-in-template", "bos-from-tokenizer"])
def test_chat_prompt_has_exactly_one_bos_at_the_start(tiny_tokenizer, template):
    lm = chat_lm(tiny_tokenizer, template)
    ids = chat_prompt_ids(lm, "Who wrote the books?")
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
    text = lm.tokenizer.decode(ids)
    assert "Who wrote the books?" in text and text.rstrip().endswith("<|assistant|>")


def test_auto_mode_picks_letters_only_with_a_chat_template(tiny_tokenizer):
    assert resolve_mode(chat_lm(tiny_tokenizer, TEMPLATE_WITH_BOS), "auto") == "letter"
    assert resolve_mode(make_tiny_lm(tiny_tokenizer, "llama"), "auto") == "loglik"


def _lettered_options(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^([A-J])\. (.*)$", text, flags=re.M)}


def test_letter_prompts_shuffle_options_with_a_fixed_seed(tiny_tokenizer, qa_questions):
    lm = chat_lm(tiny_tokenizer, TEMPLATE_WITH_BOS)
    first = prepare(lm, qa_questions, "letter", seed=0)
    again = prepare(lm, qa_questions, "letter", seed=0)
    other = prepare(lm, qa_questions, "letter", seed=1)
    assert first.mode == "letter" and len(first.items) == len(qa_questions) == 50
    np.testing.assert_array_equal(first.answers, again.answers)
    assert [c for c, _ in first.items] == [c for c, _ in again.items]
    assert not np.array_equal(first.answers, other.answers)
    # The data stores the answer first in ~92% of items; after shuffling it is spread out.
    assert np.bincount(first.answers, minlength=4).max() <= 25
    for index, (context, continuation) in enumerate(first.items):
        assert continuation == [] and context.count(BOS_ID) == 1
        question = qa_questions[index]
        order = shuffled_order(question, 0)
        shown = _lettered_options(lm.tokenizer.decode(context))
        assert [shown[LETTERS[i]] for i in range(len(order))] == [question.options[j] for j in order]
        # The correct letter in the prompt names the correct option.
        assert shown[LETTERS[first.answers[index]]] == question.options[question.answer]


def test_letter_ids_are_the_single_letter_tokens(tiny_tokenizer):
    lm = chat_lm(tiny_tokenizer, TEMPLATE_WITH_BOS)
    prepared = prepare(lm, [], "letter", seed=0)
    assert [lm.tokenizer.decode([i]) for i in prepared.letter_ids] == list(LETTERS)


def _favour(lm: LoadedModel, choose_letter) -> None:
    """Make the model's next-token logits put all mass on ``choose_letter(prompt_text)``."""
    letter_id = {letter: lm.tokenizer(letter, add_special_tokens=False).input_ids[-1] for letter in LETTERS}

    def hook(module, args, kwargs, output):
        logits = torch.zeros_like(output.logits)
        for row, ids in enumerate(kwargs["input_ids"]):
            text = lm.tokenizer.decode([int(i) for i in ids if int(i) != lm.tokenizer.pad_token_id])
            logits[row, -1, letter_id[choose_letter(text)]] = 20.0
        output.logits = logits
        return output

    lm.model.register_forward_hook(hook, with_kwargs=True)


def test_a_model_that_names_the_right_letter_scores_every_question(tiny_tokenizer, qa_questions):
    lm = chat_lm(tiny_tokenizer, TEMPLATE_WITH_BOS)
    answer_of = {q.question: q.options[q.answer] for q in qa_questions}

    def right_letter(text: str) -> str:
        question = next(q for q in answer_of if q in text)
        return next(letter for letter, option in _lettered_options(text).items() if option == answer_of[question])

    _favour(lm, right_letter)
    prepared = prepare(lm, qa_questions[:12], "letter", seed=0)
    correct = correct_from_scores(prepared, option_scores(lm, prepared))
    assert correct.all()


def test_a_model_that_always_says_b_is_right_only_where_b_is_correct(tiny_tokenizer, qa_questions):
    lm = chat_lm(tiny_tokenizer, TEMPLATE_WITH_BOS)
    _favour(lm, lambda text: "B")
    prepared = prepare(lm, qa_questions[:12], "letter", seed=0)
    scores = option_scores(lm, prepared)
    assert (np.argmax(scores, axis=1) == 1).all()
    correct = correct_from_scores(prepared, scores)
    np.testing.assert_array_equal(correct, prepared.answers == 1)
    assert 0 < correct.sum() < len(correct)  # the shuffle put B right on some, not all
