"""Crash anywhere, resume to the same result.

A command (`erase` with EMBER or a trained method, `attack --attacks relearn`, `compare`,
`eco fit`) runs in a child process that SIGKILLs itself just before its N-th file system
change (mkdir, replace, rename, unlink, rmdir), N drawn with a fixed seed from the changes
an uninterrupted run makes; the same command is then run again until it finishes. The
command's outputs (results.json and training logs without their run history, the patch,
model/, trained tensors, compare tables, the ECO artifact) must be the same as in the
uninterrupted run. Each run works in its own folder with the same relative --out, so even
the recorded config is the same.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable

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

# --no-cache: every run does the same writes (a cached original would skip some), so the
# kill points counted on the first run exist in the others
FAST_ERASE = ["--k", "10", "--ratio-threshold", "1", "--delta", "3", "--coherence-new-tokens", "2",
              "--neutral-coherence-prompts", "1", "--general-prompts", "2", "--bootstrap", "20",
              "--general-questions", "4", "--no-cache"]


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


# What a run records about its own process rather than its result: wall-clock times, and
# (trained methods) the step a candidate's training resumed from and whether it was loaded
# from an earlier process's cache. A resumed run must report these honestly, so they differ.
RUN_HISTORY = ("timings", "seconds", "train_seconds", "seconds_per_step", "resumed_from", "cached")


def without_timings(value: object) -> object:
    """A results payload without its run history (RUN_HISTORY), which no two runs share."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in RUN_HISTORY}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def erase_files(relative: str) -> bool:
    return relative in ("results.json", "embedding_patch.safetensors") or relative.startswith("model/")


def outcome(out: Path, wanted: Callable[[str], bool] = erase_files) -> dict[str, object]:
    """What must not depend on interruptions: the files under ``out`` that ``wanted`` picks
    by relative path, JSON results and training logs without their run history, the rest as bytes."""
    files: dict[str, object] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        if not wanted(relative):
            continue
        if path.name in ("results.json", "log.json"):
            files[relative] = without_timings(json.loads(path.read_text(encoding="utf-8")))
        else:
            files[relative] = path.read_bytes()
    return files


def kill_and_resume(argv: list[str], root: Path, points: int, seed: int,
                    wanted: Callable[[str], bool] = erase_files) -> dict[str, object]:
    """Kill ``points`` runs at seeded random changes; each rerun must end where a clean run
    does. Returns the clean run's outcome."""
    out = argv[argv.index("--out") + 1]
    code, total, err = run_child(argv, root / "clean")
    assert code == 0, err
    expected = outcome(root / "clean" / out, wanted)
    assert expected, f"the clean run wrote none of the compared files: {err[-2000:]}"
    for kill_at in random.Random(seed).sample(range(1, total + 1), points):
        folder = root / f"killed-at-{kill_at}"
        code, _, err = run_child(argv, folder, kill_at)
        assert code == -9, f"change {kill_at} of {total}: the child was not killed ({code}): {err[-2000:]}"
        code, _, err = run_child(argv, folder)
        assert code == 0, f"rerun after a kill at change {kill_at} of {total} failed: {err[-2000:]}"
        resumed = outcome(folder / out, wanted)
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


# Gradient difference (the quickest trained method on the tiny model: one forward pass per
# side) with two grid points of 4 steps and a checkpoint after every step, so kills land
# before, inside and between candidates: a rerun resumes from train_state.pt or the cache.
# --fit-at-chance: the tiny model answers at chance, where the grid would not be trained at all
TRAINED = ["--method", "grad_diff", "--set", "lr=1e-4,1e-3", "--set", "steps=4", "--set", "checkpoint_every=1",
           "--set", "batch_size=2", "--set", "max_length=24", "--fit-at-chance"]


def trained_files(relative: str) -> bool:
    """results.json and model/ as for EMBER, plus each candidate's trained tensors and loss log."""
    return erase_files(relative) or relative.endswith(("/trained.safetensors", "/log.json"))


def candidate_logs(root: Path) -> list[dict]:
    """The grad_diff candidates' training logs in every rerun's results.json (with run history)."""
    logs = []
    for results in sorted(root.glob("killed-at-*/run/results.json")):
        logs += json.loads(results.read_text(encoding="utf-8"))["details"]["grad_diff"]["candidates"]
    return logs


@pytest.mark.slow
def test_trained_erase_killed_at_ten_random_points_resumes_to_the_same_bytes(tiny_model_dir, tiny_benchmark,
                                                                               tmp_path):
    argv = [*erase_argv(tiny_model_dir, tiny_benchmark), *TRAINED]
    expected = kill_and_resume(argv, tmp_path, points=10, seed=3, wanted=trained_files)
    assert sum(name.endswith("/trained.safetensors") for name in expected) == 2
    assert len(expected["results.json"]["method_sweep"]) == 2
    logs = candidate_logs(tmp_path)
    assert any(log["resumed_from"] > 0 for log in logs), "no rerun resumed mid-training from train_state.pt"
    assert any(log["cached"] for log in logs), "no rerun loaded a finished candidate from its checkpoint"


def compare_files(relative: str) -> bool:
    """The comparison's tables and pooled statistics, and each cell's results."""
    return relative in ("compare.csv", "compare.md", "pooled.json") or relative.endswith("/results.json")


@pytest.mark.slow
def test_compare_killed_at_ten_random_points_resumes_to_the_same_tables(tiny_model_dir, tiny_benchmark, tmp_path):
    # compare takes no EMBER or per-method flags but a --config: the same tiny settings as above.
    settings = tmp_path / "tiny.yaml"
    settings.write_text("ember: {k: 10, ratio_threshold: 1, delta: 3}\n"
                        "methods:\n  grad_diff: {lr: [1.0e-4], steps: 2, checkpoint_every: 1, batch_size: 2, "
                        "max_length: 24}\n", encoding="utf-8")
    argv = ["compare", "--config", str(settings), "--methods", "ember,grad_diff", "--concepts", "Golf",
            "--data", str(tiny_benchmark), "--model", str(tiny_model_dir), "--out", "compare",
            "--relearn-epochs", "1", "--relearn-paragraphs", "2", "--relearn-near-chance",  # a tiny model is at chance
            *FAST_ERASE[FAST_ERASE.index("--coherence-new-tokens"):]]
    expected = kill_and_resume(argv, tmp_path, points=10, seed=4, wanted=compare_files)
    assert {"compare.csv", "compare.md", "pooled.json", "Golf/ember/results.json",
            "Golf/grad_diff/results.json"} <= set(expected)
    assert b"qa_after_relearn_epoch_1" in expected["compare.csv"]  # the relearning attack ran in each cell


@pytest.mark.slow
def test_eco_fit_killed_at_ten_random_points_resumes_to_the_same_artifact(tiny_model_dir, data_dir, tmp_path):
    # The whole benchmark: the classifier needs 30 positive examples, more than the tiny one has.
    # Two zeroth-order steps so the sigma search, not a fixed --sigma, is resumed too.
    argv = ["eco", "fit", "--model", str(tiny_model_dir), "--concept", "Golf", "--data", str(data_dir),
            "--out", "eco", "--general-questions", "40", "--layer", "2", "--zo-steps", "2"]
    expected = kill_and_resume(argv, tmp_path, points=10, seed=5, wanted=lambda relative: True)
    assert set(expected) == {"config.json", "classifier.safetensors", "calibration.png", "sigma.png"}
