"""`obliviate compare`: the plan of cells, bad input, and the table it writes (the
erase runs and the relearning attack are replaced by fakes: they are tested elsewhere)."""
from __future__ import annotations

import csv

import pytest

from obliviate.cli import main
from obliviate.commands import compare
from obliviate.errors import ObliviateError


def test_plan_covers_every_cell():
    cells = compare.plan("rmu,npo", "Golf,Gun", True)
    assert len(cells) == 8 and ("Gun", "npo", True) in cells and ("Golf", "rmu", False) in cells
    assert compare.plan("ember", "Golf", True) == [("Golf", "ember", False)]


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
    import obliviate.pipeline.erase as pipeline

    calls = []

    class Fake:
        def __init__(self, config):
            eff = 0.8 if config.with_ember else 0.5
            self.results = {"efficacy": {"value": eff}, "specificity": {"value": 0.9}, "coherence": {"value": 1.0},
                            "harmonic": {"value": 0.6}, "delta": 5.0 if config.with_ember else None, "params": {"lr": 1e-4},
                            "qa_test": {"base": {"value": 0.7}, "edited": {"value": 0.3}}}
            self.lm, self.out = None, None

    def fake_erase(config):
        calls.append((config.concept, config.method, config.with_ember, config.methods))
        return Fake(config)

    monkeypatch.setattr(pipeline, "erase", fake_erase)
    curve = [{"value": v, "low": v, "high": v} for v in (0.3, 0.5, 0.6)]
    monkeypatch.setattr(compare, "relearn_attack", lambda result, *a: {"erased": {"curve": curve}})
    code = main(["compare", "--methods", "rmu", "--concepts", "Golf,Gun", "--with-and-without-ember",
                 "--data", str(data_dir), "--out", str(tmp_path), "--set", "rmu.steps=2"])
    assert code == 0
    assert [c[:3] for c in calls] == [("Golf", "rmu", False), ("Golf", "rmu", True), ("Gun", "rmu", False), ("Gun", "rmu", True)]
    assert calls[0][3] == {"rmu": {"steps": "2"}}
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert len(rows) == 4 and rows[1]["ember"] == "True" and float(rows[1]["efficacy"]) == 0.8
    assert float(rows[0]["qa_after_relearn_epoch_2"]) == 0.6 and "qa_after_relearn_epoch_1" in rows[0]
    assert float(rows[0]["relearn_regained"]) == pytest.approx((0.6 - 0.25) / (0.7 - 0.25))
    assert (tmp_path / "compare.md").read_text().count("\n") == 6
    assert "Golf" in (tmp_path / "report.html").read_text()


def test_a_grid_that_chooses_nothing_says_so_and_why():
    from obliviate.reports.markdown import markdown_report, no_candidate_chosen

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
