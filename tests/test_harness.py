"""lm-evaluation-harness both ways: the EMBER task folder scores like obliviate, and two
in-memory models come back side by side with the harness's standard errors. Offline."""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest

from conftest import make_tiny_lm
from obliviate.data.concepts import load_benchmark_concept
from obliviate.errors import ObliviateError
from obliviate.evaluation import harness
from obliviate.evaluation.multiple_choice import correct_from_scores, option_scores, prepare, shuffled_order

CONCEPT = "Gambling"
TASK = "ember_qa_gambling"
LIMIT = 25  # questions the harness scores (its first 25 test documents): seconds, not minutes


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("ember-tasks")
    harness.write_task_folder(data_dir, folder, [CONCEPT, "Golf"])
    return folder


def ours(lm, questions, seed=42):
    prepared = prepare(lm, questions, "loglik", seed)
    scores = option_scores(lm, prepared)
    return prepared, scores, correct_from_scores(prepared, scores)


def test_task_folder_holds_our_questions_in_our_option_order(task_dir, data_dir):
    names = sorted(p.name for p in task_dir.iterdir())
    assert names == ["README.md", "_ember_qa.yaml", "_ember_simdom.yaml", "data", "ember_qa_gambling.yaml",
                     "ember_qa_golf.yaml", "ember_simdom_gambling.yaml", "ember_simdom_golf.yaml", "utils.py"]
    splits = json.loads((task_dir / "data" / "gambling.json").read_text())
    questions = load_benchmark_concept(CONCEPT, data_dir, general_questions=0).questions
    assert set(splits) == {"qa_train", "qa_test", "simdom_train", "simdom_test"}
    for doc, question in zip(splits["qa_test"], questions["qa_test"], strict=True):
        order = shuffled_order(question, 42)
        assert doc["choices"] == [question.options[i] for i in order]
        assert doc["choices"][doc["answer"]] == question.options[question.answer]
    assert sum(doc["answer"] == 0 for doc in splits["qa_test"]) < 0.5 * len(splits["qa_test"])  # shuffled
    text = (task_dir / "ember_qa_gambling.yaml").read_text()
    assert 'target_delimiter: ""' in text and "test_split: qa_test" in text and "Question: {{question}}" in text
    assert "ember_qa_golf" in (task_dir / "_ember_qa.yaml").read_text()


def test_unknown_concept_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ObliviateError, match="not in .*Available: .*Golf"):
        harness.write_task_folder(data_dir, tmp_path, ["Knitting"])


def test_slugs_are_task_names():
    assert harness.slug("Valentine's Day") == "valentines_day"
    assert harness.slug("COVID-19 pandemic") == "covid_19_pandemic"


def test_command_writes_the_folder(tmp_path, data_dir, capsys):
    from obliviate import cli
    from obliviate.commands import lm_eval_tasks

    assert "lm-eval-tasks" in cli.COMMANDS
    parser = argparse.ArgumentParser()
    lm_eval_tasks.add_arguments(parser)
    args = parser.parse_args(["--data", str(data_dir), "--out", str(tmp_path / "t"), "--concepts", "Golf,Gun"])
    assert lm_eval_tasks.run(args) == 0
    assert (tmp_path / "t" / "ember_simdom_gun.yaml").is_file() and not (tmp_path / "t" / "ember_qa_gambling.yaml").exists()
    assert "--include_path" in capsys.readouterr().out


def test_cli_entry_point(tmp_path, data_dir):
    from obliviate import cli

    assert cli.main(["lm-eval-tasks", "--data", str(data_dir), "--out", str(tmp_path), "--concepts", "Golf"]) == 0
    assert (tmp_path / "ember_qa_golf.yaml").is_file()
    assert cli.main(["lm-eval-tasks", "--data", str(data_dir), "--out", str(tmp_path), "--concepts", "Knitting"]) == 2


# ---- with the harness installed --------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer, seed=0), make_tiny_lm(tiny_tokenizer, seed=1)


@pytest.fixture(scope="module")
def side_by_side(pair, task_dir):
    pytest.importorskip("lm_eval")
    return harness.run_harness(pair[0], pair[1], TASK, task_dir, batch_size=32, limit=LIMIT)


def test_harness_accuracy_equals_ours_for_both_models(side_by_side, pair, data_dir):
    questions = load_benchmark_concept(CONCEPT, data_dir, general_questions=0).questions["qa_test"][:LIMIT]
    row = side_by_side["results"][TASK]["acc_norm,none"]
    correct = {role: ours(lm, questions)[2] for role, lm in zip(("original", "erased"), pair)}
    assert correct["original"].mean() != correct["erased"].mean()  # two different models, or the test proves little
    for role in ("original", "erased"):
        p, n = correct[role].mean(), len(questions)
        assert row[role]["value"] == pytest.approx(p, abs=1e-9)
        assert row[role]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-6)  # the harness's own
        assert row[role]["low"] == pytest.approx(p - 1.96 * row[role]["stderr"], abs=1e-3)
    diff = (correct["erased"].astype(float) - correct["original"].astype(float))
    assert row["difference"]["value"] == pytest.approx(diff.mean(), abs=1e-9) and row["difference"]["n"] == LIMIT
    assert row["difference"]["stderr"] == pytest.approx(diff.std(ddof=1) / math.sqrt(LIMIT), rel=1e-6)
    assert side_by_side["samples"] == {TASK: LIMIT} and side_by_side["harness_version"]


def test_harness_log_likelihoods_equal_ours(pair, task_dir, data_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    lm = pair[0]
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = harness.evaluate_model(lm, [TASK], manager, limit=8, batch_size=32)
    questions = load_benchmark_concept(CONCEPT, data_dir, general_questions=0).questions["qa_test"][:8]
    prepared, scores, correct = ours(lm, questions)
    chars = np.array([[len(c) + 1 for c in (q.options[i] for i in shuffled_order(q, 42))] for q in questions])
    for sample in out["samples"][TASK]:
        doc = sample["doc_id"]
        harness_ll = [resp[0] for resp in sample["filtered_resps"]]
        np.testing.assert_allclose(harness_ll, scores[doc] * chars[doc], atol=2e-4)
        assert sample["acc_norm"] == float(correct[doc])


def test_unknown_task_and_missing_folder_are_clear_errors(pair, task_dir, tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(ObliviateError, match="does not know the task.*ember_qa_knitting"):
        harness.run_harness(pair[0], pair[1], "ember_qa_knitting", task_dir, include_defaults=False)
    with pytest.raises(ObliviateError, match="not a folder"):
        harness.run_harness(pair[0], pair[1], TASK, tmp_path / "nowhere")
    with pytest.raises(ObliviateError, match="at least one"):
        harness.run_harness(pair[0], pair[1], " , ", task_dir)


def test_offline_is_set_inside_and_restored_after(monkeypatch):
    datasets_config = pytest.importorskip("datasets.config")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = datasets_config.HF_HUB_OFFLINE
    with harness.offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets_config.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and datasets_config.HF_HUB_OFFLINE == before


def test_eval_runs_the_harness_on_both_models_beside_our_numbers(tiny_model_dir, task_dir, data_dir, tmp_path, capsys):
    """`obliviate eval --lm-eval TASK --lm-eval-include DIR`: the harness on the original and
    the evaluated model, in results.json next to our own numbers (same model: equal)."""
    pytest.importorskip("lm_eval")
    from obliviate import cli

    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", str(tiny_model_dir), "--base", str(tiny_model_dir), "--concept", CONCEPT,
                     "--data", str(data_dir), "--general-questions", "8", "--bootstrap", "20",
                     "--coherence-new-tokens", "2", "--open-new-tokens", "2", "--lm-eval", TASK,
                     "--lm-eval-include", str(task_dir), "--lm-eval-limit", "10", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    row = results["lm_eval"]["results"][TASK]["acc_norm,none"]
    assert row["original"]["value"] == row["erased"]["value"] and results["lm_eval"]["samples"] == {TASK: 10}
    assert "lm-eval" in capsys.readouterr().out
