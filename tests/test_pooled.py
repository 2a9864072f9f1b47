"""Pooled, paired statistics (obliviate.evaluation.pooled) on synthetic arrays with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import coherence_statistic, erasure_statistic
from obliviate.evaluation.pooled import (
    Arm, arm_from_results, concept_draws, draw_indices, paired_difference, pooled_metrics, resampled_means,
)
from obliviate.evaluation.results import RunResults


def question_set(base, edited, base_prob=None, edited_prob=None) -> dict[str, np.ndarray]:
    base, edited = np.asarray(base, float), np.asarray(edited, float)
    return {"base_correct": base, "edited_correct": edited,
            "base_prob": base if base_prob is None else np.asarray(base_prob, float),
            "edited_prob": edited if edited_prob is None else np.asarray(edited_prob, float)}


def random_arm(concept: str, seed: int, method: str = "rmu", n: int = 40, near_chance=None) -> Arm:
    rng = np.random.default_rng(seed)
    bern = lambda p: (rng.random(n) < p).astype(float)  # noqa: E731
    questions = {"qa": question_set(bern(0.8), bern(0.4)), "simdom": question_set(bern(0.8), bern(0.6)),
                 "general": question_set(bern(0.7), bern(0.65))}
    prompts = {"general": {"edited_ll": rng.normal(-2.1, 0.3, n), "original_ll": rng.normal(-2.0, 0.3, n),
                           "edited_distinct": rng.uniform(0.6, 0.9, n), "original_distinct": rng.uniform(0.7, 0.9, n)}}
    return Arm(concept, method, questions, prompts, near_chance or {})


def test_identical_arms_differ_by_exactly_zero():
    arms = [random_arm("Golf", 1), random_arm("Gun", 2)]
    diffs = paired_difference(arms, arms, n_resamples=200)
    measured = {"efficacy", "specificity", "coherence", *(f"{kind}_{s}" for kind in ("drop", "prob_drop")
                                                            for s in ("qa", "simdom", "general"))}
    assert set(diffs) == measured | {"concept_fluency", "regained", "relearned_qa"}
    for name in measured:  # every metric the arms have, over both concepts: exactly 0
        diff = diffs[name]
        assert diff.pooled.included == ("Golf", "Gun") and not diff.pooled.excluded, name
        assert (diff.pooled.interval.value, diff.pooled.interval.low, diff.pooled.interval.high) == (0, 0, 0), name
        assert not diff.significant and diff.minimum_detectable == 0 and diff.pooled.standard_error == 0, name
    # the metrics they have no data for: no concept, each left out with its reason, no number
    reasons = {"concept_fluency": "no concept prompts", "regained": "no per-question relearning curve",
               "relearned_qa": "no per-question relearning curve"}
    for name, why in reasons.items():
        diff = diffs[name]
        assert diff.pooled.included == () and diff.pooled.excluded == {"Golf": why, "Gun": why}, name
        assert np.isnan(diff.pooled.interval.value) and not diff.significant, name


@pytest.mark.parametrize("chance, expected", [(None, 0.25), ({"qa": 1 / 3, "simdom": 0.2}, None)])
def test_pooled_fractions_use_the_chance_the_run_recorded(chance, expected):
    base, edited = [1.0] * 9 + [0.0], [1.0] * 5 + [0.0] * 5  # 0.9 -> 0.5
    per_question = {name: {k: list(v) for k, v in question_set(base, edited).items()} for name in ("qa", "simdom")}
    results = {"concept": "Golf", "method": "rmu", "per_question": per_question}
    if chance is not None:
        results["test"] = {"chance": chance}
    arm = arm_from_results(RunResults.from_dict(results))
    levels = chance or {"qa": expected, "simdom": expected}
    assert {name: arm.chance_of(name) for name in ("qa", "simdom")} == pytest.approx(levels)
    pooled = pooled_metrics([arm], n_resamples=20)
    kept = {name: (0.5 - level) / (0.9 - level) for name, level in levels.items()}
    assert pooled["efficacy"].interval.value == pytest.approx(1 - kept["qa"])
    assert pooled["specificity"].interval.value == pytest.approx(kept["simdom"])  # the only specificity set
    assert pooled["drop_qa"].interval.value == pytest.approx(0.4)  # accuracies do not depend on chance


def test_one_concept_gives_the_plain_metric():
    arm = random_arm("Golf", 3)
    pooled = pooled_metrics([arm], n_resamples=50)
    plain = erasure_statistic({k: (v["base_correct"], v["edited_correct"]) for k, v in arm.questions.items()})
    for name in ("efficacy", "specificity"):
        assert pooled[name].interval.value == pytest.approx(plain[name])
    rows = tuple(arm.prompts["general"][k] for k in ("edited_ll", "original_ll", "edited_distinct", "original_distinct"))
    assert pooled["coherence"].interval.value == pytest.approx(coherence_statistic(rows)["coherence"])


def test_constant_arrays_give_a_point_interval():
    # qa: every question right before, wrong after; probabilities 0.9 -> 0.4 in every question
    arm = Arm("Golf", "rmu", {"qa": question_set(np.ones(8), np.zeros(8), np.full(8, 0.9), np.full(8, 0.4))})
    pooled = pooled_metrics([arm], n_resamples=100)
    assert pooled["efficacy"].interval.as_dict() == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert pooled["drop_qa"].interval.as_dict() == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert pooled["prob_drop_qa"].interval.as_dict() == pytest.approx({"value": 0.5, "low": 0.5, "high": 0.5})


def test_pooled_value_is_the_mean_of_the_concepts():
    a, b = random_arm("Golf", 4), random_arm("Gun", 5)
    both, alone_a, alone_b = (pooled_metrics(arms, n_resamples=20) for arms in ([a, b], [a], [b]))
    for name in ("efficacy", "specificity", "coherence", "drop_general", "prob_drop_simdom"):
        expected = (alone_a[name].interval.value + alone_b[name].interval.value) / 2
        assert both[name].interval.value == pytest.approx(expected)
        assert both[name].included == ("Golf", "Gun")


def test_the_bootstrap_never_mixes_concepts():
    knows = Arm("Golf", "rmu", {"qa": question_set(np.ones(30), np.ones(30))})
    forgot = Arm("Gun", "rmu", {"qa": question_set(np.ones(30), np.zeros(30))})
    rng = np.random.default_rng(0)
    for arm, accuracy in ((knows, 1.0), (forgot, 0.0)):
        means = resampled_means(arm, draw_indices(arm, 300, rng))
        assert np.all(means["qa/edited_correct"] == accuracy)
    # mixing questions across concepts would move the pooled drop away from (0 + 1) / 2
    assert pooled_metrics([knows, forgot], n_resamples=300)["drop_qa"].interval.as_dict() == \
        {"value": 0.5, "low": 0.5, "high": 0.5}


def test_pairing_narrows_the_interval_of_correlated_arms():
    rng = np.random.default_rng(6)
    arms_a, arms_b = [], []
    for concept in ("Golf", "Gun", "Tea"):
        base, edited_a = np.ones(200), (rng.random(200) < 0.5).astype(float)
        flip = rng.random(200) < 0.1  # arm B answers like arm A on 90% of the questions
        edited_b = np.where(flip, 1 - edited_a, edited_a)
        arms_a.append(Arm(concept, "a", {"qa": question_set(base, edited_a)}))
        arms_b.append(Arm(concept, "b", {"qa": question_set(base, edited_b)}))
    paired = paired_difference(arms_a, arms_b, n_resamples=500)["drop_qa"].pooled.interval
    width = lambda i: i.high - i.low  # noqa: E731
    a, b = (pooled_metrics(arms, n_resamples=500, seed=s)["drop_qa"].interval for arms, s in ((arms_a, 1), (arms_b, 2)))
    unpaired_width = np.hypot(width(a), width(b))  # independent arms: variances add
    assert width(paired) < 0.6 * unpaired_width


def test_near_chance_concepts_are_left_out_and_reported():
    clear, noisy = random_arm("Golf", 7), random_arm("Gun", 8, near_chance={"qa": True, "simdom": True})
    pooled = pooled_metrics([clear, noisy], n_resamples=20)
    assert pooled["efficacy"].included == ("Golf",) and "chance" in pooled["efficacy"].excluded["Gun"]
    assert pooled["efficacy"].interval.value == pooled_metrics([clear], n_resamples=20)["efficacy"].interval.value
    # Gun's specificity is its general-knowledge fraction alone, and the output says so
    general = noisy.questions["general"]
    gun_fraction = min(1.0, max(0.0, (general["edited_correct"].mean() - 0.25) / (general["base_correct"].mean() - 0.25)))
    golf = pooled_metrics([clear], n_resamples=20)["specificity"].interval.value
    assert pooled["specificity"].interval.value == pytest.approx((golf + gun_fraction) / 2)
    assert "simdom" in pooled["specificity"].adjusted["Gun"] and pooled["specificity"].as_dict()["adjusted"]
    both = random_arm("Tea", 9, near_chance={"simdom": True, "general": True})
    assert "Tea" in pooled_metrics([both], n_resamples=20)["specificity"].excluded


def test_determinism_under_the_seed():
    arms = [random_arm("Golf", 10), random_arm("Gun", 11)]
    first, again = (pooled_metrics(arms, n_resamples=100, seed=3)["efficacy"].interval for _ in range(2))
    other = pooled_metrics(arms, n_resamples=100, seed=4)["efficacy"].interval
    assert first == again and first != other


def test_minimum_detectable_difference_is_2_8_standard_errors():
    n, p = 2000, 0.3
    edited = (np.random.default_rng(12).random(n) < p).astype(float)
    arm = Arm("Golf", "ember", {"qa": question_set(np.ones(n), edited)})
    diff = paired_difference([arm], None, n_resamples=1000)["drop_qa"]  # ember minus the original
    mean = edited.mean()
    assert diff.pooled.standard_error == pytest.approx(np.sqrt(mean * (1 - mean) / n), rel=0.1)
    assert diff.minimum_detectable == pytest.approx(2.8 * diff.pooled.standard_error)
    assert diff.significant and diff.pooled.interval.value == pytest.approx(1 - mean)


def test_minus_nothing_is_the_arms_own_interval():
    arms = [random_arm("Golf", 13, method="ember"), random_arm("Gun", 14, method="ember")]
    own = pooled_metrics(arms, n_resamples=200, seed=5)
    diff = paired_difference(arms, None, n_resamples=200, seed=5)
    assert diff["efficacy"].pooled.interval == own["efficacy"].interval  # the original's efficacy is 0
    spec, own_spec = diff["specificity"].pooled.interval, own["specificity"].interval  # and its specificity 1
    assert (spec.value, spec.low, spec.high) == pytest.approx((own_spec.value - 1, own_spec.low - 1, own_spec.high - 1))


def test_regained_fraction_uses_the_last_relearning_epoch():
    base, edited, relearned = [1.0] * 20, [0.0] * 20, [1.0] * 10 + [0.0] * 10
    qa = {"base_correct": base, "edited_correct": edited, "base_prob": base, "edited_prob": edited}
    arm = arm_from_results(RunResults.from_dict({"concept": "Golf", "method": "rmu", "per_question": {"qa": qa},
                                                 "relearn": {"erased": {"curve_correct": [edited, relearned]}}}))
    draws = concept_draws(arm, draw_indices(arm, 10, np.random.default_rng(0)))
    assert draws["regained"][0] == pytest.approx((0.5 - 0.25) / (1 - 0.25))
    assert draws["relearned_qa"][0] == pytest.approx(0.5)  # test QA after the attack, as measured
    unattacked = pooled_metrics([Arm("Golf", "rmu", arm.questions)], n_resamples=10)
    for metric in ("regained", "relearned_qa"):
        assert unattacked[metric].excluded == {"Golf": "no per-question relearning curve"}


def test_results_without_per_question_are_refused():
    with pytest.raises(ObliviateError, match="rerun"):
        arm_from_results(RunResults.from_dict({"concept": "Golf", "method": "rmu", "efficacy": {"value": 0.5}}),
                         where="runs/golf")
