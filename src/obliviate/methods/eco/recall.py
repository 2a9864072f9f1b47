"""Flag rates with 95% intervals: the classifier's recall on TEST questions, plain and in
prompt forms, and its false-positive rate on held-out negatives.

A unit is what varies independently: a question (its plain prompt, or its wrapped forms,
move together) or a negative source. The rate is the mean over units of each unit's
flagged share, and its interval a percentile bootstrap over units (forms of one question
are not independent draws, so a Wilson interval over texts would be too narrow).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from obliviate.evaluation.metrics import bootstrap

RESAMPLES = 1000


def _mean_rate(samples) -> dict[str, float]:
    return {"rate": float(samples["units"][0].mean())}


def rate_interval(units: Sequence[np.ndarray], seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Point value, 95% interval, units and texts of the flagged share; ``units[i]`` holds
    unit i's flags (one or more texts)."""
    if not units:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "texts": 0}
    shares = np.array([np.asarray(u, dtype=float).mean() for u in units])
    interval = bootstrap(_mean_rate, {"units": (shares,)}, resamples, seed)["rate"]
    return {**interval.as_dict(), "n": len(shares), "texts": int(sum(np.size(u) for u in units))}


def split_units(flags: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Consecutive runs of ``flags``, one per unit of the given sizes."""
    return np.split(np.asarray(flags), np.cumsum(sizes)[:-1]) if len(sizes) else []


def describe(interval: dict) -> str:
    return f"{interval['value']:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"
