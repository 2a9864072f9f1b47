"""Erasure metrics (METHOD.md section 4) with bootstrap intervals.

base = the original model's accuracy on the same questions, chance = the mean of
1 / options over the set's questions (0.25 when every question has four):
  frac = clip((acc - chance) / (base - chance), 0, 1); efficacy = 1 - qa_frac;
  specificity = harmonic(simdom_frac, general_frac); harmonic = harmonic(efficacy, specificity).
With 50 questions a split an accuracy near 0.45 has a standard error near 0.07, so every
number carries a 95% bootstrap interval: questions are resampled with the base and edited
answers paired, and every derived metric is recomputed on each resample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Literal, Mapping

import numpy as np

CHANCE = 0.25  # four options (the benchmark's): the chance level where the option counts are unknown


def chance_level(option_counts: Iterable[int]) -> float:
    """Chance accuracy of a question set: the mean of 1 / options over its questions
    (exactly 0.25 for four options each); ``CHANCE`` for a set without questions."""
    counts = np.asarray(list(option_counts), dtype=float)
    if not len(counts):
        return CHANCE
    if (counts < 2).any():
        raise ValueError(f"a multiple-choice question needs at least 2 options, got {int(counts.min())}")
    return float(np.mean(1.0 / counts))


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def excludes(self, x: float) -> bool:
        return not (self.low <= x <= self.high)


GateOn = Literal["value", "low"]


def below_gate(entry: Interval | Mapping[str, float] | None, gate: float, on: GateOn = "value") -> bool:
    """Whether a measured metric fails a gate: its point value (``on="value"``) or the low end
    of its 95% interval (``on="low"``) is below ``gate``. An entry in dict form (a saved grid)
    is read the same way; a metric not measured never fails."""
    if entry is None:
        return False
    point = entry if isinstance(entry, Mapping) else entry.as_dict()
    return point[on] < gate


def harmonic(*values: float) -> float:
    if any(np.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def knowledge_fraction(acc: float, base: float, chance: float = CHANCE) -> float:
    """How much of the original above-chance knowledge remains, in [0, 1]."""
    return float(np.clip((acc - chance) / max(base - chance, 1e-6), 0.0, 1.0))


# A sample is a tuple of arrays sharing their first axis (one row per question or prompt).
Samples = Mapping[str, tuple[np.ndarray, ...]]
Statistic = Callable[[Samples], dict[str, float]]


def bootstrap(statistic: Statistic, samples: Samples, n_resamples: int = 1000, seed: int = 0) -> dict[str, Interval]:
    """Point values and percentile 95% intervals of every entry ``statistic`` returns."""
    point = statistic(samples)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(n_resamples):
        resampled = {}
        for name, arrays in samples.items():
            rows = rng.integers(0, len(arrays[0]), len(arrays[0]))
            resampled[name] = tuple(a[rows] for a in arrays)
        for name, value in statistic(resampled).items():
            draws[name].append(value)
    out = {}
    for name, value in point.items():
        values = np.array(draws[name], dtype=float)
        values = values[~np.isnan(values)]
        low, high = (np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan))
        out[name] = Interval(float(value), float(low), float(high))
    return out


QUESTION_SETS = ("qa", "simdom", "general")


def accuracy_pair(base_correct: np.ndarray, edited_correct: np.ndarray,
                  base_prob: np.ndarray | None = None, edited_prob: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """One question set's paired rows: correctness, and (optionally) the normalized
    probability of the correct option, for the original and the edited model."""
    rows = (np.asarray(base_correct, dtype=float), np.asarray(edited_correct, dtype=float))
    if base_prob is not None and edited_prob is not None:
        rows += (np.asarray(base_prob, dtype=float), np.asarray(edited_prob, dtype=float))
    return rows


def wilson_low(correct: np.ndarray, z: float = 1.96) -> float:
    """Lower end of the Wilson 95% interval of an accuracy (closed form, stable at small n)."""
    n = len(correct)
    return _wilson_low(float(np.mean(correct)), n, z) if n else float("nan")


def _wilson_low(p: float, n: int, z: float = 1.96) -> float:
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - spread) / (1 + z * z / n))


def mean_low(values: np.ndarray, z: float = 1.96) -> float:
    """Lower end of the normal 95% interval of a mean (of the correct option's probability:
    a continuous measure beside the accuracy over the same questions)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("-inf")
    return float(values.mean() - z * values.std(ddof=1) / np.sqrt(len(values)))


def near_chance(accuracy: float, n: int, chance: float = CHANCE) -> bool:
    """THE rule for "the original model's accuracy is within noise of chance": the 95%
    Wilson interval of ``accuracy`` over ``n`` questions reaches ``chance`` (a set's
    ``chance_level``). Such a set's fraction divides by noise: it may not veto or win a
    selection, and its efficacy, specificity or regained share is not informative.
    Never true without questions (n = 0)."""
    return n > 0 and _wilson_low(float(accuracy), n) <= chance


def near_chance_sets(samples: Samples, chance: Mapping[str, float] | None = None) -> frozenset[str]:
    """The question sets where no measure shows the ORIGINAL knows the answers: its accuracy
    (``samples[set][0]``) is ``near_chance`` and, where the rows carry the correct option's
    probability (``samples[set][2]``), ``probability_near_chance`` too.
    ``chance``: each set's chance level (``CHANCE`` where not given)."""
    chance = chance or {}
    return frozenset(name for name in _accuracy_near_chance(samples, chance)
                     if len(samples[name]) < 3 or probability_near_chance(samples[name][2], chance.get(name, CHANCE)))


def probability_near_chance(probability: np.ndarray, chance: float = CHANCE) -> bool:
    """The mean probability of the correct option shows no knowledge: its 95% interval starts
    below chance plus one question's worth (1 / n). The floor: a model that knows nothing
    gives nearly equal probabilities, whose narrow interval would call a negligible lead
    significant; a lead below one question cannot change a single answer on average."""
    return mean_low(probability) <= chance + 1.0 / max(len(probability), 1)


def probability_sets(samples: Samples, chance: Mapping[str, float] | None = None) -> frozenset[str]:
    """The question sets whose original accuracy is within noise of chance while the correct
    option's probability is not: their knowledge fraction is measured on that probability
    (50 answers can miss what 50 probabilities show)."""
    return _accuracy_near_chance(samples, chance or {}) - near_chance_sets(samples, chance)


def _accuracy_near_chance(samples: Samples, chance: Mapping[str, float]) -> frozenset[str]:
    original = {name: samples[name][0] for name in QUESTION_SETS if name in samples and len(samples[name][0])}
    return frozenset(name for name, correct in original.items()
                     if near_chance(float(np.mean(correct)), len(correct), chance.get(name, CHANCE)))


def erasure_statistic(samples: Samples, near_chance: frozenset[str] = frozenset(),
                      chance: Mapping[str, float] | None = None,
                      by_probability: frozenset[str] = frozenset()) -> dict[str, float]:
    """Accuracies and derived metrics from paired question rows (and prompt rows).

    Expected samples: "qa", "simdom", "general" -> ``accuracy_pair`` rows; optional
    "coherence" (general prompts) and "concept_fluency" (the concept's own prompts) ->
    rows for ``coherence_statistic``. Sets that are absent give no metrics rather than
    invented ones. Specificity leaves out the sets in ``near_chance`` (unless all are).
    ``chance``: each set's chance level (``chance_level`` of its option counts; ``CHANCE``
    where not given). The sets in ``by_probability`` (``probability_sets``) take their
    knowledge fraction, and so efficacy or specificity, from the correct option's probability.
    """
    chance = chance or {}
    out: dict[str, float] = {}
    fracs = {}
    for name in QUESTION_SETS:
        if name in samples and len(samples[name][0]):
            out.update(_set_statistic(name, samples[name], chance.get(name, CHANCE), name in by_probability))
            fracs[name] = out[f"{name}_frac"]
    if "qa" in fracs:
        out["efficacy"] = 1.0 - fracs["qa"]
    specific = [k for k in ("simdom", "general") if k in fracs]
    informative = [k for k in specific if k not in near_chance] or specific
    if informative:
        out["specificity"] = harmonic(*[fracs[k] for k in informative])
    if "efficacy" in out and "specificity" in out:
        out["harmonic"] = harmonic(out["efficacy"], out["specificity"])
    if "coherence" in samples:
        out.update(coherence_statistic(samples["coherence"]))
        if "harmonic" in out:
            out["score"] = harmonic(out["efficacy"], out["specificity"], out["coherence"])
    if "concept_fluency" in samples:
        out["concept_fluency"] = coherence_statistic(samples["concept_fluency"])["coherence"]
    return out


def _set_statistic(name: str, rows: tuple[np.ndarray, ...], chance: float = CHANCE,
                   by_probability: bool = False) -> dict[str, float]:
    base, edited = rows[0].mean(), rows[1].mean()
    out = {f"{name}_base": float(base), f"{name}_edited": float(edited), f"{name}_drop": float(base - edited),
           f"{name}_frac": knowledge_fraction(edited, base, chance)}
    if len(rows) == 4:
        prob_base, prob_edited = float(rows[2].mean()), float(rows[3].mean())
        out[f"{name}_prob_base"], out[f"{name}_prob_edited"] = prob_base, prob_edited
        out[f"{name}_prob_drop"] = prob_base - prob_edited
        out[f"{name}_prob_frac"] = knowledge_fraction(prob_edited, prob_base, chance)
        if by_probability:
            out[f"{name}_frac"] = out[f"{name}_prob_frac"]
    return out


def coherence_statistic(rows: tuple[np.ndarray, ...]) -> dict[str, float]:
    edited_ll, original_ll, edited_distinct, original_distinct = rows
    fluency = float(min(1.0, np.exp(edited_ll.mean() - original_ll.mean())))
    repetition = float(min(1.0, edited_distinct.mean() / max(original_distinct.mean(), 1e-9)))
    return {"fluency": fluency, "repetition": repetition, "coherence": harmonic(fluency, repetition)}


def erasure_metrics(samples: Samples, n_resamples: int = 1000, seed: int = 0,
                    near_chance: frozenset[str] = frozenset(),
                    chance: Mapping[str, float] | None = None,
                    by_probability: frozenset[str] = frozenset()) -> dict[str, Interval]:
    return bootstrap(lambda s: erasure_statistic(s, near_chance, chance, by_probability), samples, n_resamples, seed)

