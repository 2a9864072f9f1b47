"""Pieces every attack shares: test-question accuracy with a bootstrap interval, a text
prefix spliced into prepared questions, and the test questions prepared for a model.

Accuracy is always on TEST questions (METHOD.md section 4: grid search on train, final
numbers on test) and always carries a 95% bootstrap interval over questions, in the
{value, low, high} format of evaluation/metrics.py.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from obliviate.data.concepts import ConceptData, MCQuestion, load_relearn_paragraphs
from obliviate.evaluation.cache import OriginalCache
from obliviate.evaluation.metrics import CHANCE, bootstrap, chance_level, erasure_metrics
from obliviate.evaluation.multiple_choice import PreparedQuestions, correct_from_scores, option_scores, prepare
from obliviate.evaluation.scoring import Batching
from obliviate.models.loading import LoadedModel
from obliviate.errors import ObliviateError
from obliviate.training import sharding


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

    @property
    def chance(self) -> float:
        """The TEST questions' chance level (1 / options, averaged over the questions)."""
        return chance_level(len(q.options) for q in self.test_questions()) if self.test_questions() else CHANCE

    def checkpoint_dir(self, attack: str, role: str) -> Path | None:
        return None if self.out is None else self.out / "checkpoints" / attack / role


def accuracy_interval(correct: np.ndarray, n_resamples: int, seed: int) -> dict[str, float]:
    correct = np.asarray(correct, dtype=float)
    stat = lambda s: {"acc": float(s["c"][0].mean()) if len(s["c"][0]) else float("nan")}  # noqa: E731
    return bootstrap(stat, {"c": (correct,)}, n_resamples, seed)["acc"].as_dict()


def recovered_fraction(original_correct: np.ndarray, attacked_correct: np.ndarray, n_resamples: int, seed: int,
                       chance: float = CHANCE) -> dict:
    """Share of the ORIGINAL model's above-chance knowledge the attack brings back
    (qa_frac of metrics.py: clip((acc - chance) / (base - chance), 0, 1)), with its interval."""
    pair = (np.asarray(original_correct, float), np.asarray(attacked_correct, float))
    return erasure_metrics({"qa": pair}, n_resamples, seed, chance={"qa": chance})["qa_frac"].as_dict()


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
    payload = {**settings, "seed": ctx.seed, "items": prepared.items, "answers": prepared.answers,
               "mode": prepared.mode, "letter_ids": prepared.letter_ids, "budget": ctx.batching.budget(lm)}
    return original_cache(ctx, lm).fetch_json(kind, payload, compute)


def original_cache(ctx: AttackContext, lm: LoadedModel) -> OriginalCache:
    """The results cache for what an attack measures on the ORIGINAL model (off when
    ``ctx.options["cache"]`` is False, and across several processes)."""
    return OriginalCache(lm, enabled=ctx.options.get("cache", True) and sharding.world()[1] == 1)


def cached_tensor_for_original(ctx: AttackContext, lm: LoadedModel, kind: str, payload: dict,
                               compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor an attack computes on the ORIGINAL model from ``payload``'s inputs (its
    sentences and settings), from the results cache when they ran before."""
    return original_cache(ctx, lm).fetch(kind, payload, compute, lambda value: ({"value": value}, {}),
                                         lambda tensors, _: tensors["value"])


def each_role(ctx: AttackContext, out: dict, measure: Callable) -> dict:
    """Run ``measure(role, lm, prepared, before) -> (after, details)`` on each model: test
    accuracy before and after the attack, and the share of the original's knowledge the
    erased model gets back."""
    corrects = {}
    for role, lm in ctx.models.items():
        prepared = prepared_test(ctx, lm)
        before = correct_on(lm, prepared, ctx.batching)
        after, details = measure(role, lm, prepared, before)
        corrects[role] = (before, after)
        out[role] = {"before": accuracy_interval(before, ctx.bootstrap, ctx.seed),
                     "after": accuracy_interval(after, ctx.bootstrap, ctx.seed),
                     "correct_before": np.asarray(before).astype(int).tolist(),  # per question, for pooled statistics
                     "correct_after": np.asarray(after).astype(int).tolist(), **details}
    if "original" in corrects and "erased" in corrects:
        out["recovered_frac"] = recovered_fraction(corrects["original"][0], corrects["erased"][1], ctx.bootstrap, ctx.seed,
                                                   ctx.chance)
    return out


def worst_case_recovered(results: dict[str, dict]) -> dict | None:
    """The largest recovered fraction over the attacks that report one: {attack, value,
    low, high}; None when no attack measured a recovered fraction."""
    measured = {name: r["recovered_frac"] for name, r in results.items()
                if isinstance(r, dict) and r.get("recovered_frac", {}).get("value") is not None}
    if not measured:
        return None
    worst = max(measured, key=lambda name: measured[name]["value"])
    return {"attack": worst, **measured[worst]}


TextSource = Literal["concept", "unrelated", "retain"]
TEXT_SOURCES: tuple[str, ...] = ("concept", "unrelated", "retain")
SENTENCES_A_PARAGRAPH = 3  # sentence lists become paragraphs of this many, to match the relearning text's length


def attack_text(ctx: AttackContext, source: TextSource, count: int) -> tuple[list[str], str]:
    """(up to ``count`` paragraphs, where they come from) for an attack that reads or trains on text.

    ``concept``: the benchmark's relearning paragraphs where the data folder has them, else
    the concept's own sentences; ``unrelated``: other concepts' sentences (text that never
    names this concept); ``retain``: the neutral sentences the trained methods keep the
    model on. Sentences are shuffled with the seed (not for ``concept``) and joined in threes.
    """
    data = ctx.data
    if source == "concept":
        path = ctx.data_dir / "relearn_paragraphs.json" if ctx.data_dir is not None else None
        if path is not None and path.is_file():
            return load_relearn_paragraphs(ctx.data_dir, data.concept, count), "relearn_paragraphs.json"
        return paragraphs_of(data.concept_sentences, count), "the concept's sentences"
    sentences = list(data.contrast_sentences if source == "unrelated" else data.neutral_sentences)
    if not sentences:
        what = "other concepts' sentences" if source == "unrelated" else "neutral sentences"
        raise ObliviateError(f"The {source} text is empty: {data.concept!r} has no {what}.")
    random.Random(ctx.seed).shuffle(sentences)
    where = "other concepts' sentences" if source == "unrelated" else "the neutral (retain) sentences"
    return paragraphs_of(sentences, count), where


def paragraphs_of(sentences: list[str], count: int) -> list[str]:
    step = SENTENCES_A_PARAGRAPH
    return [" ".join(sentences[i:i + step]) for i in range(0, len(sentences), step)][:count]
