"""`obliviate summarize` (and compare's Pooled section) on synthetic results.json files whose
pooled numbers are computed by hand below."""
from __future__ import annotations

import json
import math

import pytest

from obliviate.cli import main
from obliviate.io import write_json
from obliviate.evaluation.results import RunResults

BASE = [1.0, 1.0, 1.0, 1.0]  # the original knows every test question: frac = (acc - 0.25) / 0.75
QA_EDITED = {  # (method, concept) -> edited qa answers; efficacy = 1 - clip((acc - 0.25) / 0.75, 0, 1)
    ("rmu", "Golf"): [1, 1, 0, 0],  # acc 0.5: efficacy 2/3, drop 0.5
    ("rmu", "Gun"): [1, 0, 0, 0],  # acc 0.25: efficacy 1, drop 0.75
    ("rmu", "Tea"): [1, 1, 1, 1],  # near chance: out of efficacy; drop 0
    ("rmu+ember", "Golf"): [0, 0, 0, 0],
    ("rmu+ember", "Gun"): [0, 0, 0, 0],
    ("ember", "Golf"): [1, 0, 0, 0],
    ("ember", "Gun"): [1, 0, 0, 0],
}


def question_set(edited) -> dict:
    return {"base_correct": BASE, "edited_correct": edited, "base_prob": BASE, "edited_prob": edited}


def results(method: str, concept: str) -> dict:
    # rmu's text is half as likely as the original's (fluency 0.5, repetition 1: coherence 2/3)
    edited_ll = -2.0 - (math.log(2) if method == "rmu" else 0.0)
    prompts = {"edited_ll": [edited_ll] * 3, "original_ll": [-2.0] * 3,
               "edited_distinct": [0.8] * 3, "original_distinct": [0.8] * 3}
    return {"concept": concept, "method": method,
            "per_question": {"qa": question_set(QA_EDITED[method, concept]), "simdom": question_set(BASE),
                             "general": question_set(BASE)},
            "per_prompt": {"general": prompts, "concept": prompts},
            "near_chance": {"qa": concept == "Tea", "simdom": False, "general": False}}


def write_runs(root) -> list[str]:
    folders = []
    for method, concept in QA_EDITED:
        folder = root / f"{concept}-{method}"
        write_json(folder / "results.json", results(method, concept))
        folders.append(str(folder))
    return folders


def test_pooled_numbers_by_hand(tmp_path):
    out = tmp_path / "summary"
    assert main(["summarize", *write_runs(tmp_path / "runs"), "--out", str(out), "--n-resamples", "200"]) == 0
    summary = json.loads((out / "summary_pooled.json").read_text())
    rmu = summary["methods"]["rmu"]["metrics"]
    assert rmu["efficacy"]["value"] == pytest.approx((2 / 3 + 1) / 2)
    assert rmu["efficacy"]["included"] == ["Golf", "Gun"] and "chance" in rmu["efficacy"]["excluded"]["Tea"]
    assert rmu["drop_qa"]["value"] == pytest.approx((0.5 + 0.75 + 0) / 3)
    coherence = rmu["coherence"]
    assert [coherence[k] for k in ("value", "low", "high")] == pytest.approx([2 / 3] * 3)
    assert coherence["n_concepts"] == 3 and coherence["excluded"] == {}
    assert rmu["concept_fluency"]["value"] == pytest.approx(2 / 3)
    assert rmu["specificity"]["value"] == 1.0
    diffs = {(d["a"], d["b"]): d["metrics"] for d in summary["differences"]}
    assert set(diffs) == {("rmu+ember", "rmu"), ("ember", "original")}
    ember_gain = diffs["rmu+ember", "rmu"]["efficacy"]
    assert ember_gain["value"] == pytest.approx(1 - (2 / 3 + 1) / 2) and ember_gain["excluded"] == {"Tea": "only in rmu runs"}
    assert ember_gain["minimum_detectable"] == pytest.approx(2.8 * ember_gain["standard_error"])
    ember_alone = diffs["ember", "original"]
    assert ember_alone["efficacy"]["value"] == 1.0 and ember_alone["efficacy"]["significant"]
    assert ember_alone["specificity"]["value"] == 0.0 and not ember_alone["specificity"]["significant"]
    assert ember_alone["regained"]["value"] is None  # no concept has a relearning curve: no number, not NaN
    assert "### rmu+ember minus rmu (paired)" in (out / "summary_pooled.md").read_text()
    assert summary["chance"] == 0.25 and "; chance = 0.25." in (out / "summary_pooled.md").read_text()


def test_the_summary_states_the_runs_chance_levels():
    from obliviate.commands.summarize import summarize
    from obliviate.evaluation.pooled import arm_from_results

    def arm(concept: str, chance: dict | None) -> object:
        found = results("rmu", concept)
        return arm_from_results(RunResults.from_dict({**found, "test": {"chance": chance}} if chance else found))

    three = {"qa": 1 / 3, "simdom": 1 / 3, "general": 1 / 3}
    assert summarize([arm("Golf", three), arm("Gun", three)], n_resamples=10)["chance"] == pytest.approx(1 / 3)
    mixed = summarize([arm("Golf", three), arm("Gun", None)], n_resamples=10)
    assert mixed["chance"] == ("Golf/qa 0.333, Golf/simdom 0.333, Golf/general 0.333, Gun/qa 0.25, Gun/simdom 0.25, "
                               "Gun/general 0.25")
    # Golf's efficacy against 1/3: acc 0.5 of base 1.0 keeps (0.5 - 1/3) / (2/3) = 1/4
    assert mixed["methods"]["rmu"]["metrics"]["efficacy"]["value"] == pytest.approx((0.75 + 1.0) / 2)


def test_baseline_method_adds_comparisons(tmp_path):
    runs = write_runs(tmp_path / "runs")
    assert main(["summarize", *runs, "--baseline-method", "ember", "--n-resamples", "20"]) == 0
    summary = json.loads((tmp_path / "runs" / "summary_pooled.json").read_text())  # default: the runs' folder
    pairs = {(d["a"], d["b"]) for d in summary["differences"]}
    assert {("rmu", "ember"), ("rmu+ember", "ember"), ("rmu+ember", "rmu")} <= pairs


def test_a_compare_folder_is_walked(tmp_path):
    for method in ("rmu", "rmu+ember"):
        for concept in ("Golf", "Gun"):
            write_json(tmp_path / "cmp" / concept / method / "results.json", results(method, concept))
    # each cell's relearning attack sits beside its results: (0.5 - 0.25) / 0.75 regained
    # where it attacked this erase; a file naming another erase is not read
    attack = {"erased": {"curve_correct": [[0.0] * 4, [1.0, 1.0, 0.0, 0.0]]}}
    write_json(tmp_path / "cmp" / "Golf" / "rmu" / "relearn.json", attack)
    write_json(tmp_path / "cmp" / "Gun" / "rmu" / "relearn.json", {**attack, "erase_fingerprint": "another"})
    assert main(["summarize", str(tmp_path / "cmp"), "--n-resamples", "20"]) == 0
    summary = json.loads((tmp_path / "cmp" / "summary_pooled.json").read_text())
    assert summary["methods"]["rmu+ember"]["concepts"] == ["Golf", "Gun"]
    regained = summary["methods"]["rmu"]["metrics"]["regained"]
    assert regained["value"] == pytest.approx(1 / 3) and regained["included"] == ["Golf"]


def written(root) -> list:
    return list(root.rglob("summary_pooled.*"))


def test_a_folder_without_results_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    runs = write_runs(tmp_path / "runs")
    assert main(["summarize", *runs, str(tmp_path / "empty")]) == 2
    assert "empty holds no results.json" in capsys.readouterr().err
    assert written(tmp_path) == []


def test_old_results_without_per_question_exit_2(tmp_path, capsys):
    old = tmp_path / "old-run"
    write_json(old / "results.json", {"concept": "Golf", "method": "rmu", "efficacy": {"value": 0.5}})
    assert main(["summarize", *write_runs(tmp_path / "runs"), str(old)]) == 2
    err = capsys.readouterr().err
    assert "old-run" in err and "rerun" in err
    assert written(tmp_path) == []


def test_compare_writes_a_pooled_section(tmp_path, monkeypatch, data_dir):
    from obliviate.attacks import relearning
    from obliviate.pipeline import cells

    class Fake:
        def __init__(self, config, progress=True):
            method = config.method + ("+ember" if config.with_ember else "")
            self.results = {**results(method, config.concept), "efficacy": {"value": 0.5}, "params": {"lr": 1e-4},
                            "qa_test": {"base": {"value": 1.0}, "edited": {"value": 0.5}}}
            self.lm = object()

    monkeypatch.setattr(cells, "erase", Fake)
    curve_correct = [[0.0] * 4, [1.0, 1.0, 0.0, 0.0]]  # regained (0.5 - 0.25) / 0.75 after relearning
    curve = [{"value": v, "low": v, "high": v} for v in (0.0, 0.5)]
    monkeypatch.setattr(relearning, "run", lambda ctx, config: {"erased": {"curve": curve, "curve_correct": curve_correct}})
    code = main(["compare", "--methods", "rmu", "--concepts", "Golf,Gun", "--with-and-without-ember",
                 "--data", str(data_dir), "--out", str(tmp_path)])
    assert code == 0
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert pooled["methods"]["rmu"]["metrics"]["regained"]["value"] == pytest.approx(1 / 3)
    assert [(d["a"], d["b"]) for d in pooled["differences"]] == [("rmu+ember", "rmu")]
    assert "## Pooled" in (tmp_path / "compare.md").read_text()
