"""The worst case over an attack battery, pooled over concepts with paired intervals.

One attack run (`obliviate attack`) holds, per attack, the original model's TEST answers
before any attack and the erased model's answers after it. A concept's worst case is the
largest share of the original's above-chance knowledge that any attack brings back
(knowledge_fraction of the erased model's accuracy after the attack against the original's
before). It is pooled like every other metric (pooled.py): each bootstrap draw resamples
questions within every concept, takes the maximum over attacks IN that draw, and averages
over concepts; two methods are compared with the same question indices in both arms.

Attacks whose answers do not cover every TEST question (gcg scores held-out questions
only) cannot share the draws and are left out of the pooled number (listed as such).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import CHANCE, knowledge_fraction, near_chance
from obliviate.evaluation.results import RunResults
from obliviate.evaluation.pooled import (MDE_STANDARD_ERRORS, NEAR_CHANCE, Difference, Pooled, by_concept, check_resamples,
                                        combine)


@dataclass(frozen=True)
class AttackedArm:
    """One method's attack run on one concept: per TEST question, the original's answers
    before any attack and the erased model's after each attack."""

    concept: str
    method: str
    base: np.ndarray
    attacked: Mapping[str, np.ndarray]  # attack -> erased model's correctness after it
    left_out: Mapping[str, str]  # attack -> why it is not in the pooled worst case
    chance: float = CHANCE  # of the TEST questions (1 / options)

    @property
    def near_chance(self) -> bool:
        return near_chance(float(self.base.mean()), len(self.base), self.chance)


def per_question(result: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
    """(original before, erased after) per TEST question, where the attack recorded them."""
    original, erased = result.get("original", {}), result.get("erased", {})
    if "correct_before" in original and "correct_after" in erased:
        return np.asarray(original["correct_before"], float), np.asarray(erased["correct_after"], float)
    if "curve_correct" in original and "curve_correct" in erased:  # relearning: epoch 0 .. last
        return np.asarray(original["curve_correct"][0], float), np.asarray(erased["curve_correct"][-1], float)
    return None


def attacked_arm(results: RunResults, where: str = "results.json") -> AttackedArm:
    """An arm from an attack run's results."""
    if results.kind != "attack":
        raise ObliviateError(f"{where} is not an attack run's results (kind {results.kind!r}).")
    base, attacked, left_out = None, {}, {}
    for name in results.parts.get("attacks", []):
        result = results.parts.get(name, {})
        if "recovered_frac" not in result:
            continue  # the probe and other readouts that bring back no answers
        arrays = per_question(result)
        if arrays is None:
            left_out[name] = "no per-question answers (rerun the attack)"
        elif "held_out_questions" in result.get("erased", {}):
            left_out[name] = "scored on held-out questions only"
        elif base is None or len(arrays[0]) == len(base):
            base = arrays[0] if base is None else base
            attacked[name] = arrays[1]
        else:
            left_out[name] = "a different number of TEST questions"
    if base is None:
        raise ObliviateError(f"{where}: no attack recorded per-question answers on every TEST question.")
    return AttackedArm(results.concept, results.method, base, attacked, left_out,
                       float(results.parts.get("chance", CHANCE)))


def worst_case_draws(arm: AttackedArm, rows: np.ndarray) -> np.ndarray:
    """The largest recovered fraction over the arm's attacks in every draw of question rows."""
    base = arm.base[rows].mean(axis=1)
    per_attack = [np.array([knowledge_fraction(a, b, arm.chance) for a, b in zip(after[rows].mean(axis=1), base)])
                  for after in arm.attacked.values()]
    return np.max(per_attack, axis=0)


def question_rows(n_questions: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Row 0 is the identity (the point value); rows 1.. resample the questions."""
    return np.vstack([np.arange(n_questions), rng.integers(0, n_questions, (n_resamples, n_questions))])


def pooled_worst_case(arms: Sequence[AttackedArm], n_resamples: int = 2000, seed: int = 0) -> Pooled:
    """The worst case pooled over one method's concepts (near-chance concepts left out)."""
    check_resamples(n_resamples)
    rng = np.random.default_rng(seed)
    draws, excluded = {}, {}
    for concept, arm in sorted(by_concept(arms).items()):
        if arm.near_chance:
            excluded[concept] = NEAR_CHANCE.format("qa")
            continue
        draws[concept] = worst_case_draws(arm, question_rows(len(arm.base), n_resamples, rng))
    return combine(draws, excluded, {})


def paired_worst_case(arms_a: Sequence[AttackedArm], arms_b: Sequence[AttackedArm], n_resamples: int = 2000,
                      seed: int = 0) -> Difference:
    """A's worst case minus B's on their shared concepts, the same question draws in both."""
    check_resamples(n_resamples)
    a_by, b_by = by_concept(arms_a), by_concept(arms_b)
    rng = np.random.default_rng(seed)
    draws, excluded = {}, {c: "attacked for one method only" for c in sorted(set(a_by) ^ set(b_by))}
    for concept in sorted(set(a_by) & set(b_by)):
        a, b = a_by[concept], b_by[concept]
        if len(a.base) != len(b.base):
            raise ObliviateError(f"{a.method} and {b.method} on {concept!r} were attacked on different TEST questions.")
        if a.near_chance:
            excluded[concept] = NEAR_CHANCE.format("qa")
            continue
        rows = question_rows(len(a.base), n_resamples, rng)
        draws[concept] = worst_case_draws(a, rows) - worst_case_draws(b, rows)
    pooled = combine(draws, excluded, {})
    significant = bool(pooled.included) and pooled.interval.excludes(0.0)
    return Difference(pooled, significant, MDE_STANDARD_ERRORS * pooled.standard_error)
