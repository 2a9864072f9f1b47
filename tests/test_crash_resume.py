"""Crash anywhere, resume to the same result.

`obliviate erase` (or `attack --attacks relearn`) runs in a child process that SIGKILLs
itself just before its N-th file system change (mkdir, replace, rename, unlink, rmdir), N
drawn with a fixed seed from the changes an uninterrupted run makes; the same command is
then run again until it finishes. results.json (without its timings), the patch and
every file of model/ must be the same bytes as in the uninterrupted run. Each run works in its own folder with the same
relative --out, so even the recorded config is the same.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

CONCEPTS = ("Golf", "Gambling", "Gun")

# Counts file-system changes and kills the process (SIGKILL: no cleanup, no atexit) just
# before change number OBLIVIATE_KILL_AT; the total is written at exit for a clean run.
CHILD = r"""
import atexit, os, shutil, signal, sys
kill_at = int(os.environ.get("OBLIVIATE_KILL_AT", "0"))
count = [0]
def counted(real):
    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper
for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
    setattr(os, name, counted(getattr(os, name)))
atexit.register(lambda: open(os.environ["OBLIVIATE_COUNT_FILE"], "w").write(str(count[0])))
from obliviate.cli import main
sys.exit(main(sys.argv[1:]))
"""

FAST_ERASE = ["--k", "10", "--ratio-threshold", "1", "--delta", "3", "--coherence-new-tokens", "2",
              "--neutral-coherence-prompts", "1", "--general-prompts", "2", "--bootstrap", "20",
              "--general-questions", "4"]


def write_tiny_benchmark(folder: Path, data_dir: Path, sentences: int = 10, questions: int = 3) -> Path:
    """A benchmark-format folder with three concepts and a few items of each file."""
    def read(name):
        return json.loads((data_dir / name).read_text(encoding="utf-8"))

    folder.mkdir(parents=True, exist_ok=True)
    concept_sentences = [{"concept": e["concept"], "sentences": e["sentences"][:sentences]}
                         for e in read("concept_sentences.json") if e["concept"] in CONCEPTS]
    mc = {c: {split: items[:questions] for split, items in read("mc_questions.json")[c].items()} for c in CONCEPTS}
    open_questions = {c: {split: items[:2] for split, items in read("open_questions.json")[c].items()} for c in CONCEPTS}
    files = {
        "concept_sentences.json": concept_sentences,
        "neutral_sentences.json": read("neutral_sentences.json")[:sentences * 2],
        "mc_questions.json": mc,
        "open_questions.json": open_questions,
        "coherency_prompts.json": {c: read("coherency_prompts.json")[c][:5] for c in CONCEPTS},
        "relearn_paragraphs.json": {c: {"RelearnParagraphs": read("relearn_paragraphs.json")[c]["RelearnParagraphs"][:5]}
                                    for c in CONCEPTS},
    }
    for name, payload in files.items():
        (folder / name).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory, data_dir) -> Path:
    return write_tiny_benchmark(tmp_path_factory.mktemp("tiny-benchmark"), data_dir)


def run_child(argv: list[str], cwd: Path, kill_at: int = 0) -> tuple[int, int, str]:
    """(exit code, file-system changes made, stderr) of one `obliviate` process in ``cwd``."""
    cwd.mkdir(parents=True, exist_ok=True)
    count_file = cwd / ".changes"
    count_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OBLIVIATE_KILL_AT": str(kill_at),
           "OBLIVIATE_COUNT_FILE": str(count_file), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    changes = int(count_file.read_text()) if count_file.exists() else -1
    return done.returncode, changes, done.stderr


def without_timings(value: object) -> object:
    """A results payload without the wall-clock entries, which no two runs share."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("timings", "seconds", "train_seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def outcome(out: Path) -> dict[str, object]:
    """What must not depend on interruptions: results without timings, the patch and model/."""
    files = {"results.json": without_timings(json.loads((out / "results.json").read_text(encoding="utf-8")))}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        if relative == "embedding_patch.safetensors" or relative.startswith("model/"):
            files[relative] = path.read_bytes()
    return files


def kill_and_resume(argv: list[str], root: Path, points: int, seed: int) -> dict[str, object]:
    """Kill ``points`` runs at seeded random changes; each rerun must end where a clean run
    does. Returns the clean run's outcome."""
    out = argv[argv.index("--out") + 1]
    code, total, err = run_child(argv, root / "clean")
    assert code == 0, err
    expected = outcome(root / "clean" / out)
    for kill_at in random.Random(seed).sample(range(1, total + 1), points):
        folder = root / f"killed-at-{kill_at}"
        code, _, err = run_child(argv, folder, kill_at)
        assert code == -9, f"change {kill_at} of {total}: the child was not killed ({code}): {err[-2000:]}"
        code, _, err = run_child(argv, folder)
        assert code == 0, f"rerun after a kill at change {kill_at} of {total} failed: {err[-2000:]}"
        resumed = outcome(folder / out)
        assert resumed.keys() == expected.keys(), kill_at
        for name, content in expected.items():
            assert resumed[name] == content, f"{name} differs after a kill at change {kill_at} of {total}"
    return expected


def erase_argv(tiny_model_dir: Path, tiny_benchmark: Path) -> list[str]:
    return ["erase", "--concept", "Golf", "--data", str(tiny_benchmark), "--model", str(tiny_model_dir),
            "--out", "run", *FAST_ERASE]


def test_erase_killed_at_three_random_points_resumes_to_the_same_bytes(tiny_model_dir, tiny_benchmark, tmp_path):
    expected = kill_and_resume(erase_argv(tiny_model_dir, tiny_benchmark), tmp_path, points=3, seed=0)
    assert {"embedding_patch.safetensors", "model/model.safetensors"} <= set(expected)


@pytest.mark.slow
def test_erase_killed_at_ten_random_points_resumes_to_the_same_bytes(tiny_model_dir, tiny_benchmark, tmp_path):
    kill_and_resume(erase_argv(tiny_model_dir, tiny_benchmark), tmp_path, points=10, seed=1)


@pytest.mark.slow
def test_relearning_killed_at_ten_random_points_resumes_to_the_same_results(tiny_model_dir, tiny_benchmark, tmp_path):
    code, _, err = run_child(erase_argv(tiny_model_dir, tiny_benchmark), tmp_path / "erase")
    assert code == 0, err
    attack = ["attack", "--concept", "Golf", "--data", str(tiny_benchmark),
              "--model", str(tmp_path / "erase" / "run" / "model"), "--base", str(tiny_model_dir),
              "--attacks", "relearn", "--relearn-paragraphs", "5", "--epochs", "2", "--max-length", "32",
              "--out", "attack", *FAST_ERASE[FAST_ERASE.index("--coherence-new-tokens"):]]
    expected = kill_and_resume(attack, tmp_path / "attack", points=10, seed=2)
    assert expected["results.json"]["relearn"]["erased"]["losses"]  # the relearning ran
