"""Evaluate an edit against the original model on one split (train or test).

The original model's answers are computed once per split and cached. For an edit that
only changes some tokens' input embeddings (with untied output embeddings), a question
or coherence prompt that uses none of those tokens gets exactly the original's output,
so only the touched ones are run again; any other edit re-runs everything.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import ConceptData, MCQuestion
from ..edits import Edit
from ..models import LoadedModel, embeddings_are_tied
from . import coherence as coh
from .metrics import Interval, accuracy_pair, erasure_metrics
from .multiple_choice import PreparedQuestions, correct_from_scores, option_scores, prepare
from .scoring import Batching, greedy_generate

SPLITS = ("train", "test")


@dataclass
class SplitOutcome:
    metrics: dict[str, Interval]
    correct: dict[str, tuple[np.ndarray, np.ndarray]]  # set -> (base, edited)
    rescored: dict[str, int] = field(default_factory=dict)  # how many items actually ran

    def value(self, name: str, default: float = float("nan")) -> float:
        return self.metrics[name].value if name in self.metrics else default

    def as_dict(self) -> dict:
        return {
            "metrics": {name: interval.as_dict() for name, interval in self.metrics.items()},
            "rescored": self.rescored,
        }


class Evaluator:
    def __init__(self, lm: LoadedModel, data: ConceptData, config, seed: int = 42):
        self.lm, self.data, self.config, self.seed = lm, data, config, seed
        self.batching = Batching(config.batch_tokens)
        self._prepared: dict[tuple[str, str], PreparedQuestions] = {}
        self._base_scores: dict[tuple[str, str], np.ndarray] = {}
        self._coherence: coh.CoherenceSet | None = None

    def question_sets(self, split: str) -> dict[str, list[MCQuestion]]:
        sets = {
            "qa": self.data.questions.get(f"qa_{split}", []),
            "simdom": self.data.questions.get(f"simdom_{split}", []),
            "general": self.data.general.get(split, []),
        }
        return {name: questions for name, questions in sets.items() if questions}

    def _prepared_set(self, split: str, name: str) -> PreparedQuestions:
        key = (split, name)
        if key not in self._prepared:
            self._prepared[key] = prepare(self.lm, self.question_sets(split)[name], self.config.scoring, self.seed)
            self._base_scores[key] = option_scores(self.lm, self._prepared[key], batching=self.batching)
        return self._prepared[key]

    def coherence_set(self) -> coh.CoherenceSet | None:
        prompts = list(self.data.coherency_prompts)
        prompts += [s for s in self.data.neutral_sentences[: self.config.neutral_coherence_prompts]]
        if not prompts or self.config.coherence_new_tokens <= 0:
            return None
        if self._coherence is None:
            self._coherence = coh.build_coherence_set(self.lm, prompts, self.config.coherence_new_tokens, self.batching)
        return self._coherence

    def touched_tokens(self, edit: Edit | None) -> set[int] | None:
        if edit is None:
            return set()
        if embeddings_are_tied(self.lm.model):
            return None  # the output layer changed too: every prediction may move
        return edit.changed_token_ids()

    def base_accuracy(self, split: str) -> dict[str, float]:
        return {name: float(correct_from_scores(self._prepared_set(split, name), self._base_scores[(split, name)]).mean())
                for name in self.question_sets(split)}

    def evaluate(self, split: str, edit: Edit | None) -> SplitOutcome:
        """Metrics of ``edit`` on ``split``; the model is left as it was (edit reverted)."""
        touched = self.touched_tokens(edit)
        sets = {name: self._prepared_set(split, name) for name in self.question_sets(split)}
        reference = self.coherence_set()
        correct, rescored, continuations, generated_for = {}, {}, None, np.array([], dtype=int)
        if edit is not None:
            edit.apply(self.lm.model)
        try:
            for name, prepared in sets.items():
                which = prepared.touching(touched)
                scores = self._base_scores[(split, name)].copy()
                if len(which):
                    scores[which] = option_scores(self.lm, prepared, which, self.batching)[which]
                base = correct_from_scores(prepared, self._base_scores[(split, name)])
                correct[name] = accuracy_pair(base, correct_from_scores(prepared, scores))
                rescored[name] = int(len(which))
            if reference is not None:
                generated_for = reference.touching(touched)
                continuations = greedy_generate(
                    self.lm, [reference.prompt_ids[i] for i in generated_for], reference.max_new_tokens, self.batching
                )
        finally:
            if edit is not None:
                edit.revert(self.lm.model)
        samples = dict(correct)
        if reference is not None:
            samples["coherence"] = self._coherence_rows(reference, generated_for, continuations)
            rescored["coherence"] = int(len(generated_for))
        metrics = erasure_metrics(samples, self.config.bootstrap, self.seed)
        return SplitOutcome(metrics=metrics, correct=correct, rescored=rescored)

    def _coherence_rows(self, reference: coh.CoherenceSet, which: np.ndarray, continuations) -> tuple[np.ndarray, ...]:
        """Score the edited continuations with the ORIGINAL model (the edit is reverted)."""
        edited_ll, edited_distinct = reference.original_ll.copy(), reference.original_distinct.copy()
        if len(which):
            prompt_ids = [reference.prompt_ids[i] for i in which]
            edited_ll[which] = coh.mean_loglik(self.lm, prompt_ids, continuations, self.batching)
            edited_distinct[which] = [coh.distinct_bigrams(c) for c in continuations]
        return coh.coherence_rows(edited_ll, edited_distinct, reference)
