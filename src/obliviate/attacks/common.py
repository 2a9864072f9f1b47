"""Pieces every attack shares: test-question accuracy with a bootstrap interval, a text
prefix spliced into prepared questions, and the test questions prepared for a model.

Accuracy is always on TEST questions (METHOD.md section 4: grid search on train, final
numbers on test) and always carries a 95% bootstrap interval over questions, in the
{value, low, high} format of evaluation/metrics.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from obliviate.data.concepts import ConceptData, MCQuestion
from obliviate.evaluation.cache import OriginalCache
from obliviate.evaluation.metrics import bootstrap, erasure_metrics
from obliviate.evaluation.multiple_choice import PreparedQuestions, correct_from_scores, option_scores, prepare
from obliviate.evaluation.scoring import Batching
from obliviate.models.loading import LoadedModel
from obliviate.errors import ObliviateError
from obliviate.training import sharding

ROLES = ("original", "erased")  # every attack runs on both, side by side


@dataclass
class AttackContext:
    """What an attack needs: both models, the concept's data and where to keep state."""

    models: dict[str, LoadedModel]  # role -> model ("original", "erased")
    data: ConceptData
    data_dir: Path | None
    scoring: str = "auto"
    seed: int = 42
    bootstrap: int = 1000
    batching: Batching = field(default_factory=Batching)
    out: Path | None = None  # checkpoints go under out/checkpoints/<attack>/<role>
    progress: bool = True
    options: dict = field(default_factory=dict)  # per-attack settings by attack name

    def test_questions(self) -> list[MCQuestion]:
        return self.data.questions.get("qa_test", [])

    def checkpoint_dir(self, attack: str, role: str) -> Path | None:
        return None if self.out is None else self.out / "checkpoints" / attack / role


def accuracy_interval(correct: np.ndarray, n_resamples: int, seed: int) -> dict[str, float]:
    correct = np.asarray(correct, dtype=float)
    stat = lambda s: {"acc": float(s["c"][0].mean()) if len(s["c"][0]) else float("nan")}  # noqa: E731
    return bootstrap(stat, {"c": (correct,)}, n_resamples, seed)["acc"].as_dict()


def recovered_fraction(original_correct: np.ndarray, attacked_correct: np.ndarray, n_resamples: int, seed: int) -> dict:
    """Share of the ORIGINAL model's above-chance knowledge the attack brings back
    (qa_frac of metrics.py: clip((acc - 0.25) / (base - 0.25), 0, 1)), with its interval."""
    pair = (np.asarray(original_correct, float), np.asarray(attacked_correct, float))
    return erasure_metrics({"qa": pair}, n_resamples, seed)["qa_frac"].as_dict()


def splice_prefix(lm: LoadedModel, prepared: PreparedQuestions, prefix: str) -> PreparedQuestions:
    """The same questions (same option order) with ``prefix`` placed before each context.

    The prefix goes right after a leading BOS token, so "Question: {q}\\nAnswer:" (or the
    chat prompt) is unchanged and only the text before it differs.
    """
    if not prefix:
        return prepared
    prefix_ids = lm.tokenizer(prefix, add_special_tokens=False).input_ids
    bos = lm.tokenizer.bos_token_id
    cache: dict[tuple[int, ...], list[int]] = {}

    def spliced(context: list[int]) -> list[int]:
        key = tuple(context)
        if key not in cache:
            head = 1 if context and context[0] == bos else 0
            cache[key] = context[:head] + prefix_ids + context[head:]
        return cache[key]

    items = [(spliced(context), continuation) for context, continuation in prepared.items]
    token_sets = [ids | frozenset(prefix_ids) for ids in prepared.token_sets]
    return replace(prepared, items=items, token_sets=token_sets)


def correct_on(lm: LoadedModel, prepared: PreparedQuestions, batching: Batching) -> np.ndarray:
    return correct_from_scores(prepared, option_scores(lm, prepared, batching=batching))


def prepared_test(ctx: AttackContext, lm: LoadedModel) -> PreparedQuestions:

    questions = ctx.test_questions()
    if not questions:
        raise ObliviateError(f"Concept {ctx.data.concept!r} has no QA_test questions: attacks report test accuracy.")
    return prepare(lm, questions, ctx.scoring, ctx.seed)


def cached_for_original(ctx: AttackContext, lm: LoadedModel, prepared: PreparedQuestions, kind: str, settings: dict,
                        compute: Callable[[], Any]) -> Any:
    """What an attack measured on the ORIGINAL model (plain JSON) from the results cache
    (evaluation/cache.py) when the same weights, questions, seed and ``settings`` ran
    before; else ``compute()``, kept for the next command. It depends on nothing the
    erasure did, so every erase run of the concept shares it (``ctx.options["cache"]``
    False: always ``compute()``)."""
    cache = OriginalCache(lm, enabled=ctx.options.get("cache", True) and sharding.world()[1] == 1)
    payload = {**settings, "seed": ctx.seed, "items": prepared.items, "answers": prepared.answers,
               "mode": prepared.mode, "letter_ids": prepared.letter_ids, "budget": ctx.batching.budget(lm)}
    return cache.fetch_json(kind, payload, compute)
