"""`obliviate concepts`: every concept of the benchmark (the packaged one, or --data's) with
its sizes, fast, without loading a model."""
from __future__ import annotations

import json
import subprocess
import sys

from obliviate.cli import main
from obliviate.data import benchmark_dir

CONCEPTS = ["Ancient Rome", "COVID-19 pandemic", "Cannabis", "Culture of Greece", "Gambling", "Golf", "Gun",
            "Harry Potter", "Heroin", "Nazism", "Pornography", "Valentine's Day", "World War II"]


def test_concepts_lists_all_13_with_their_sizes(capsys):
    assert main(["concepts"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"13 concepts in the EMBER benchmark shipped with obliviate ({benchmark_dir()})")
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()}
    for concept in CONCEPTS:
        assert concept in rows, concept
        assert rows[concept][-4:] == ["300", "50", "50", "100"]  # sentences, QA train, QA test, open questions
    assert "--concept 'ancient rome'" in out  # the example names a concept as the user may type it


def test_concepts_of_another_folder_and_one_without_open_questions(tmp_path, capsys):
    question = {"q": "Which?", "correct_answer": "a", "options": ["a", "b", "c", "d"]}
    (tmp_path / "concept_sentences.json").write_text(json.dumps(
        [{"concept": "Pottery", "sentences": [f"Clay pot {i} is fired in the kiln." for i in range(7)]}]))
    (tmp_path / "mc_questions.json").write_text(json.dumps(
        {"Pottery": {"QA_train": [question] * 3, "QA_test": [question] * 2}}))
    assert main(["concepts", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"1 concepts in --data {tmp_path}")
    assert next(line for line in out.splitlines() if line.startswith("Pottery")).split() == ["Pottery", "7", "3", "2", "-"]


def test_concepts_loads_no_model_and_is_fast():
    code = ("import sys, time; from obliviate.cli import main; t = time.perf_counter(); code = main(['concepts']); "
            "assert code == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]; "
            "print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.splitlines()[-1]) < 5  # about 0.1 s: the three JSON files, parsed and checked


def test_concepts_is_listed_in_help(capsys):
    assert main([]) == 0
    assert "concepts" in capsys.readouterr().out
