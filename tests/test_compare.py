"""`obliviate compare`: the plan of cells, bad input, and the table it writes (the
erase runs and the relearning attack are replaced by fakes: they are tested elsewhere)."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from obliviate.cli import main
from obliviate.commands import compare
from obliviate.errors import ObliviateError


def test_plan_covers_every_cell():
    cells = compare.plan("rmu,npo", "Golf,Gun", True)
    assert len(cells) == 8 and ("Gun", "npo", True) in cells and ("Golf", "rmu", False) in cells
    assert compare.plan("ember", "Golf", True) == [("Golf", "ember", False)]
    assert compare.plan("rmu", "all", False, ["Golf", "Gun"]) == [("Golf", "rmu", False), ("Gun", "rmu", False)]


def test_unknown_or_unresolvable_concepts_fail_before_any_run(capsys, tmp_path, data_dir):
    with pytest.raises(ObliviateError, match="needs a benchmark folder"):
        compare.plan("rmu", "all", False)
    assert compare.plan("rmu", "golf,GUN", False, ["Golf", "Gun"]) == [("Golf", "rmu", False), ("Gun", "rmu", False)]
    assert main(["compare", "--methods", "rmu", "--concepts", "Golf,Golff", "--data", str(data_dir),
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "'Golff'" in err and "Gambling" in err and not (tmp_path / "c").exists()


def test_unknown_method_exit_2(capsys):
    assert main(["compare", "--methods", "rmu,sgd", "--concepts", "Golf"]) == 2
    err = capsys.readouterr().err
    assert "Unknown method 'sgd'" in err and "grad_diff" in err and "rmu" in err


def test_one_set_syntax_for_methods_and_attacks():
    from obliviate.commands.arguments import parse_settings

    with pytest.raises(ObliviateError, match="NAME.KEY=VALUE"):
        parse_settings(["steps=3"])  # no owner: compare runs several methods
    with pytest.raises(ObliviateError, match="NAME.KEY=VALUE"):
        parse_settings(["rmu.steps"])
    assert parse_settings(["rmu.steps=3", "rmu.lr=1e-4"]) == {"rmu": {"steps": "3", "lr": "1e-4"}}
    assert parse_settings(["lr=1e-4", "npo.beta=0.2"], default_owner="rmu") == {"rmu": {"lr": "1e-4"}, "npo": {"beta": "0.2"}}
    assert parse_settings(["relearn.weight-decay=0"]) == {"relearn": {"weight_decay": "0"}}


def test_table_rows_from_fake_runs(tmp_path, monkeypatch, data_dir):
    from obliviate.attacks import relearning
    from obliviate.pipeline import cells

    calls = []

    from obliviate.evaluation.metrics import Interval
    from obliviate.evaluation.results import RunResults, SplitResults

    class Fake:  # results.json as erase writes it
        def __init__(self, config):
            eff = 0.8 if config.with_ember else 0.5
            metrics = {name: Interval(v, v, v) for name, v in (("efficacy", eff), ("specificity", 0.9), ("coherence", 1.0),
                                                               ("harmonic", 0.6), ("qa_base", 0.7), ("qa_edited", 0.3))}
            self.results = RunResults("erase", config.concept, config.method, "tiny", 42, SplitResults(metrics),
                                      {"delta": 5.0 if config.with_ember else None, "params": {"lr": 1e-4}}).to_dict()
            self.lm = object()

    def fake_erase(config, progress=True):
        calls.append((config.concept, config.method, config.with_ember, config.methods, config.ember.k))
        return Fake(config)

    monkeypatch.setattr(cells, "erase", fake_erase)
    curve = [{"value": v, "low": v, "high": v} for v in (0.3, 0.5, 0.6)]
    monkeypatch.setattr(relearning, "run", lambda ctx, config: {"erased": {"curve": curve}, "settings": asdict(config)})
    code = main(["compare", "--methods", "rmu", "--concepts", "Golf,Gun", "--with-and-without-ember",
                 "--data", str(data_dir), "--out", str(tmp_path), "--set", "rmu.steps=2", "--set", "npo.lr=1e-3",
                 "--set", "ember.k=50"])
    assert code == 0
    assert [c[:3] for c in calls] == [("Golf", "rmu", False), ("Golf", "rmu", True), ("Gun", "rmu", False), ("Gun", "rmu", True)]
    # a cell runs with its own method's settings (and EMBER's when EMBER runs first): another
    # method's setting must not change its fingerprint
    assert calls[0][3:] == ({"rmu": {"steps": "2"}}, 100) and calls[1][3:] == ({"rmu": {"steps": "2"}}, 50)
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert len(rows) == 4 and rows[1]["ember"] == "True" and float(rows[1]["efficacy"]) == 0.8
    assert float(rows[0]["qa_after_relearn_epoch_2"]) == 0.6 and "qa_after_relearn_epoch_1" in rows[0]
    assert float(rows[0]["relearn_regained"]) == pytest.approx((0.6 - 0.25) / (0.7 - 0.25))
    times = list(csv.DictReader(open(tmp_path / "times.csv")))
    assert [t["cell"] for t in times] == ["Golf/rmu", "Golf/rmu+ember", "Gun/rmu", "Gun/rmu+ember"]
    assert all(t["erase_seconds"] and t["relearn_seconds"] for t in times) and "erase" not in rows[0]
    assert (tmp_path / "compare.md").read_text().count("\n") == 6
    assert "Golf" in (tmp_path / "report.html").read_text()


def test_the_regained_share_uses_the_runs_chance_and_the_one_near_chance_rule():
    from obliviate.commands.compare import cell_row
    from obliviate.evaluation.results import RunResults

    curve = [{"value": v} for v in (0.3, 0.5, 0.6)]

    def results(base: float, chance: float | None = None, n: int = 50) -> RunResults:
        point = lambda v: {"value": v, "low": v, "high": v}  # noqa: E731
        test = {"metrics": {"qa_base": point(base), "qa_edited": point(0.3)}}
        if chance is not None:
            test["chance"] = {"qa": chance}
        return RunResults.from_dict({"concept": "Golf", "method": "rmu", "test": test,
                                     "relearn": {"erased": {"curve": curve}},
                                     "per_question": {"qa": {"base_correct": [1.0] * n}}})

    row = lambda r: cell_row("Golf", "rmu", False, r)  # noqa: E731
    assert row(results(0.7))["qa_test_base"] == 0.7 and row(results(0.7))["qa_test_edited"] == 0.3
    assert row(results(0.7))["relearn_regained"] == pytest.approx((0.6 - 0.25) / (0.7 - 0.25))  # four options
    assert row(results(0.7, 1 / 3))["relearn_regained"] == pytest.approx((0.6 - 1 / 3) / (0.7 - 1 / 3))
    assert row(results(0.7, 0.2))["relearn_regained"] == pytest.approx((0.6 - 0.2) / (0.7 - 0.2))
    # within noise of chance over its questions: nothing to regain (base > 0.25 was the cut before)
    assert "relearn_regained" not in row(results(0.36))
    assert "relearn_regained" not in row(results(0.45, 1 / 3))
    assert row(results(0.45, 1 / 3, n=400))["relearn_regained"] == 1.0  # 0.6 > 0.45: all of it, clipped


def _fake_parts(monkeypatch, tmp_path, params: dict, near_chance: bool = False):
    """run_cell with the erase run and the attack replaced by counting fakes (both are tested
    elsewhere); the fake erase writes results.json as the real one does."""
    from obliviate.attacks import relearning
    from obliviate.io import write_json
    from obliviate.pipeline import cells

    counts = {"erase": 0, "attack": 0}

    class Run:
        lm = object()

        def __init__(self, config):
            self.results = {"config_fingerprint": cells.config_fingerprint(config), "params": params, "delta": None,
                            "near_chance": {"qa": near_chance, "simdom": False}}
            write_json(Path(config.out) / "results.json", self.results)

    def fake_erase(config, progress=True):
        counts["erase"] += 1
        return Run(config)

    def fake_attack(ctx, config):
        counts["attack"] += 1
        return {"settings": {**asdict(config), "paragraphs_used": config.paragraphs}, "erased": {"curve": []}}

    monkeypatch.setattr(cells, "erase", fake_erase)
    monkeypatch.setattr(relearning, "run", fake_attack)
    monkeypatch.setattr(cells, "_attack_context", lambda *a: None)
    monkeypatch.setattr(cells, "load_erased", lambda folder, results: counts.update(loaded=counts.get("loaded", 0) + 1))
    return counts


def test_a_cell_reads_back_its_finished_parts_and_reruns_what_changed(tmp_path, monkeypatch):
    from obliviate.api import make_config
    from obliviate.attacks import relearning
    from obliviate.pipeline.cells import run_cell

    counts = _fake_parts(monkeypatch, tmp_path, {"lr": 1e-4})
    config = make_config(None, concept="Golf", method="rmu", out=str(tmp_path / "cell"))
    first = run_cell(config, relearning.Config(paragraphs=5))
    assert counts == {"erase": 1, "attack": 1} and set(first.parts["times"]) == {"erase", "relearn"}
    again = run_cell(config, relearning.Config(paragraphs=5))
    assert counts == {"erase": 1, "attack": 1} and again.parts["times"] == first.parts["times"]
    assert again.parts["relearn"]["settings"]["paragraphs"] == 5
    run_cell(config, relearning.Config(paragraphs=6))  # another attack: the erase stays, the attack reruns
    assert counts == {"erase": 1, "attack": 2, "loaded": 1}  # on the erased model loaded from the folder
    reseeded = make_config(None, concept="Golf", method="rmu", seed=7, out=str(tmp_path / "cell"))
    run_cell(reseeded, None)
    assert counts == {"erase": 2, "attack": 2, "loaded": 1}  # another erase config: rerun (no attack asked)
    run_cell(reseeded, relearning.Config(paragraphs=5))  # the attack on the earlier erase is not reused
    assert counts == {"erase": 2, "attack": 3, "loaded": 2}


def test_a_resumed_erase_counts_the_seconds_its_interrupted_run_spent_on_the_grid(tmp_path, monkeypatch):
    from obliviate.api import make_config
    from obliviate.pipeline import cells

    _fake_parts(monkeypatch, tmp_path, {"lr": 1e-4})
    real = cells.erase

    def resumed_erase(config, progress=True):
        run = real(config, progress)
        run.results["timings"] = {"resumed_grid": 120.0}  # what erase records when it read candidates back
        return run

    monkeypatch.setattr(cells, "erase", resumed_erase)
    results = cells.run_cell(make_config(None, concept="Golf", method="rmu", out=str(tmp_path / "cell")), None)
    assert 120.0 <= results.parts["times"]["erase"] < 130.0
    assert json.loads((tmp_path / "cell" / "times.json").read_text())["erase"] == results.parts["times"]["erase"]


@pytest.mark.parametrize("params, near_chance, reason", [({}, False, "SKIPPED"), ({"lr": 1e-4}, True, "AT_CHANCE")])
def test_a_cell_where_relearning_measures_nothing_skips_it(tmp_path, monkeypatch, params, near_chance, reason):
    from obliviate.api import make_config
    from obliviate.attacks import relearning
    from obliviate.pipeline import cells

    counts = _fake_parts(monkeypatch, tmp_path, params, near_chance)
    results = cells.run_cell(make_config(None, concept="Golf", method="rmu", out=str(tmp_path / "cell")),
                             relearning.Config(paragraphs=5))
    assert counts == {"erase": 1, "attack": 0} and results.parts["relearn"]["skipped"] == getattr(cells, reason)
    assert json.loads((tmp_path / "cell" / "relearn.json").read_text())["skipped"] == getattr(cells, reason)
    asked = cells.run_cell(make_config(None, concept="Golf", method="rmu", out=str(tmp_path / "cell")),
                           relearning.Config(paragraphs=5), near_chance_too=True)
    assert counts["attack"] == (0 if reason == "SKIPPED" else 1) and ("skipped" in asked.parts["relearn"]) == (reason == "SKIPPED")


def test_a_grid_that_chooses_nothing_says_so_and_why():
    from obliviate.evaluation.results import RunResults
    from obliviate.reports import markdown

    no_candidate_chosen = lambda r: markdown.no_candidate_chosen(RunResults.from_dict(r))  # noqa: E731
    markdown_report = lambda r: markdown.markdown_report(RunResults.from_dict(r))  # noqa: E731

    metrics = lambda coherence: {k: {"value": v, "low": v, "high": v}  # noqa: E731
                                 for k, v in (("efficacy", 0.8), ("specificity", 0.9), ("coherence", coherence))}
    results = {
        "concept": "Golf", "method": "rmu+ember", "model": "m", "model_source": "s", "seed": 1,
        "embeddings_untied": True, "general_knowledge_source": "g", "params": {},
        "config": {"evaluation": {"general_gate": 0.9, "coherence_gate": 0.9, "method_general_gate": 0.7,
                                  "method_max_qa_frac": 0.6, "method_coherence_gate": 0.9}},
        "method_sweep": [
            {"params": {"lr": 1e-4}, "metrics": metrics(0.95), "score": 0.0, "rejected": "general-knowledge fraction 0.52 < 0.9"},
            {"params": {"lr": 1e-3}, "metrics": metrics(0.74), "score": 0.0, "rejected": None},
        ],
    }
    sentence = no_candidate_chosen(results)
    assert "the EMBER-edited model" in sentence and "coherence >= 0.9" in sentence and "QA fraction <= 0.6" in sentence
    no_gate = {**results, "config": {"evaluation": {**results["config"]["evaluation"], "method_coherence_gate": None}}}
    assert "coherence" not in no_candidate_chosen(no_gate) and "scores 0" not in markdown_report(no_gate)
    report = markdown_report(results)
    assert "| general-knowledge fraction 0.52 < 0.9 |" in report and "| coherence < 0.9: scores 0 |" in report
    assert sentence in report
    assert no_candidate_chosen({**results, "params": {"lr": 1e-4}}) is None
    uncertain = {**results, "method_sweep": [{"params": {"lr": 1e-3}, "score": 0.0, "rejected": None,
                                              "metrics": {"coherence": {"value": 0.95, "low": 0.85, "high": 1.0}}}]}
    assert "scores 0" not in markdown_report(uncertain)  # judged on its point value
    on_low = {**uncertain, "config": {"evaluation": {**results["config"]["evaluation"], "coherence_gate_on": "low"}}}
    assert "| coherence (interval low end) < 0.9: scores 0 |" in markdown_report(on_low)
