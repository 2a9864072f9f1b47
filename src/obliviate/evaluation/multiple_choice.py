"""Multiple-choice scoring (METHOD.md section 4).

Two forms, as in the reference:
- ``loglik`` (base models): context "Question: {q}\\nAnswer:", continuation " {option}",
  log-probability per character of the continuation, argmax.
- ``letter`` (instruct models): the chat template presents the question with lettered
  options; the prediction is the most likely of the option letters as the next token
  (greedy decoding restricted to the letters).

The data stores the correct answer first in ~92% of items, so options are always
shuffled with a fixed seed per question, also for ``loglik`` (where ties would otherwise
go to the first option).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from obliviate.data.concepts import MCQuestion
from obliviate.errors import ObliviateError
from obliviate.models.loading import LoadedModel
from obliviate.evaluation.scoring import Batching, OutputStates, continuation_logprobs, next_token_logprobs

SCORING_MODES = ("auto", "loglik", "letter")
LETTERS = "ABCDEFGHIJ"


def shuffled_order(question: MCQuestion, seed: int) -> list[int]:
    """A fixed permutation of the options, from the seed and the question text."""
    digest = hashlib.sha256(f"{seed}:{question.question}".encode()).digest()
    order = list(range(len(question.options)))
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    return order


def resolve_mode(lm: LoadedModel, mode: str) -> str:
    if mode not in SCORING_MODES:
        raise ObliviateError(f"Unknown scoring mode {mode!r}: choose one of {', '.join(SCORING_MODES)}.")
    if mode == "auto":
        return "letter" if getattr(lm.tokenizer, "chat_template", None) else "loglik"
    return mode


def chat_prompt_ids(lm: LoadedModel, user_text: str) -> list[int]:
    """The chat template's prompt for one user turn, without a duplicated BOS."""
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    bos = lm.tokenizer.bos_token
    # The template text already carries BOS; adding special tokens again would double it.
    return lm.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


@dataclass
class PreparedQuestions:
    """Questions tokenized once, with their shuffled option order."""

    questions: list[MCQuestion]
    mode: str
    answers: np.ndarray  # correct option's index in the shuffled order
    items: list[tuple[list[int], list[int]]]  # loglik: one per option; letter: one per question
    item_question: np.ndarray
    char_lengths: np.ndarray
    letter_ids: list[int]
    token_sets: list[frozenset[int]]

    def __len__(self) -> int:
        return len(self.questions)

    def touching(self, token_ids: set[int] | None) -> np.ndarray:
        """Questions whose tokens include any of ``token_ids`` (all when None)."""
        if token_ids is None:
            return np.arange(len(self.questions))
        return np.array([i for i, ids in enumerate(self.token_sets) if ids & token_ids], dtype=int)


def question_prompt(question: MCQuestion, seed: int, mode: str, suffix: str = "") -> tuple[str, list[str], int]:
    """How a question is asked: (prompt text, options in their shuffled order, index of
    the correct one). ``loglik``: the prompt is the context the options continue (each as
    " {option}"); ``letter``: the user turn of a chat prompt. ``suffix`` is appended to the
    question text (an attack's suffix) without changing the option order."""
    order = shuffled_order(question, seed)
    options = [question.options[i] for i in order]
    text = question.question + suffix
    if mode == "loglik":
        prompt = f"Question: {text}\nAnswer:"
    else:
        lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
        prompt = f"{text}\n{lines}\nAnswer with the letter of the correct option only."
    return prompt, options, order.index(question.answer)


def prepare(lm: LoadedModel, questions: Sequence[MCQuestion], mode: str = "auto", seed: int = 0,
            suffix: str = "") -> PreparedQuestions:
    mode = resolve_mode(lm, mode)
    tok = lm.tokenizer
    answers, items, item_question, chars, token_sets = [], [], [], [], []
    letter_ids = [tok(f"{letter}", add_special_tokens=False).input_ids[-1] for letter in LETTERS]
    for index, question in enumerate(questions):
        prompt, options, answer = question_prompt(question, seed, mode, suffix)
        answers.append(answer)
        if mode == "loglik":
            context = tok(prompt).input_ids
            for option in options:
                continuation = tok(f" {option}", add_special_tokens=False).input_ids
                items.append((context, continuation))
                item_question.append(index)
                chars.append(len(option) + 1)
            ids = set(context).union(*(c for _, c in items[-len(options):]))
        else:
            context = chat_prompt_ids(lm, prompt)
            items.append((context, []))
            item_question.append(index)
            ids = set(context)
        token_sets.append(frozenset(ids))
    return PreparedQuestions(
        questions=list(questions),
        mode=mode,
        answers=np.array(answers, dtype=int),
        items=items,
        item_question=np.array(item_question, dtype=int),
        char_lengths=np.array(chars, dtype=float),
        letter_ids=letter_ids,
        token_sets=token_sets,
    )


def option_scores(
    lm: LoadedModel, prepared: PreparedQuestions, which: np.ndarray | None = None, batching: Batching = Batching(),
    record: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[int, OutputStates]]:
    """Per-option scores (n_questions, max_options), -inf where a question has fewer options.

    ``which`` limits the work to some questions (other rows are NaN). ``record=True`` also
    returns, per item of ``prepared.items`` scored, what the output layer saw at its
    positions (``OutputStates``; log-likelihood scoring only, none for letters).
    """
    n_options = max(len(q.options) for q in prepared.questions)
    scores = np.full((len(prepared), n_options), np.nan)
    states: dict[int, OutputStates] = {}
    which = np.arange(len(prepared)) if which is None else np.asarray(which, dtype=int)
    if len(which) == 0:
        return (scores, states) if record else scores
    if prepared.mode == "loglik":
        chosen = np.nonzero(np.isin(prepared.item_question, which))[0]
        items = [prepared.items[i] for i in chosen]
        if record:
            logprobs, seen = continuation_logprobs(lm, items, batching, record=True)
            states = dict(zip(chosen.tolist(), seen))
        else:
            logprobs = continuation_logprobs(lm, items, batching)
        per_char = logprobs.numpy() / prepared.char_lengths[chosen]
        slot = np.zeros(len(prepared), dtype=int)
        for item, value in zip(chosen, per_char):
            question = prepared.item_question[item]
            scores[question, slot[question]] = value
            slot[question] += 1
    else:
        contexts = [prepared.items[i][0] for i in which]
        letters = next_token_logprobs(lm, contexts, prepared.letter_ids[:n_options], batching).numpy()
        scores[which] = letters
    for question in which:
        scores[question, len(prepared.questions[question].options):] = -np.inf
    return (scores, states) if record else scores


def correct_from_scores(prepared: PreparedQuestions, scores: np.ndarray) -> np.ndarray:
    """Boolean per question: did the highest-scoring option match the answer."""
    return np.argmax(scores, axis=1) == prepared.answers


def correct_probability(prepared: PreparedQuestions, scores: np.ndarray) -> np.ndarray:
    """Per question: the normalized probability of the correct option, P(correct) / sum of
    P(option) — a continuous knowledge measure beside accuracy (chance = 1 / options).
    ``loglik`` scores are per character; each option's log-probability is taken at the
    question's mean option length (per-character score x that length), so the measure
    ranks the options as the accuracy does and carries no preference for short options (a
    model that knows nothing has 1 / options in expectation, whatever the lengths);
    ``letter`` scores are the letters' log-probabilities."""
    finite = np.isfinite(scores)
    if prepared.mode == "loglik":
        lengths = np.where(finite, _option_char_lengths(prepared), 0.0)
        common = lengths.sum(axis=1, keepdims=True) / np.maximum(finite.sum(axis=1, keepdims=True), 1)
        logp = scores * common
    else:
        logp = scores.copy()
    logp = np.where(finite, logp, -np.inf)
    logp = logp - logp.max(axis=1, keepdims=True)
    probs = np.exp(logp)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs[np.arange(len(prepared)), prepared.answers]


def _option_char_lengths(prepared: PreparedQuestions) -> np.ndarray:
    n_options = max(len(q.options) for q in prepared.questions)
    lengths = np.ones((len(prepared), n_options))
    slot = np.zeros(len(prepared), dtype=int)
    for question, chars in zip(prepared.item_question, prepared.char_lengths):
        lengths[question, slot[question]] = chars
        slot[question] += 1
    return lengths
