"""The pooled worst case over an attack battery: known values, pairing, exclusions."""
from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import knowledge_fraction
from obliviate.evaluation.robustness import AttackedArm, attacked_arm, paired_worst_case, pooled_worst_case
from obliviate.evaluation.results import RunResults


def _arm(concept: str, base: list[int], attacked: dict[str, list[int]], method: str = "ember") -> AttackedArm:
    return AttackedArm(concept, method, np.asarray(base, float), {k: np.asarray(v, float) for k, v in attacked.items()}, {})


BASE = [1] * 16 + [0] * 4  # 0.80
LOW = [1] * 8 + [0] * 12  # 0.40
HIGH = [1] * 14 + [0] * 6  # 0.70


def test_point_value_is_the_mean_over_concepts_of_the_max_over_attacks():
    arms = [_arm("a", BASE, {"x": LOW, "y": HIGH}), _arm("b", BASE, {"x": HIGH, "y": LOW})]
    pooled = pooled_worst_case(arms, n_resamples=200, seed=0)
    expected = knowledge_fraction(0.70, 0.80)
    assert pooled.interval.value == pytest.approx(expected)
    assert pooled.interval.low <= expected <= pooled.interval.high and pooled.included == ("a", "b")


def test_a_near_chance_concept_is_left_out():
    chance_base = [1] * 5 + [0] * 15  # 0.25: nothing to erase
    pooled = pooled_worst_case([_arm("a", BASE, {"x": LOW}), _arm("b", chance_base, {"x": LOW})], 100)
    assert pooled.included == ("a",) and "chance" in pooled.excluded["b"]


def test_paired_difference_of_an_arm_with_itself_is_zero_and_a_stronger_attack_is_seen():
    a = [_arm("a", BASE, {"x": LOW}), _arm("b", BASE, {"x": LOW})]
    same = paired_worst_case(a, a, n_resamples=200)
    assert same.pooled.interval.value == 0 and same.pooled.interval.low == 0 == same.pooled.interval.high
    assert not same.significant
    weaker = [_arm("a", BASE, {"x": BASE}, "other"), _arm("b", BASE, {"x": BASE}, "other")]
    diff = paired_worst_case(a, weaker, n_resamples=500)
    assert diff.pooled.interval.value == pytest.approx(knowledge_fraction(0.40, 0.80) - 1.0)
    assert diff.significant and diff.pooled.interval.high < 0


def test_arm_from_an_attack_run_reads_every_kind_of_attack():
    results = {
        "kind": "attack", "concept": "Gambling", "method": "ember",
        "attacks": ["relearn", "respell", "probe", "gcg"],
        "relearn": {"original": {"curve_correct": [BASE, LOW]}, "erased": {"curve_correct": [LOW, HIGH]},
                    "recovered_frac": {"value": 0.5}},
        "respell": {"original": {"correct_before": BASE}, "erased": {"correct_after": LOW}, "recovered_frac": {"value": 0.1}},
        "probe": {"original": {}, "erased": {}},
        "gcg": {"original": {"correct_before": BASE[:17]}, "erased": {"correct_after": LOW[:17], "held_out_questions": []},
                "recovered_frac": {"value": 0.2}},
    }
    arm = attacked_arm(RunResults.from_dict(results))
    assert set(arm.attacked) == {"relearn", "respell"} and list(arm.left_out) == ["gcg"]
    assert np.array_equal(arm.base, np.asarray(BASE, float)) and np.array_equal(arm.attacked["relearn"], HIGH)
    with pytest.raises(ObliviateError, match="not an attack run"):
        attacked_arm(RunResults.from_dict({"kind": "erase"}))


def _attack_results(concept: str, method: str, after: list[int]) -> dict:
    return {"kind": "attack", "concept": concept, "method": method, "attacks": ["respell", "quantize"],
            "respell": {"original": {"correct_before": BASE}, "erased": {"correct_after": after},
                        "recovered_frac": {"value": 0.0}},
            "quantize": {"original": {"correct_before": BASE}, "erased": {"correct_after": LOW},
                         "recovered_frac": {"value": 0.0}}}


def test_summarize_pools_attack_runs_into_a_worst_case_per_method(tmp_path):
    import json

    from obliviate.cli import main

    runs = []
    for concept, method, after in (("Golf", "ember", HIGH), ("Gun", "ember", LOW), ("Golf", "rmu", BASE), ("Gun", "rmu", BASE)):
        folder = tmp_path / f"{method}-{concept}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(_attack_results(concept, method, after)))
        runs.append(str(folder))
    assert main(["summarize", *runs, "--baseline-method", "rmu", "--n-resamples", "200", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary_pooled.json").read_text())
    ember = summary["worst_case"]["ember"]
    expected = (knowledge_fraction(0.70, 0.80) + knowledge_fraction(0.40, 0.80)) / 2
    assert ember["value"] == pytest.approx(expected) and ember["attacks"] == ["quantize", "respell"]
    assert summary["worst_case"]["rmu"]["value"] == 1.0
    (diff,) = summary["worst_case_differences"]
    assert (diff["a"], diff["b"]) == ("ember", "rmu") and diff["value"] == pytest.approx(expected - 1.0)
    assert "worst case over the attack battery" in (tmp_path / "summary_pooled.md").read_text()
