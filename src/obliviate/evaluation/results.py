"""The results every command returns and every report reads, and the metric names, once.

A run's results are a ``RunResults``: who was measured (concept, method, model, seed),
the TEST split's metrics as 95% intervals (``SplitResults``), and the command's own parts
(grids, attacks, timings, ...). ``to_dict`` gives results.json; ``from_dict`` reads it
back, so a report reads the files of older runs and of every command the same way.
Adding a metric: compute it in metrics.py (or the evaluator) and describe it in METRICS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import CHANCE, QUESTION_SETS, Interval, near_chance
from obliviate.io import read_json


@dataclass(frozen=True)
class Metric:
    label: str  # what a reader sees
    higher_is_better: bool = True
    meaning: str = ""


# The headline metrics, in the order reports show them (all in [0, 1]).
METRICS: dict[str, Metric] = {
    "efficacy": Metric("efficacy", meaning="share of the original's above-chance QA knowledge removed"),
    "specificity": Metric("specificity", meaning="harmonic mean of similar-domain and general knowledge kept"),
    "coherence": Metric("coherence (general prompts)", meaning="continuations on general prompts as good as the original's"),
    "concept_fluency": Metric("fluency on concept text (diagnostic)", meaning="coherence on the concept's own prompts"),
    "harmonic": Metric("harmonic(efficacy, specificity)"),
    "score": Metric("score", meaning="harmonic(efficacy, specificity, coherence): EMBER's selection score"),
}
HEADLINE = tuple(METRICS)


def nothing_applied(results: Mapping[str, Any]) -> bool:
    """No edit was applied: EMBER chose strength 0 and no base method's grid point was chosen
    (none passed the gates, or the concept is at chance on the base model), so the "erased"
    model is its base."""
    return not results.get("delta") and not results.get("params")


def set_key(name: str) -> str:
    """results.json key of a question set's test accuracies ("qa" -> "qa_test")."""
    return f"{name}_test"


def chance_text(levels: Mapping[str, float]) -> str:
    """"0.25" where every set has one chance level (or none is known), else each set's."""
    distinct = sorted({round(level, 4) for level in levels.values()})
    if len(distinct) <= 1:
        return f"{distinct[0] if distinct else CHANCE:.3g}"
    return ", ".join(f"{name} {level:.3g}" for name, level in levels.items())


@dataclass(frozen=True)
class SplitResults:
    """One split's metrics: name -> 95% interval (headline metrics, ``{set}_base``,
    ``{set}_edited``, ``{set}_frac``, drops, ...) and the sets whose original accuracy is
    within noise of chance."""

    metrics: Mapping[str, Interval]
    near_chance: Mapping[str, bool] = field(default_factory=dict)
    rest: Mapping[str, Any] = field(default_factory=dict)  # rescored counts, coverage

    def get(self, name: str) -> Interval | None:
        return self.metrics.get(name)

    def question_sets(self) -> dict[str, dict[str, Interval]]:
        """{set: {"base": Interval, "edited": Interval}} for the sets that were measured."""
        return {name: {"base": self.metrics[f"{name}_base"], "edited": self.metrics[f"{name}_edited"]}
                for name in QUESTION_SETS if f"{name}_base" in self.metrics}

    def to_dict(self) -> dict:
        summary = {"metrics": {name: interval.as_dict() for name, interval in self.metrics.items()}, **self.rest,
                   "near_chance": dict(self.near_chance)}
        for name, pair in self.question_sets().items():
            summary[set_key(name)] = {role: interval.as_dict() for role, interval in pair.items()}
        return summary

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "SplitResults":
        metrics = {name: Interval(**value) for name, value in payload.get("metrics", {}).items()}
        rest = {k: v for k, v in payload.items()
                if k not in ("metrics", "near_chance") and not k.endswith("_test")}
        return cls(metrics, dict(payload.get("near_chance", {})), rest)


@dataclass(frozen=True)
class RunResults:
    """What a command measured. ``parts`` holds the command's own sections (the grids and
    edit details of `erase`, the attacks of `attack`, ...), written as they are."""

    kind: str  # erase | eval | attack | eco
    concept: str
    method: str
    model: str
    seed: int
    test: SplitResults | None = None
    parts: Mapping[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> Interval | None:
        return self.test.get(name) if self.test is not None else None

    @property
    def near_chance(self) -> dict[str, bool]:
        """The question sets whose original TEST accuracy is within noise of chance, as the
        evaluation flagged them."""
        flags = self.test.near_chance if self.test is not None and self.test.near_chance else \
            self.parts.get("near_chance", {})
        return {name: bool(flag) for name, flag in flags.items()}

    def chance_levels(self) -> dict[str, float]:
        """Each TEST question set's chance level (mean of 1 / options) as the run recorded it;
        a run that recorded none was measured against ``CHANCE`` (four options)."""
        recorded = self.test.rest.get("chance") if self.test is not None else None
        if isinstance(recorded, Mapping) and recorded:
            return {name: float(level) for name, level in recorded.items()}
        measured = set(self.test.question_sets()) if self.test is not None else set()
        measured |= set(self.parts.get("per_question", {}))
        return {name: CHANCE for name in QUESTION_SETS if name in measured}

    def question_count(self, name: str = "qa") -> int | None:
        """How many TEST questions of a set the run's accuracies are over, where it tells:
        its per-question rows, the relearning attack's per-question curve (QA), or its
        coverage; None where it does not."""
        rows = self.parts.get("per_question", {}).get(name, {}).get("base_correct")
        if rows:
            return len(rows)
        curve = self.parts.get("relearn", {}).get("original", {}).get("curve_correct") if name == "qa" else None
        if curve:
            return len(curve[0])
        total = self.parts.get("coverage", {}).get(name, {}).get("total")
        return int(total) if total else None

    def original_near_chance(self, accuracy: float, name: str = "qa") -> bool:
        """The original model's TEST ``accuracy`` on a set is within noise of chance, by
        ``metrics.near_chance`` (the rule the evaluation flags sets with) over the run's
        ``question_count`` and ``chance_levels``; where the run does not say over how many
        questions, the flag the evaluation recorded."""
        n = self.question_count(name)
        if n is None:
            return self.near_chance.get(name, False)
        return near_chance(accuracy, n, self.chance_levels().get(name, CHANCE))

    @classmethod
    def read(cls, path: str | Path) -> "RunResults":
        """A results.json file, typed; a file that is not one is refused with its path."""
        try:
            payload = read_json(Path(path))
        except (OSError, ValueError) as err:
            raise ObliviateError(f"{path} is not a readable results.json ({err}).") from None
        if not isinstance(payload, Mapping):
            raise ObliviateError(f"{path} is not a results.json (it holds {type(payload).__name__}).")
        return cls.from_dict(payload)

    def to_dict(self) -> dict:
        """results.json: the header, the headline metrics and question sets at the top level
        (what people and scripts look up), the whole test split, then the command's parts."""
        payload: dict[str, Any] = {"kind": self.kind, "concept": self.concept, "method": self.method,
                                   "model": self.model, "seed": self.seed}
        if self.test is not None:
            test = self.test.to_dict()
            payload.update({set_key(name): test[set_key(name)] for name in self.test.question_sets()})
            payload.update({name: self.test.metrics[name].as_dict() for name in HEADLINE if name in self.test.metrics})
            payload["test"] = test
        payload.update(self.parts)
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "RunResults":
        header = ("kind", "concept", "method", "model", "seed", "test")
        derived = set(HEADLINE) | {set_key(name) for name in QUESTION_SETS}
        test = payload.get("test")
        return cls(
            kind=payload.get("kind", "erase"), concept=payload.get("concept", ""), method=payload.get("method", ""),
            model=payload.get("model", ""), seed=payload.get("seed", 0),
            test=SplitResults.from_dict(test) if isinstance(test, Mapping) and test else None,
            parts={k: v for k, v in payload.items() if k not in header and k not in derived},
        )
