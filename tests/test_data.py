import json

import pytest

from obliviate.data.concepts import (
    list_concepts, load_benchmark_concept, load_general_file, load_sentence_file, load_user_concept,
)
from obliviate.errors import ObliviateError


def test_benchmark_concept_has_every_split_and_contrast(data_dir):
    data = load_benchmark_concept("Golf", data_dir, general_questions=24)
    assert len(list_concepts(data_dir)) == 13
    assert {len(data.questions[k]) for k in ("qa_train", "qa_test", "simdom_train", "simdom_test")} == {50}
    assert len(data.general["train"]) == 24 and len(data.general["test"]) == 24
    golf_questions = {q.question for q in data.questions["qa_train"]}
    assert not golf_questions & {q.question for q in data.general["train"]}  # other concepts only
    assert len(data.contrast_sentences) == 12 * 300 and len(data.coherency_prompts) == 20
    assert all(q.options[q.answer] for q in data.questions["qa_test"])


def test_unknown_concept_lists_the_available_ones(data_dir):
    with pytest.raises(ObliviateError, match="Available: .*Golf"):
        load_benchmark_concept("Quidditch", data_dir)


def test_malformed_questions_name_the_file_and_field(tmp_path, data_dir):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(f"Sentence number {i} about pottery." for i in range(10)))
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"QA_train": [{"q": "x?", "options": ["a", "b"], "correct_answer": "c"}], "QA_test": []}))
    with pytest.raises(ObliviateError, match=r"q\.json.*QA_train\[0\]\.correct_answer"):
        load_user_concept("Pottery", sentences, data_dir=data_dir, questions=bad)


def test_empty_and_missing_sentence_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ObliviateError, match="0 non-empty sentences"):
        load_sentence_file(empty)
    with pytest.raises(ObliviateError, match="does not exist"):
        load_sentence_file(tmp_path / "nope.txt")
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    with pytest.raises(ObliviateError, match="not valid JSON"):
        load_sentence_file(broken)


def test_user_concept_without_questions_uses_benchmark_negatives(tmp_path, data_dir):
    sentences = tmp_path / "s.json"
    sentences.write_text(json.dumps([f"Pottery sentence {i} with clay and kilns." for i in range(8)]))
    data = load_user_concept("Pottery", sentences, data_dir=data_dir)
    assert not data.has_questions and len(data.neutral_sentences) == 300
    assert len(data.contrast_sentences) == 13 * 300


def test_mmlu_style_general_file(tmp_path):
    path = tmp_path / "mmlu.json"
    items = [{"question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(10)]
    path.write_text(json.dumps(items))
    general = load_general_file(path, seed=1)
    assert len(general["train"]) == 5 and len(general["test"]) == 5
    assert all(q.options == ("a", "b", "c", "d") for q in general["test"])
