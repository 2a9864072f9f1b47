"""The EMBER benchmark ships in the package (the default --data), concept names match
without regard to case, `obliviate --version` says the installed version, a bad --data is
a clear exit 2, and the wheel carries the benchmark."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from obliviate.cli import main
from obliviate.data import benchmark_dir
from obliviate.data.concepts import (concept_sizes, list_concepts, load_benchmark_concept, load_open_questions,
                                     load_relearn_paragraphs, resolve_concept)
from obliviate.errors import ObliviateError

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_JSON = ["coherency_prompts.json", "concept_sentences.json", "mc_questions.json", "neutral_sentences.json",
                  "open_questions.json", "relearn_paragraphs.json"]
CONCEPTS = ["Ancient Rome", "COVID-19 pandemic", "Cannabis", "Culture of Greece", "Gambling", "Golf", "Gun",
            "Harry Potter", "Heroin", "Nazism", "Pornography", "Valentine's Day", "World War II"]


def test_the_packaged_benchmark_has_every_file_and_its_13_concepts_parse():
    folder = benchmark_dir()
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted([*BENCHMARK_JSON, "LICENSE", "README.md"])
    assert "MIT License" in (folder / "LICENSE").read_text() and "2606.03695" in (folder / "README.md").read_text()
    assert load_relearn_paragraphs(folder, "golf", 100) == load_relearn_paragraphs(folder, "Golf", 100)
    assert len(load_relearn_paragraphs(folder, "Golf", 100)) == 86  # 86-806 a concept
    for name in BENCHMARK_JSON:
        json.loads((folder / name).read_text(encoding="utf-8"))
    assert sorted(list_concepts(folder)) == sorted(CONCEPTS)
    sizes = concept_sizes(folder)  # every concept validated as a run reads it
    assert len(sizes) == 13 and all(s.sentences == 300 and s.qa_train == s.qa_test == 50 for s in sizes)
    data = load_benchmark_concept("Golf", folder, general_questions=10)
    assert data.has_questions and data.coherency_prompts and data.neutral_sentences and data.data_dir == folder


def test_concept_names_match_without_regard_to_case():
    assert resolve_concept("gambling", CONCEPTS) == "Gambling"
    assert resolve_concept(" WORLD WAR ii ", CONCEPTS) == "World War II"
    assert resolve_concept("Golf", ["Golf", "golf"]) == "Golf"  # an exact name wins
    with pytest.raises(ObliviateError, match=r"'GOLF' matches 'Golf', 'golf'"):
        resolve_concept("GOLF", ["Golf", "golf"])
    with pytest.raises(ObliviateError, match=r"'Golff' is not in the benchmark\. Available: Ancient Rome, .*Golf, "):
        resolve_concept("Golff", CONCEPTS)
    data = load_benchmark_concept("harry potter", benchmark_dir(), general_questions=10, erased_too=["golf"])
    assert data.concept == "Harry Potter"
    golf = set(load_benchmark_concept("Golf", benchmark_dir(), general_questions=0).concept_sentences)
    assert not golf & set(data.contrast_sentences)  # "golf", erased too, is left out as "Golf" would be
    assert load_open_questions(benchmark_dir(), "harry POTTER")["qa_test"]


def test_a_run_reads_the_packaged_benchmark_without_data(tmp_path):
    from obliviate.api import make_config
    from obliviate.pipeline.inputs import load_concept_data

    config = make_config(concept="gambling", concepts=("golf",), data={"general_questions": 10},
                         evaluation={"general_prompts": 4})
    assert config.data.data is None and config.data.data_dir() == benchmark_dir()  # not a path in the fingerprint
    data = load_concept_data(config)
    assert data.concept == "Gambling" and data.data_dir == benchmark_dir() and data.general_prompts["test"]
    own = make_config(concept="Pottery", data={"concept_sentences": str(tmp_path / "s.txt")})
    assert own.data.data_dir() is None  # a concept of the user's own reads only its files without --data
    assert make_config(data={"data": str(tmp_path)}).data.data_dir() == tmp_path


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"obliviate {metadata.version('obliviate')}"


def test_a_bad_data_folder_exits_2_with_a_clear_message(tmp_path, capsys):
    a_file = tmp_path / "benchmark.json"
    a_file.write_text("{}")
    assert main(["concepts", "--data", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "is a file: it must be a folder" in err and "does not exist" not in err and "Traceback" not in err
    assert main(["erase", "--concept", "Golf", "--data", str(a_file), "--out", str(tmp_path / "o")]) == 2
    assert "is a file: it must be a folder" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["concepts", "--data", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert main(["concepts", "--data", str(tmp_path)]) == 2  # a folder, but not a benchmark
    assert "concept_sentences.json is missing: --data must name a folder" in capsys.readouterr().err


def test_the_wheel_carries_the_benchmark(tmp_path):
    """Built from a copy of the sources, so no build/ or egg-info lands in the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("obliviate-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"obliviate/data/ember_benchmark/{name}" for name in [*BENCHMARK_JSON, "LICENSE", "README.md"]}
    assert shipped <= names, sorted(shipped - names)
    assert "obliviate/commands/concepts.py" in names
