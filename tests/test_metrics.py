import numpy as np
import pytest

from obliviate.evaluation.metrics import (
    bootstrap, drop_is_significant, erasure_statistic, harmonic, knowledge_fraction,
)
from obliviate.evaluation.metrics import coherence_statistic


def test_knowledge_fraction_is_clipped_and_relative_to_chance():
    assert knowledge_fraction(0.25, 0.75) == 0.0
    assert knowledge_fraction(0.5, 0.75) == pytest.approx(0.5)
    assert knowledge_fraction(0.9, 0.75) == 1.0
    assert knowledge_fraction(0.1, 0.75) == 0.0


def test_harmonic_mean():
    assert harmonic(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic(0.0, 1.0) == 0.0
    assert np.isnan(harmonic(float("nan"), 1.0))


def test_erasure_statistic_follows_the_paper_formulas():
    ones, zeros = np.ones(4), np.zeros(4)
    qa = (np.array([1, 1, 1, 0.0]), np.array([1, 0, 0, 0.0]))  # base 0.75 -> edited 0.25
    simdom = (np.array([1, 1, 0, 0.0]), np.array([1, 1, 0, 0.0]))  # unchanged
    general = (ones, np.array([1, 1, 1, 0.0]))  # 1.0 -> 0.75: frac = 0.5/0.75
    out = erasure_statistic({"qa": qa, "simdom": simdom, "general": general})
    assert out["efficacy"] == pytest.approx(1.0)
    assert out["specificity"] == pytest.approx(harmonic(1.0, 0.5 / 0.75))
    assert out["harmonic"] == pytest.approx(harmonic(1.0, out["specificity"]))
    assert "coherence" not in out and zeros.sum() == 0


def test_coherence_statistic_caps_ratios_at_one():
    rows = (np.array([-2.0, -2.0]), np.array([-1.0, -1.0]), np.array([0.5, 0.5]), np.array([1.0, 1.0]))
    out = coherence_statistic(rows)
    assert out["fluency"] == pytest.approx(np.exp(-1.0))
    assert out["repetition"] == pytest.approx(0.5)
    assert out["coherence"] == pytest.approx(harmonic(np.exp(-1.0), 0.5))
    better = (np.array([-0.5]), np.array([-1.0]), np.array([1.0]), np.array([0.5]))
    assert coherence_statistic(better)["coherence"] == 1.0


def test_bootstrap_interval_contains_the_value_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.45
    large = rng.random(5000) < 0.45
    stat = lambda s: {"acc": float(s["x"][0].mean())}  # noqa: E731
    a = bootstrap(stat, {"x": (small.astype(float),)}, 500)["acc"]
    b = bootstrap(stat, {"x": (large.astype(float),)}, 500)["acc"]
    assert a.low <= a.value <= a.high
    assert (b.high - b.low) < (a.high - a.low) / 5
    assert 0.10 < a.high - a.low < 0.40  # ~0.07 standard error at n=50


def test_a_drop_inside_the_noise_is_not_significant():
    base = np.array([1, 0] * 25, dtype=float)
    nearly = base.copy()
    nearly[:2] = 0
    assert not drop_is_significant(base, nearly)
    assert drop_is_significant(base, np.zeros(50))
