"""Learning the corruption strength sigma by zeroth-order optimisation (ECO, section 3).

The objective S(sigma) is accuracy on a surrogate forget set (the concept's TRAIN
questions) with every prompt corrupted; it is piecewise constant in sigma, so there is
no gradient, only central differences:

    g = (S(s + eps) - S(s - eps)) / (2 eps),   s <- max(s - lr * g, s_min)

Reference defaults: s0 = 0.1, eps = 0.999 * s, lr = 100, 10 steps, stop once S is near
chance. Two choices of ours, both documented in the trace: eps follows the current s
(eps = eps_ratio * s; a fixed 0.0999 means nothing at s = 50), and when the difference
is zero or positive, s is multiplied by ``flat_growth`` instead of standing still or
shrinking. Zero: S is flat around s, far below the transition. Positive: more noise
seemed to help, which on a multiple-choice accuracy above chance is sampling noise (50
questions move by 0.02 a question); the reference step would then drive s to its minimum
and stay there (measured on Gun: s 0.1 -> 0.001, oscillating, S never fell).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from obliviate.errors import ObliviateError


@dataclass(frozen=True)
class ZerothOrderConfig:
    s0: float = 0.1
    eps_ratio: float = 0.999  # eps = eps_ratio * s, so s - eps stays positive
    lr: float = 100.0
    steps: int = 10
    s_min: float = 1e-3
    chance: float = 0.25  # four options
    tolerance: float = 0.05  # "near chance": S <= chance + tolerance stops the search
    flat_growth: float = 10.0

    def __post_init__(self) -> None:
        if self.s0 <= 0 or self.lr <= 0 or self.s_min <= 0:
            raise ObliviateError("s0, lr and s_min of the sigma search must be positive.")
        if not 0 < self.eps_ratio < 1:
            raise ObliviateError(f"eps_ratio must be in (0, 1) so that s - eps > 0, got {self.eps_ratio}.")
        if self.steps < 0:
            raise ObliviateError(f"steps must be >= 0, got {self.steps}.")


@dataclass
class SigmaTrace:
    sigma: float
    objective: float
    stopped: str  # "near_chance" | "steps"
    steps: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def zeroth_order_step(objective: Callable[[float], float], s: float, config: ZerothOrderConfig) -> tuple[float, dict]:
    """One central-difference step; returns the new s and what was measured."""
    eps = config.eps_ratio * s
    up, down = objective(s + eps), objective(s - eps)
    gradient = (up - down) / (2 * eps)
    new = s * config.flat_growth if gradient >= 0 else max(s - config.lr * gradient, config.s_min)
    return new, {"sigma": s, "eps": eps, "s_plus": up, "s_minus": down, "gradient": gradient, "next": new}


def learn_sigma(objective: Callable[[float], float], config: ZerothOrderConfig = ZerothOrderConfig(),
                progress: Callable[[str], None] | None = None) -> SigmaTrace:
    """Minimise S(sigma) from s0 until S is near chance or the steps run out.

    ``objective`` is evaluated at most 3 times per step (values are cached per sigma).
    """
    cache: dict[float, float] = {}

    def measured(s: float) -> float:
        if s not in cache:
            cache[s] = float(objective(s))
        return cache[s]

    s, steps = config.s0, []
    for _ in range(config.steps):
        value = measured(s)
        if value <= config.chance + config.tolerance:
            return SigmaTrace(s, value, "near_chance", steps)
        s, record = zeroth_order_step(measured, s, config)
        record["objective"] = value
        steps.append(record)
        if progress:
            progress(f"sigma {record['sigma']:.4g}: S={value:.3f} g={record['gradient']:.4g} -> {s:.4g}")
    value = measured(s)
    return SigmaTrace(s, value, "near_chance" if value <= config.chance + config.tolerance else "steps", steps)
