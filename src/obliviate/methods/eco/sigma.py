"""Learning the corruption strength sigma by zeroth-order optimisation (ECO, section 3).

The objective S(sigma) is accuracy on a surrogate forget set (the concept's TRAIN
questions) with every prompt corrupted; it is piecewise constant in sigma, so there is
no gradient, only central differences:

    g = (S(s + eps) - S(s - eps)) / (2 eps),   s <- max(s - lr * g, s_min)  (reference)

Reference defaults: s0 = 0.1, eps = 0.999 * s, lr = 100, 10 steps, stop once S is near
chance (S <= chance + tolerance, one evaluation: ``stop_rule="touch"``).

Our choices, each recorded in the trace:
- eps follows the current s (eps = eps_ratio * s; a fixed 0.0999 means nothing at s = 50).
- When the difference is zero or positive, s is multiplied by ``flat_growth`` instead of
  standing still or shrinking. Zero: S is flat around s, far below the transition.
  Positive: more noise seemed to help, which on an accuracy above chance is sampling
  noise (50 questions move by 0.02 a question); the reference step would drive s to its
  minimum and stay there (measured on Gun: s 0.1 -> 0.001, oscillating, S never fell).
  When the difference is negative, s grows at least ``min_growth``-fold: with eps ~ s
  the difference spans [~0, 2s], so the reference step lr * g shrinks like 1/s, and on
  the plateau above the transition it crawled (Gambling: 40.14 -> 40.44 -> 40.74 while a
  touch of chance was not confirmed). s never exceeds ``s_max`` (the reference's
  multiple-choice sigma, 1e6).
- Robust stop (``stop_rule="confirmed"``, default). One evaluation of 50 questions is a
  noisy number: on a held-out concept the search stopped at a single touch of 0.22 while
  the corrupted accuracy was far above chance (the test accuracy did not fall). A touch
  of chance + tolerance only triggers a confirmation: ``confirm_draws`` more
  evaluations at the same s with fresh corruption noise (other seeds), and the search
  stops only when the 95% Wilson upper bound of the pooled accuracy (every draw's
  answers, 3 x 50 rows by default) is at or below chance + ``bound_tolerance`` (0.12:
  a pooled accuracy up to about 0.28 passes, a lucky 0.22 beside two draws at 0.40 does
  not). Otherwise it goes on from s as if S had not touched. The bound covers the
  corruption noise and the size of the question set; other questions of the concept are
  what the TEST split measures.
- Base near chance. When the uncorrupted accuracy is itself within noise of chance (its
  95% Wilson lower bound at or below chance, the evaluation's rule for a set whose
  fraction is noise), S cannot say how strong the corruption must be, and the reference
  stops at s0 with nothing corrupted. The search is skipped, the trace says
  "base_near_chance", and sigma is the caller's ``near_chance_sigma`` (fitting.py: a
  multiple of the prompt embeddings' size, a strength that removed the prompt on the
  concepts the model knows).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import wilson_low

STOP_RULES = ("confirmed", "touch")

# (sigma, draw) -> per-question correctness (0/1) with every prompt corrupted at sigma;
# draw 0 is the corruption noise the artifact keeps, other draws are fresh noise.
Objective = Callable[[float, int], np.ndarray]


@dataclass(frozen=True)
class ZerothOrderConfig:
    s0: float = 0.1
    eps_ratio: float = 0.999  # eps = eps_ratio * s, so s - eps stays positive
    lr: float = 100.0
    steps: int = 10
    s_max: float = 1e6  # the reference's multiple-choice sigma: no token survives it
    chance: float = 0.25  # four options
    tolerance: float = 0.05  # "near chance": S <= chance + tolerance (the reference's stop; ours: a trigger)
    flat_growth: float = 10.0
    min_growth: float = 2.0  # a step that lowers S grows s at least this much
    stop_rule: str = "confirmed"  # "touch": the reference's single evaluation
    confirm_draws: int = 2  # fresh-noise evaluations that confirm a touch
    bound_tolerance: float = 0.12  # stop when the pooled 95% upper bound <= chance + this

    def __post_init__(self) -> None:
        if self.s0 <= 0 or self.lr <= 0 or self.s_max < self.s0 or self.min_growth < 1:
            raise ObliviateError("s0 and lr of the sigma search must be positive, s_max >= s0 and min_growth >= 1.")
        if not 0 < self.eps_ratio < 1:
            raise ObliviateError(f"eps_ratio must be in (0, 1) so that s - eps > 0, got {self.eps_ratio}.")
        if self.steps < 0:
            raise ObliviateError(f"steps must be >= 0, got {self.steps}.")
        if self.stop_rule not in STOP_RULES:
            raise ObliviateError(f"the sigma stop rule must be one of {', '.join(STOP_RULES)}, got {self.stop_rule!r}.")
        if self.confirm_draws < 1 or not 0 < self.bound_tolerance < 1:
            raise ObliviateError(f"confirm_draws must be >= 1 and bound_tolerance in (0, 1), got "
                                 f"{self.confirm_draws}, {self.bound_tolerance}.")


@dataclass
class SigmaTrace:
    sigma: float
    objective: float
    stopped: str  # "near_chance" | "steps" | "base_near_chance" | "not learned: ..."
    steps: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def upper_bound(correct: np.ndarray) -> float:
    """Upper end of the Wilson 95% interval of an accuracy (the lower end of its complement's)."""
    return 1.0 - wilson_low(1.0 - np.asarray(correct, dtype=float))


def base_near_chance(correct: np.ndarray, chance: float) -> bool:
    """The uncorrupted accuracy is within noise of chance: nothing measurable to remove."""
    return wilson_low(np.asarray(correct, dtype=float)) <= chance


class _Measured:
    """The objective, each (sigma, draw) evaluated once."""

    def __init__(self, objective: Objective) -> None:
        self.objective, self.cache = objective, {}

    def __call__(self, s: float, draw: int = 0) -> np.ndarray:
        if (s, draw) not in self.cache:
            self.cache[(s, draw)] = np.asarray(self.objective(s, draw), dtype=float)
        return self.cache[(s, draw)]

    def mean(self, s: float) -> float:
        return float(self(s).mean())


def zeroth_order_step(objective: Callable[[float], float], s: float, config: ZerothOrderConfig) -> tuple[float, dict]:
    """One central-difference step on a scalar objective; returns the new s and what was measured."""
    eps = config.eps_ratio * s
    up, down = objective(s + eps), objective(s - eps)
    gradient = (up - down) / (2 * eps)
    new = s * config.flat_growth if gradient >= 0 else max(s - config.lr * gradient, s * config.min_growth)
    new = min(new, config.s_max)
    return new, {"sigma": s, "eps": eps, "s_plus": up, "s_minus": down, "gradient": gradient, "next": new}


def near_chance_at(measured: _Measured, s: float, config: ZerothOrderConfig) -> tuple[bool, dict]:
    """Whether the search may stop at s, and the evidence (empty when S did not even touch)."""
    first = measured(s)
    if first.mean() > config.chance + config.tolerance:
        return False, {}
    if config.stop_rule == "touch":
        return True, {"rule": "touch", "objective": float(first.mean())}
    draws = [first] + [measured(s, draw) for draw in range(1, config.confirm_draws + 1)]
    pooled = np.concatenate(draws)
    high = upper_bound(pooled)
    return high <= config.chance + config.bound_tolerance, {
        "rule": "confirmed", "sigma": s, "draws": [float(d.mean()) for d in draws],
        "pooled": float(pooled.mean()), "upper95": high, "limit": config.chance + config.bound_tolerance}


def learn_sigma(objective: Objective, config: ZerothOrderConfig = ZerothOrderConfig(),
                progress: Callable[[str], None] | None = None, near_chance_sigma: float | None = None) -> SigmaTrace:
    """Minimise S(sigma) from s0 until S is near chance (by ``config.stop_rule``) or the
    steps run out; skip the search when the uncorrupted accuracy is already near chance.

    ``objective(sigma, draw)`` returns per-question correctness; each (sigma, draw) is
    evaluated once. ``near_chance_sigma`` is the sigma to use for a near-chance base
    (default ``s_max``).
    """
    measured = _Measured(objective)
    base = measured(0.0)
    steps: list[dict] = [{"sigma": 0.0, "objective": float(base.mean()), "note": "no corruption"}]
    if base_near_chance(base, config.chance):
        sigma = config.s_max if near_chance_sigma is None else float(near_chance_sigma)
        steps[0]["note"] += f"; base within noise of chance (95% Wilson lower bound {wilson_low(base):.3f})"
        return SigmaTrace(sigma, float("nan"), "base_near_chance", steps)
    s = config.s0
    for _ in range(config.steps):
        stop, evidence = near_chance_at(measured, s, config)
        if evidence:
            steps.append({"check": evidence})
        if stop:
            return SigmaTrace(s, measured.mean(s), "near_chance", steps)
        value = measured.mean(s)
        s, record = zeroth_order_step(measured.mean, s, config)
        record["objective"] = value
        steps.append(record)
        if progress:
            progress(f"sigma {record['sigma']:.4g}: S={value:.3f} g={record['gradient']:.4g} -> {s:.4g}")
    stop, evidence = near_chance_at(measured, s, config)
    if evidence:
        steps.append({"check": evidence})
    return SigmaTrace(s, measured.mean(s), "near_chance" if stop else "steps", steps)
