"""`obliviate eval`, `attack` and `report` end to end on a tiny saved model, and their
refusals of bad input (exit 2, a clear message, nothing half-written)."""
from __future__ import annotations

import json

import pytest

from obliviate.cli import main


@pytest.fixture
def common(tiny_model_dir, data_dir):
    return ["--model", str(tiny_model_dir), "--base", str(tiny_model_dir), "--concept", "Harry Potter",
            "--data", str(data_dir), "--general-questions", "8", "--bootstrap", "20"]


TINY_ATTACKS = ["--relearn-paragraphs", "2", "--epochs", "1", "--max-length", "16", "--probe-sentences", "8",
                "--no-progress"]


def test_attack_end_to_end_then_report(common, tmp_path, capsys):
    out = tmp_path / "attack"
    code = main(["attack", *common, "--attacks", "relearn,probe", *TINY_ATTACKS, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["attacks"] == ["relearn", "probe"] and results["kind"] == "attack"
    # the same model as original and erased: the attack sees identical numbers on both sides
    assert results["relearn"]["original"]["curve"] == results["relearn"]["erased"]["curve"]
    assert results["probe"]["original"]["per_layer"] == results["probe"]["erased"]["per_layer"]
    assert len(results["relearn"]["original"]["curve"]) == 2
    assert not (out / ".checkpoint.json").exists()
    assert main(["report", str(out)]) == 0
    assert "relearn_after" in (out / "report.html").read_text() and (out / "summary.csv").exists()


def test_eval_same_model_as_base_is_identical(common, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", *common, "--out", str(out), "--coherence-new-tokens", "4", "--open-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "open-ended answers: started (2 set)" in err  # a progress line for the open-ended part too
    r = json.loads((out / "results.json").read_text())
    for name in ("qa_test", "simdom_test", "general_test"):
        assert r[name]["base"] == r[name]["edited"]
    assert r["efficacy"]["value"] == 0.0 and r["coherence"]["value"] == pytest.approx(1.0)
    assert r["open_ended"]["judge"] is None  # no judge ran: no judged number is claimed
    assert "judged" not in r["open_ended"]["qa_test"]["edited"]
    assert r["open_ended"]["qa_test"]["base"]["match"] == r["open_ended"]["qa_test"]["edited"]["match"]


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "relearn,jailbreak"], "Valid attacks: relearn, relearn-strong, in-context, adversarial, probe, tied-restore"),
    (["--concept", "Knitting"], "Available:"),
    (["--set", "relearn.epochs=0"], "epochs must be >= 1"),
])
def test_attack_refuses_bad_input(common, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert main(["attack", *common, *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_model_folder_without_config(tmp_path, data_dir, capsys):
    (tmp_path / "empty-model").mkdir()
    code = main(["eval", "--model", str(tmp_path / "empty-model"), "--concept", "Golf", "--data", str(data_dir),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "no config.json" in capsys.readouterr().err


def test_out_folder_of_another_run_needs_overwrite(common, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"config_fingerprint": "someone-else"}))
    args = ["attack", *common, "--attacks", "probe", "--probe-sentences", "8", "--out", str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == {"config_fingerprint": "someone-else"}
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["kind"] == "attack"


def test_eco_folder_must_exist(common, tmp_path, capsys):
    assert main(["eval", *common, "--eco", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--eco" in capsys.readouterr().err


def test_out_may_not_hold_the_model(tiny_model_dir, data_dir, capsys):
    code = main(["attack", "--model", str(tiny_model_dir), "--concept", "Golf", "--data", str(data_dir),
                 "--out", str(tiny_model_dir), "--overwrite"])
    assert code == 2 and "would hold the model" in capsys.readouterr().err
    assert (tiny_model_dir / "config.json").exists()


def test_eval_of_a_patch_only_erase_folder_matches_the_erase_run(tiny_model_dir, data_dir, tmp_path, capsys):
    """A folder written with --no-save-model is evaluated as original + its embedding patch."""
    import obliviate

    run_dir = tmp_path / "erase"
    obliviate.erase("Golf", data=data_dir, out=run_dir, model={"name": str(tiny_model_dir)}, progress=False,
                    save_model=False, ember={"k": 20, "ratio_threshold": 1.0, "delta": 50.0},
                    evaluation={"coherence_new_tokens": 4, "bootstrap": 20}, data_options={"general_questions": 6})
    erased = json.loads((run_dir / "results.json").read_text())
    assert not (run_dir / "model").exists() and erased["edited_token_count"] > 0
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(run_dir), "--data", str(data_dir), "--general-questions", "6",
                 "--bootstrap", "20", "--coherence-new-tokens", "4", "--open-new-tokens", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert r["concept"] == "Golf" and r["base"] == str(tiny_model_dir)
    assert r["evaluated_as"] == f"an embedding patch of {erased['edited_token_count']} rows on the original"
    for split in ("qa_test", "simdom_test"):
        assert r[split]["edited"]["value"] == erased[split]["edited"]["value"]
        assert r[split]["base"]["value"] == erased[split]["base"]["value"]


def test_eval_as_a_patch_measures_what_two_models_measure(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """The shortcut (only inputs holding an edited token run again) against every input on
    both models: the same answers, continuations and metrics, for a saved model/ folder."""
    import obliviate
    from obliviate.pipeline import evaluate

    run_dir = tmp_path / "erase"
    obliviate.erase("Golf", data=data_dir, out=run_dir, model={"name": str(tiny_model_dir)}, progress=False,
                    ember={"k": 20, "ratio_threshold": 1.0, "delta": 50.0},
                    evaluation={"coherence_new_tokens": 4, "bootstrap": 20}, data_options={"general_questions": 6})
    args = ["eval", "--model", str(run_dir), "--data", str(data_dir), "--general-questions", "6", "--bootstrap", "20",
            "--coherence-new-tokens", "4", "--open-new-tokens", "4", "--no-cache", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "patch")]) == 0, capsys.readouterr().err
    monkeypatch.setattr(evaluate, "erased_as_edit", lambda pair: None)
    assert main([*args, "--out", str(tmp_path / "full")]) == 0, capsys.readouterr().err
    fast, full = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("patch", "full"))
    assert fast["evaluated_as"].startswith("an embedding patch of") and full["evaluated_as"].startswith("two models")
    _assert_the_same_measurements(fast, full)


def _assert_the_same_measurements(fast: dict, full: dict) -> None:
    """Two eval results.json: the same answers and continuations, probabilities and metrics
    up to float order."""
    assert fast["per_question"].keys() == full["per_question"].keys() and fast["per_prompt"] == full["per_prompt"]
    assert fast["open_ended"] == full["open_ended"] and "qa_test" in full["open_ended"]
    for name, rows in full["per_question"].items():
        for key, values in rows.items():  # answers exactly; probabilities up to float order
            assert fast["per_question"][name][key] == (values if key.endswith("correct") else pytest.approx(values, abs=1e-4))
    for name in ("efficacy", "specificity", "coherence", *(f"{s}_test/{role}" for s in ("qa", "simdom", "general")
                                                          for role in ("base", "edited"))):
        part, _, role = name.partition("/")
        fast_value, full_value = (r[part][role] if role else r[part] for r in (fast, full))
        assert fast_value == pytest.approx(full_value, abs=1e-6), name


def _save_tiny_eco_artifact(tiny_model_dir, folder, threshold: float) -> None:
    """An ECO artifact for the tiny model: a random classifier (flags by ``threshold``) and
    a hard gaussian corruption."""
    import torch

    from obliviate.methods.eco import EcoArtifact
    from obliviate.methods.eco.artifact import model_identity, probe_rows
    from obliviate.methods.eco.classifier import PromptClassifier
    from obliviate.methods.eco.corruption import Corruption
    from obliviate.models.loading import load_model

    lm = load_model(str(tiny_model_dir))
    d = lm.model.config.hidden_size
    torch.manual_seed(0)
    classifier = PromptClassifier(torch.randn(d), torch.zeros(1), torch.zeros(d), torch.ones(d), 1, threshold)
    EcoArtifact(classifier, Corruption("gaussian", 0, 100.0), str(tiny_model_dir), lm.source, model_identity(lm.model),
                probe_rows(lm.model), (), 0, {"concept": "Harry Potter"}).save(folder)


def test_eval_eco_without_model_uses_the_model_the_artifact_was_fitted_on(tiny_model_dir, data_dir, tmp_path, capsys):
    """`eval --eco DIR` alone evaluates the artifact's own model (the embedded default
    included) with the hook, against the same model without it."""
    _save_tiny_eco_artifact(tiny_model_dir, tmp_path / "eco", 1e-6)
    out = tmp_path / "eval"
    code = main(["eval", "--eco", str(tmp_path / "eco"), "--concept", "Harry Potter", "--data", str(data_dir),
                 "--general-questions", "8", "--bootstrap", "20", "--coherence-new-tokens", "4",
                 "--open-new-tokens", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert r["base"] == str(tiny_model_dir) and r["method"].endswith("+eco")
    # every prompt is flagged (threshold 1e-6) and corrupted hard: answers move on the hooked side
    assert r["qa_test"]["base"] != r["qa_test"]["edited"] or r["general_test"]["base"] != r["general_test"]["edited"]


def test_eval_of_an_eco_hook_as_an_edit_measures_what_two_models_measure(tiny_model_dir, data_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """The hook on the original, running again only the inputs it flags, against the hooked
    copy beside the original: the same answers, continuations and open-ended answers."""
    from obliviate.pipeline import evaluate

    _save_tiny_eco_artifact(tiny_model_dir, tmp_path / "eco", 0.5)
    args = ["eval", "--eco", str(tmp_path / "eco"), "--concept", "Harry Potter", "--data", str(data_dir),
            "--general-questions", "8", "--bootstrap", "20", "--coherence-new-tokens", "4", "--open-new-tokens", "4",
            "--no-cache", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "hook")]) == 0, capsys.readouterr().err
    monkeypatch.setattr(evaluate, "erased_as_edit", lambda pair: None)
    assert main([*args, "--out", str(tmp_path / "full")]) == 0, capsys.readouterr().err
    fast, full = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("hook", "full"))
    assert fast["evaluated_as"] == "the ECO hook on the original" and full["evaluated_as"].startswith("two models")
    _assert_the_same_measurements(fast, full)
    edited = [v for rows in full["per_question"].values() for v in rows["edited_prob"]]
    base = [v for rows in full["per_question"].values() for v in rows["base_prob"]]
    assert edited != base  # the hook moved some answers: the comparison is not of two originals


@pytest.mark.parametrize("command", ["eval", "attack"])
def test_an_erase_run_that_applied_no_edit_is_refused_naming_why(command, data_dir, tmp_path, capsys, monkeypatch):
    """A grid whose every candidate failed its gates saves no model and no edit: its "erased"
    model is the original, and eval or attack on it says so (exit 2) before loading a model."""
    from obliviate.pipeline import pair

    run = tmp_path / "erase"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"kind": "erase", "concept": "Golf", "method": "npo",
                                                  "delta": None, "params": {}, "saved": {"model": False, "edits": []}}))
    monkeypatch.setattr(pair, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main([command, "--model", str(run), "--data", str(data_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "applied no edit" in err and "nothing to evaluate or attack" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "attack"])
def test_a_model_that_fails_to_load_leaves_nothing_that_blocks_the_corrected_rerun(command, common, tiny_model_dir,
                                                                                     tmp_path, capsys):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    out = tmp_path / command
    args = [command, *common, "--out", str(out)]
    args[args.index("--model") + 1] = str(not_a_model)
    assert main(args) == 2 and "Traceback" not in capsys.readouterr().err
    assert not (out / ".checkpoint.json").exists()
    extra = ["--attacks", "probe", "--probe-sentences", "8", "--no-progress"] if command == "attack" else \
        ["--coherence-new-tokens", "4", "--open-new-tokens", "4"]
    assert main([command, *common, "--out", str(out), *extra]) == 0, capsys.readouterr().err
    assert (out / "results.json").is_file()
