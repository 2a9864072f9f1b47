"""Pooled, paired statistics over concepts (METHOD.md section 4).

With 50 questions a split one concept's accuracy carries about +/-0.14 of noise, so a
method is judged by the mean of its per-concept metrics over many concepts, with a
stratified bootstrap: each draw resamples questions (and prompts) WITHIN every concept,
recomputes every concept's metric and averages over concepts. Two arms on the same
concepts are compared with the SAME question indices in both arms (paired), which
removes the between-question variance they share.

Near chance: when the original model's qa accuracy interval reaches chance, a concept's
efficacy and regained fraction divide by noise, so the concept is left out of them; a
near-chance simdom or general set is left out of that concept's specificity.
Pure numpy: no torch, so summaries of finished runs are fast to compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence, TypeVar

import numpy as np

from obliviate.errors import ObliviateError
from obliviate.evaluation.results import RunResults
from obliviate.evaluation.metrics import (CHANCE, QUESTION_SETS, Interval, coherence_statistic, harmonic,
                                          knowledge_fraction)

QUESTION_KEYS = ("base_correct", "edited_correct", "base_prob", "edited_prob")
PROMPT_KEYS = ("edited_ll", "original_ll", "edited_distinct", "original_distinct")
METRICS = ("efficacy", "specificity", "coherence", "concept_fluency", "regained", "relearned_qa",
           *(f"drop_{s}" for s in QUESTION_SETS), *(f"prob_drop_{s}" for s in QUESTION_SETS))
# 1.96 + 0.84: z of a two-sided alpha of 0.05 plus z of 80% power; a true difference of
# 2.8 standard errors is detected (interval excludes 0) four times out of five.
MDE_STANDARD_ERRORS = 2.8
NEAR_CHANCE = "the original model's {} accuracy interval reaches chance"
ORIGINAL = "original"  # the unedited model, the arm of "X minus nothing"
ArmT = TypeVar("ArmT")  # anything with .concept and .method


@dataclass(frozen=True)
class Arm:
    """One method's test-set arrays on one concept (one erase run, or the original model)."""

    concept: str
    method: str
    questions: Mapping[str, Mapping[str, np.ndarray]]  # set -> QUESTION_KEYS -> one value a question
    # "general" prompts give coherence, "concept" prompts fluency on concept text
    prompts: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)  # set -> PROMPT_KEYS
    near_chance: Mapping[str, bool] = field(default_factory=dict)
    relearned: np.ndarray | None = None  # qa correctness after the last relearning epoch
    chance: Mapping[str, float] = field(default_factory=dict)  # set -> chance level (CHANCE where absent)

    def chance_of(self, name: str) -> float:
        return float(self.chance.get(name, CHANCE))


@dataclass(frozen=True)
class Pooled:
    """A pooled metric (or paired difference): the mean over the included concepts."""

    interval: Interval
    standard_error: float
    included: tuple[str, ...]
    excluded: Mapping[str, str]  # concept -> why it is left out
    adjusted: Mapping[str, str] = field(default_factory=dict)  # concept -> what its metric leaves out

    def as_dict(self) -> dict:
        return {**json_numbers(self.interval.as_dict()), "n_concepts": len(self.included), "included": list(self.included),
                "excluded": dict(self.excluded), "adjusted": dict(self.adjusted)}


@dataclass(frozen=True)
class Difference:
    """A paired difference of two arms; ``significant``: its 95% interval excludes 0."""

    pooled: Pooled
    significant: bool
    minimum_detectable: float

    def as_dict(self) -> dict:
        return {**self.pooled.as_dict(), "significant": self.significant,
                **json_numbers({"standard_error": self.pooled.standard_error,
                                "minimum_detectable": self.minimum_detectable})}


def json_numbers(values: Mapping[str, float]) -> dict[str, float | None]:
    # NaN (no concept to pool) is not valid JSON: it is written as null
    return {k: None if math.isnan(v) else v for k, v in values.items()}


def arm_from_results(results: RunResults, where: str = "results.json") -> Arm:
    """An arm from an erase run's results (needs ``per_question``)."""
    parts = results.parts
    if "per_question" not in parts or not results.concept or not results.method:
        raise ObliviateError(f"{where} has no per-question results (written by an older version): "
                             "rerun it to get pooled statistics.")
    try:
        questions = {name: {key: np.asarray(arrays[key], dtype=float) for key in QUESTION_KEYS}
                     for name, arrays in parts["per_question"].items()}
        prompts = {name: {key: np.asarray(rows[key], dtype=float) for key in PROMPT_KEYS}
                   for name, rows in parts.get("per_prompt", {}).items()}
    except KeyError as missing:
        raise ObliviateError(f"{where}: per-question or per-prompt results lack {missing}; rerun it.") from None
    curve = parts.get("relearn", {}).get("erased", {}).get("curve_correct")
    relearned = np.asarray(curve[-1], dtype=float) if curve else None
    arm = Arm(results.concept, results.method, questions, prompts, results.near_chance, relearned,
              results.chance_levels())
    check_arrays(arm, where)
    return arm


def check_arrays(arm: Arm, where: str) -> None:
    """At least one question set; every array of a set non-empty with one value a question (or prompt)."""
    groups = [*arm.questions.values(), *arm.prompts.values()]
    if arm.relearned is not None and "qa" in arm.questions:
        groups.append({"base_correct": arm.questions["qa"]["base_correct"], "relearned": arm.relearned})
    if not arm.questions:
        raise ObliviateError(f"{where}: per_question holds no question set.")
    for arrays in groups:
        if 0 in {len(a) for a in arrays.values()}:
            raise ObliviateError(f"{where}: a question or prompt set is empty.")
        if len({len(a) for a in arrays.values()}) > 1:
            raise ObliviateError(f"{where}: arrays of one question set differ in length "
                                 f"({ {k: len(a) for k, a in arrays.items()} }).")


def original_arm(arm: Arm) -> Arm:
    """The unedited model on the same questions: its edited answers are the base answers,
    so its efficacy is 0 and its specificity, coherence and fluency 1 in every draw."""
    questions = {name: {**a, "edited_correct": a["base_correct"], "edited_prob": a["base_prob"]}
                 for name, a in arm.questions.items()}
    prompts = {name: {**r, "edited_ll": r["original_ll"], "edited_distinct": r["original_distinct"]}
               for name, r in arm.prompts.items()}
    return Arm(arm.concept, ORIGINAL, questions, prompts, arm.near_chance, None, arm.chance)


def draw_indices(arm: Arm, n_resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row 0 is the identity (the point value); rows 1.. resample each set with replacement."""
    sizes = {f"q:{name}": len(a["base_correct"]) for name, a in arm.questions.items()}
    sizes.update({f"p:{name}": len(r["edited_ll"]) for name, r in arm.prompts.items()})
    return {key: np.vstack([np.arange(n), rng.integers(0, n, (n_resamples, n))]) for key, n in sorted(sizes.items())}


def resampled_means(arm: Arm, indices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The mean of every array in every draw (one value a draw): all the metrics need."""
    means = {}
    for name, arrays in arm.questions.items():
        rows = indices[f"q:{name}"]
        means.update({f"{name}/{key}": a[rows].mean(axis=1) for key, a in arrays.items()})
        if name == "qa" and arm.relearned is not None:
            means["qa/relearned"] = arm.relearned[rows].mean(axis=1)
    for name, arrays in arm.prompts.items():
        means.update({f"prompt:{name}/{key}": a[indices[f"p:{name}"]].mean(axis=1) for key, a in arrays.items()})
    return means


def fraction(edited: float, base: float, chance: float = CHANCE) -> float:
    # An unchanged model keeps all its knowledge, even in a draw where its base dips to
    # chance (where knowledge_fraction's clip would say 0): the original arm stays exact.
    return 1.0 if edited == base else knowledge_fraction(edited, base, chance)


def specificity_sets(arm: Arm) -> list[str]:
    return [s for s in ("simdom", "general") if s in arm.questions and not arm.near_chance.get(s, False)]


def concept_metrics(arm: Arm, means: Mapping[str, float]) -> dict[str, float]:
    """Every metric of one concept in one draw, from that draw's means."""
    out = {}
    for name in arm.questions:
        base, edited = means[f"{name}/base_correct"], means[f"{name}/edited_correct"]
        out[f"drop_{name}"] = base - edited
        out[f"prob_drop_{name}"] = means[f"{name}/base_prob"] - means[f"{name}/edited_prob"]
    if "qa" in arm.questions:
        out["efficacy"] = 1.0 - fraction(means["qa/edited_correct"], means["qa/base_correct"], arm.chance_of("qa"))
        if "qa/relearned" in means:  # the raw accuracy needs no base above chance; the fraction does
            out["regained"] = knowledge_fraction(means["qa/relearned"], means["qa/base_correct"], arm.chance_of("qa"))
            out["relearned_qa"] = means["qa/relearned"]
    kept = specificity_sets(arm)
    if kept:
        out["specificity"] = harmonic(*[fraction(means[f"{s}/edited_correct"], means[f"{s}/base_correct"],
                                                 arm.chance_of(s)) for s in kept])
    for name, metric in (("general", "coherence"), ("concept", "concept_fluency")):
        if name in arm.prompts:
            # coherence_statistic reads only the means of its rows; concept fluency is the
            # same statistic on the concept's own text (as in results.json)
            rows = tuple(np.atleast_1d(means[f"prompt:{name}/{k}"]) for k in PROMPT_KEYS)
            out[metric] = coherence_statistic(rows)["coherence"]
    return out


def concept_draws(arm: Arm, indices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """metric -> its value in every draw (index 0: the point value) for one concept."""
    means = resampled_means(arm, indices)
    n_draws = len(next(iter(indices.values())))
    per_draw = [concept_metrics(arm, {k: float(v[r]) for k, v in means.items()}) for r in range(n_draws)]
    return {metric: np.array([d[metric] for d in per_draw]) for metric in per_draw[0]}


def exclusion(arm: Arm, metric: str) -> str | None:
    """Why a concept has no value of ``metric`` (None: it has one)."""
    needs = {"efficacy": "qa", "regained": "qa", "relearned_qa": "qa", "coherence": "prompt:general",
             "concept_fluency": "prompt:concept"}
    needed = needs.get(metric, metric.rsplit("_", 1)[-1])
    if needed.startswith("prompt:") and needed[7:] not in arm.prompts:
        return f"no {needed[7:]} prompts"
    if needed in QUESTION_SETS and needed not in arm.questions:
        return f"no {needed} questions"
    if metric in ("efficacy", "regained") and arm.near_chance.get("qa", False):
        return NEAR_CHANCE.format("qa")
    if metric in ("regained", "relearned_qa") and arm.method == ORIGINAL:
        return "the original model is not attacked"
    if metric in ("regained", "relearned_qa") and arm.relearned is None:
        return "no per-question relearning curve"
    if metric == "specificity" and not specificity_sets(arm):
        return "simdom and general are both absent or near chance"
    return None


def adjustment(arm: Arm) -> str | None:
    """What a concept's specificity leaves out (None: nothing)."""
    left_out = [s for s in ("simdom", "general") if s in arm.questions and s not in specificity_sets(arm)]
    if not left_out or not specificity_sets(arm):
        return None
    return f"specificity from {specificity_sets(arm)[0]} only: " + NEAR_CHANCE.format(left_out[0])


def combine(per_concept: Mapping[str, np.ndarray], excluded: Mapping[str, str], adjusted: Mapping[str, str]) -> Pooled:
    """Mean over concepts in every draw; percentile 95% interval of the resampled means."""
    included = tuple(sorted(per_concept))
    if not included:
        nan = float("nan")
        return Pooled(Interval(nan, nan, nan), nan, included, dict(excluded), dict(adjusted))
    draws = np.mean([per_concept[c] for c in included], axis=0)
    low, high = np.percentile(draws[1:], [2.5, 97.5])
    return Pooled(Interval(float(draws[0]), float(low), float(high)), float(np.std(draws[1:], ddof=1)),
                  included, dict(excluded), dict(adjusted))


def by_concept(arms: Sequence[ArmT]) -> dict[str, ArmT]:
    """One arm a concept (erase runs here, attack runs in robustness.py)."""
    out: dict[str, ArmT] = {}
    for arm in arms:
        if arm.concept in out:
            raise ObliviateError(f"two {arm.method} runs of concept {arm.concept!r}: keep one of them.")
        out[arm.concept] = arm
    return out


def pooled_metrics(arms: Sequence[Arm], n_resamples: int = 2000, seed: int = 0) -> dict[str, Pooled]:
    """Every metric of one method pooled over its concepts (one arm a concept)."""
    check_resamples(n_resamples)
    concepts = by_concept(arms)
    rng = np.random.default_rng(seed)
    draws = {c: concept_draws(a, draw_indices(a, n_resamples, rng)) for c, a in sorted(concepts.items())}
    groups = {c: (a,) for c, a in concepts.items()}
    return {metric: pool(metric, groups, {c: d.get(metric) for c, d in draws.items()}) for metric in METRICS}


def check_resamples(n_resamples: int) -> None:
    if n_resamples < 2:  # a standard error needs two draws
        raise ObliviateError(f"the bootstrap needs at least 2 resamples, got {n_resamples}.")


def pool(metric: str, arms: Mapping[str, tuple[Arm, ...]], values: Mapping[str, np.ndarray | None]) -> Pooled:
    """Combine one metric's per-concept draws, with the reasons for what is left out."""
    excluded, adjusted, kept = {}, {}, {}
    for concept, group in sorted(arms.items()):
        reasons = [r for r in (exclusion(a, metric) for a in group) if r]
        if reasons or values[concept] is None:
            excluded[concept] = reasons[0] if reasons else "no value"
            continue
        kept[concept] = values[concept]
        notes = [n for n in (adjustment(a) for a in group) if n] if metric == "specificity" else []
        if notes:
            adjusted[concept] = notes[0]
    return combine(kept, excluded, adjusted)


def paired_difference(arms_a: Sequence[Arm], arms_b: Sequence[Arm] | None, n_resamples: int = 2000,
                      seed: int = 0) -> dict[str, Difference]:
    """Every metric of arm A minus arm B, pooled over their shared concepts; the same
    question indices go to both arms in every draw (the pairing). ``arms_b`` None: the
    original model on A's questions (A's own metric relative to no edit)."""
    check_resamples(n_resamples)
    a_by, b_by = by_concept(arms_a), (by_concept(arms_b) if arms_b is not None else None)
    shared = sorted(a_by) if b_by is None else sorted(set(a_by) & set(b_by))
    only = {c: f"only in {a_by[c].method if c in a_by else b_by[c].method} runs"
            for c in sorted(set(a_by) ^ set(b_by or a_by))}
    rng = np.random.default_rng(seed)
    groups, diffs = {}, {}
    for concept in shared:
        a = a_by[concept]
        b = original_arm(a) if b_by is None else b_by[concept]
        check_same_questions(a, b)
        indices = draw_indices(a, n_resamples, rng)
        draws_a, draws_b = concept_draws(a, indices), concept_draws(b, indices)
        groups[concept] = (a, b)
        diffs[concept] = {m: draws_a[m] - draws_b[m] for m in draws_a if m in draws_b}
    out = {}
    for metric in METRICS:
        pooled = pool(metric, groups, {c: d.get(metric) for c, d in diffs.items()})
        pooled = Pooled(pooled.interval, pooled.standard_error, pooled.included, {**only, **pooled.excluded},
                        pooled.adjusted)
        significant = bool(pooled.included) and pooled.interval.excludes(0.0)
        out[metric] = Difference(pooled, significant, MDE_STANDARD_ERRORS * pooled.standard_error)
    return out


def check_same_questions(a: Arm, b: Arm) -> None:
    """Pairing needs both arms scored on the same questions and prompts."""
    for kind, sets_a, sets_b in (("questions", a.questions, b.questions), ("prompts", a.prompts, b.prompts)):
        for name in set(sets_a) & set(sets_b):
            if len(next(iter(sets_a[name].values()))) != len(next(iter(sets_b[name].values()))):
                raise ObliviateError(f"{a.method} and {b.method} on {a.concept!r} have different {name} {kind}: "
                                     "a paired comparison needs the same test questions in both runs.")
