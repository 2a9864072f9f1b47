import numpy as np
import pytest
import torch

from dataclasses import replace

from obliviate.config import EvalConfig
from obliviate.edits.embedding import EmbeddingPatch
from obliviate.evaluation.evaluator import Evaluator
from obliviate.evaluation.metrics import (
    CHANCE, bootstrap, chance_level, erasure_metrics, erasure_statistic, harmonic, knowledge_fraction, near_chance,
    mean_low, near_chance_sets, probability_sets,
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
    assert (out["qa_base"], out["qa_edited"], out["qa_drop"], out["qa_frac"]) == pytest.approx((0.75, 0.25, 0.5, 0.0))
    assert (out["simdom_base"], out["simdom_edited"], out["simdom_frac"]) == pytest.approx((0.5, 0.5, 1.0))
    assert (out["general_base"], out["general_edited"], out["general_frac"]) == pytest.approx((1.0, 0.75, 0.5 / 0.75))
    assert "coherence" not in out and "score" not in out and "qa_prob_base" not in out
    # absent sets give no metrics: no invented specificity from an empty one
    only_qa = erasure_statistic({"qa": qa, "simdom": (zeros[:0], zeros[:0])})
    assert "specificity" not in only_qa and "simdom_base" not in only_qa and only_qa["efficacy"] == pytest.approx(1.0)


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


# ---- chance follows the questions' option counts ---------------------------------------

def test_chance_is_the_mean_of_one_over_the_options():
    assert chance_level([4] * 50) == 0.25 == CHANCE  # exactly: four-option numbers do not move
    assert chance_level([3] * 7) == pytest.approx(1 / 3)
    assert chance_level([5] * 9) == pytest.approx(0.2)
    assert chance_level(iter([2, 4])) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert chance_level([]) == CHANCE
    with pytest.raises(ValueError, match="at least 2 options"):
        chance_level([4, 1])


BASE = np.array([1.0] * 9 + [0.0])  # 0.9
EDITED = np.array([1.0] * 5 + [0.0] * 5)  # 0.5


@pytest.mark.parametrize("options", [3, 5])
def test_fractions_of_three_and_five_option_sets_use_their_chance(options):
    chance = chance_level([options] * len(BASE))
    samples = {"qa": (BASE, EDITED), "simdom": (BASE, BASE), "general": (BASE, EDITED)}
    out = erasure_statistic(samples, chance={name: chance for name in samples})
    kept = (0.5 - chance) / (0.9 - chance)  # 3 options: 0.294; 5: 0.429
    assert out["qa_frac"] == pytest.approx(kept) and out["general_frac"] == pytest.approx(kept)
    assert out["efficacy"] == pytest.approx(1 - kept)
    assert out["specificity"] == pytest.approx(harmonic(1.0, kept))
    four = erasure_statistic(samples)  # what a fixed 0.25 gave: 0.385, wrong for these sets
    assert four["qa_frac"] == pytest.approx(0.25 / 0.65) and four["qa_frac"] != pytest.approx(kept)
    assert out["qa_base"] == four["qa_base"] == pytest.approx(0.9)  # accuracies do not depend on chance


def test_four_option_results_are_unchanged_by_the_chance_levels():
    rng = np.random.default_rng(3)
    samples = {name: (rng.random(40) < 0.7, rng.random(40) < 0.5, rng.random(40), rng.random(40))
               for name in ("qa", "simdom", "general")}
    samples = {name: tuple(np.asarray(a, dtype=float) for a in rows) for name, rows in samples.items()}
    levels = {name: chance_level([4] * 40) for name in samples}
    plain = erasure_metrics(samples, 50, 0, near_chance_sets(samples))
    levelled = erasure_metrics(samples, 50, 0, near_chance_sets(samples, levels), levels)
    assert {k: v.as_dict() for k, v in plain.items()} == {k: v.as_dict() for k, v in levelled.items()}


def test_the_near_chance_rule_uses_the_sets_chance():
    # 0.40 over 50 questions: its 95% Wilson interval starts at 0.276
    assert near_chance(0.40, 50, chance_level([3] * 50))
    assert not near_chance(0.40, 50, chance_level([4] * 50)) and not near_chance(0.40, 50, chance_level([5] * 50))
    assert near_chance(0.30, 50) and not near_chance(0.5, 50)  # CHANCE by default
    assert not near_chance(0.0, 0)  # no questions: nothing to call near chance
    forty = np.array([1.0] * 20 + [0.0] * 30)
    samples = {"qa": (forty, forty), "simdom": (forty, forty), "general": (forty, forty)}
    assert near_chance_sets(samples, {"qa": 1 / 3, "simdom": 0.25, "general": 0.2}) == frozenset({"qa"})
    assert near_chance_sets(samples) == frozenset()


def _with_options(questions, options: int):
    """The same questions with ``options`` options each (wrong options cut or added; the
    answer kept)."""
    out = []
    for q in questions:
        wrong = [o for i, o in enumerate(q.options) if i != q.answer]
        wrong = (wrong + [f"none of the others ({k})" for k in range(options)])[: options - 1]
        out.append(replace(q, options=(q.options[q.answer], *wrong), answer=0))
    return out


@pytest.mark.parametrize("options", [3, 4, 5])
def test_the_evaluator_measures_each_set_against_its_own_chance(tiny_lm, small_concept, options):
    small_concept.questions = {k: _with_options(v, options) for k, v in small_concept.questions.items()}
    small_concept.general = {k: _with_options(v, options) for k, v in small_concept.general.items()}
    weight = tiny_lm.model.get_input_embeddings().weight
    tokens = torch.arange(5, 400)
    rows = weight[tokens].detach().clone()
    edit = EmbeddingPatch(token_ids=tokens, original_rows=rows, metadata={},
                          edited_rows=rows + 3 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)))
    outcome = Evaluator(tiny_lm, small_concept, EvalConfig(scoring="loglik", coherence_new_tokens=0, bootstrap=20,
                                                           cache=False), seed=0).evaluate("test", edit)
    chance = 1 / options
    assert outcome.chance == pytest.approx({"qa": chance, "simdom": chance, "general": chance})
    assert outcome.results().to_dict()["chance"] == outcome.chance
    for name, rows in outcome.correct.items():
        by_probability = name in outcome.by_probability  # at chance by accuracy, not by probability
        base, edited = (float(rows[2].mean()), float(rows[3].mean())) if by_probability else \
            (float(rows[0].mean()), float(rows[1].mean()))
        assert outcome.metrics[f"{name}_frac"].value == pytest.approx(knowledge_fraction(edited, base, chance))
        at_chance = near_chance(float(rows[0].mean()), len(rows[0]), chance)
        assert (name in outcome.near_chance or by_probability) == at_chance
        assert not (name in outcome.near_chance and by_probability)
    if options == 4:  # the benchmark's: the same numbers as a fixed 0.25
        samples = dict(outcome.correct)
        plain = erasure_metrics(samples, 20, 0, near_chance_sets(samples), None, probability_sets(samples))
        assert {k: v.as_dict() for k, v in plain.items()} == {k: v.as_dict() for k, v in outcome.metrics.items()}


def test_mean_low_is_the_normal_interval_of_a_mean():
    values = np.r_[np.full(25, 0.3), np.full(25, 0.5)]  # mean 0.4, sd 0.1010 (ddof 1)
    assert mean_low(values) == pytest.approx(0.4 - 1.96 * values.std(ddof=1) / np.sqrt(50))
    assert mean_low(np.array([0.5])) == float("-inf")  # one value: no interval


def test_a_set_at_chance_by_accuracy_only_is_judged_on_the_probability():
    rng = np.random.default_rng(0)
    thirty = np.r_[np.ones(15), np.zeros(35)]  # 0.30 of 50: the Wilson interval reaches 0.25
    confident = np.clip(rng.normal(0.45, 0.05, 50), 0, 1)  # the correct option's probability, far above 0.25
    halved = np.clip(rng.normal(0.35, 0.05, 50), 0, 1)
    samples = {"qa": (thirty, thirty, confident, halved)}
    assert near_chance_sets(samples) == frozenset() and probability_sets(samples) == frozenset({"qa"})
    out = erasure_statistic(samples, near_chance_sets(samples), None, probability_sets(samples))
    expected = (halved.mean() - 0.25) / (confident.mean() - 0.25)  # the probability's knowledge fraction
    assert out["qa_frac"] == pytest.approx(expected) and out["efficacy"] == pytest.approx(1 - expected)
    assert erasure_statistic(samples)["qa_frac"] == 1.0  # on accuracy: 0.30 -> 0.30, all kept
    flat = {"qa": (thirty, thirty, np.clip(rng.normal(0.25, 0.05, 50), 0, 1), halved)}  # no measure shows knowledge
    assert near_chance_sets(flat) == frozenset({"qa"}) and probability_sets(flat) == frozenset()
    # a model that knows nothing: nearly equal probabilities, a negligible lead with a narrow interval
    uniform = np.full(50, 0.2502) + rng.normal(0, 1e-5, 50)
    assert near_chance_sets({"qa": (thirty, thirty, uniform, uniform)}) == frozenset({"qa"})
    assert near_chance_sets({"qa": (thirty, thirty)}) == frozenset({"qa"})  # without probabilities: accuracy
