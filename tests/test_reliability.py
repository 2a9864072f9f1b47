"""Untrusted inputs, full or read-only disks and concurrent writers: each is a clean
error (exit 2, one message naming the file, item and field or the path) and nothing is
written to --out; writes are reproducible byte for byte."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from obliviate import io
from obliviate.cli import main
from obliviate.methods.eco import EcoArtifact
from obliviate.methods.eco.artifact import model_identity
from obliviate.methods.eco.artifact import probe_rows
from obliviate.methods.eco.classifier import PromptClassifier
from obliviate.methods.eco.corruption import Corruption
from obliviate.errors import ObliviateError

from conftest import make_tiny_lm
from test_crash_resume import FAST_ERASE, write_tiny_benchmark

HUGE = "x" * 100_001  # one character over data.MAX_TEXT_CHARS


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, data_dir) -> Path:
    return write_tiny_benchmark(tmp_path_factory.mktemp("tiny_data"), data_dir)


def edit_json(folder: Path, name: str, change) -> None:
    path = folder / name
    payload = json.loads(path.read_text(encoding="utf-8"))
    change(payload)  # edits in place
    path.write_text(json.dumps(payload), encoding="utf-8")


def set_question(split: str, index: int, **fields):
    def change(mc):
        mc["Golf"][split][index].update(fields)
    return change


# (id, file to break, how, what the message must name). Golf's first QA_train question is
# item 0; the benchmark folder is a fresh copy for each case.
DATA_CASES = [
    ("not-utf8", "concept_sentences.json", lambda p: p.write_bytes(b'[{"concept": "Golf\xff"}]'),
     r"concept_sentences\.json is not UTF-8 text \(byte 18: invalid start byte\)"),
    ("not-json", "concept_sentences.json", lambda p: p.write_text("[{"), r"concept_sentences\.json is not valid JSON"),
    ("top-level-object", "concept_sentences.json", lambda p: p.write_text("{}"), r"top level must be a list"),
    ("sentence-not-string", "concept_sentences.json",
     lambda p: edit_json(p.parent, p.name, lambda e: e[0]["sentences"].__setitem__(3, 7)),
     r"entry 0\.sentences\[3\] must be a string, not int"),
    ("huge-sentence", "concept_sentences.json",
     lambda p: edit_json(p.parent, p.name, lambda e: e[1]["sentences"].__setitem__(2, HUGE)),
     r"entry 1\.sentences\[2\] has 100001 characters \(limit 100000\)"),
    ("duplicate-concept", "concept_sentences.json", lambda p: edit_json(p.parent, p.name, lambda e: e.append(e[0])),
     r"entry 3: concept '\w+' appears twice"),
    ("too-few-sentences", "concept_sentences.json",
     lambda p: edit_json(p.parent, p.name, lambda e: [x.update(sentences=x["sentences"][:2]) for x in e]),
     r"entry 0\.sentences has 2 non-empty sentences; at least 5"),
    ("answer-not-an-option", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, set_question("QA_train", 0, correct_answer="none of these")),
     r"Golf\.QA_train\[0\]\.correct_answer is not one of its options"),
    ("option-not-string", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, set_question("QA_test", 1, options=["a", "b", 3])),
     r"Golf\.QA_test\[1\]\.options\[2\] must be a string, not int"),
    ("empty-question", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, set_question("QA_train", 0, q="   ")), r"Golf\.QA_train\[0\]\.q is empty"),
    ("empty-option", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, set_question("QA_train", 2, options=["yes", ""], correct_answer="yes")),
     r"Golf\.QA_train\[2\]\.options\[1\] is empty"),
    ("duplicate-option", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, set_question("SimdomQA_train", 0, options=["a", "b", "a"], correct_answer="a")),
     r"Golf\.SimdomQA_train\[0\]\.options lists the same option twice"),
    ("one-option", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, set_question("QA_test", 0, options=["a"], correct_answer="a")),
     r"Golf\.QA_test\[0\]\.options must be a list of at least 2"),
    ("huge-question", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, set_question("QA_train", 1, q=HUGE)),
     r"Golf\.QA_train\[1\]\.q has 100001 characters"),
    ("question-not-object", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, lambda mc: mc["Gun"]["QA_test"].__setitem__(0, "why?")),
     r"Gun\.QA_test\[0\] must be an object"),
    ("answer-index-out-of-range", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, lambda mc: mc["Golf"]["QA_test"].__setitem__(
         2, {"question": "q?", "choices": ["a", "b"], "answer": 7})),
     r"Golf\.QA_test\[2\] needs 'correct_answer'"),
    ("answer-is-bool", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, lambda mc: mc["Golf"]["QA_test"].__setitem__(
         2, {"question": "q?", "choices": ["a", "b"], "answer": True})),
     r"Golf\.QA_test\[2\] needs 'correct_answer'"),
    ("missing-split", "mc_questions.json",
     lambda p: edit_json(p.parent, p.name, lambda mc: mc["Gambling"].pop("QA_test")),
     r"Gambling needs the splits QA_train and QA_test"),
    ("duplicate-key", "mc_questions.json",
     lambda p: p.write_text(p.read_text().replace('"Golf"', '"Gun"', 1)), r"repeats the key\(s\) 'Gun'"),
    ("neutral-without-sentence", "neutral_sentences.json",
     lambda p: edit_json(p.parent, p.name, lambda items: [i.pop("sentence") for i in items]),
     r"neutral_sentences\.json.*every entry needs 'sentence'"),
    ("neutral-missing", "neutral_sentences.json", lambda p: p.unlink(), r"neutral_sentences\.json is missing"),
    ("coherency-not-object", "coherency_prompts.json", lambda p: p.write_text("[]"),
     r"coherency_prompts\.json.*must map concepts to prompt lists"),
    ("mc-not-utf8", "mc_questions.json", lambda p: p.write_bytes(b"\xc3\x28"), r"mc_questions\.json is not UTF-8 text"),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_benchmark_files_exit_2_naming_file_item_and_field(case, tiny_data, tiny_model_dir, tmp_path, capsys):
    _, name, damage, message = case
    data = shutil.copytree(tiny_data, tmp_path / "data")
    damage(data / name)
    out = tmp_path / "out"
    code = main(["erase", "--concept", "Golf", "--data", str(data), "--model", str(tiny_model_dir),
                 "--out", str(out), *FAST_ERASE])
    assert_refused(code, capsys, message, out)


def assert_refused(code: int, capsys, message: str, out: Path) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def erase_custom(tmp_path: Path, tiny_data: Path, model: Path, sentences: Path, *extra: str) -> list[str]:
    return ["erase", "--concept", "Pottery", "--concept-sentences", str(sentences), "--data", str(tiny_data),
            "--model", str(model), "--out", str(tmp_path / "out"), *FAST_ERASE, *extra]


def pottery(tmp_path: Path) -> Path:
    path = tmp_path / "pottery.txt"
    path.write_text("\n".join(f"The potter shapes clay vessel {i} on the wheel." for i in range(8)), encoding="utf-8")
    return path


def test_custom_files_with_bad_bytes_keys_or_answers_exit_2(tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("\n".join(f"Caf\u00e9 number {i}" for i in range(8)).encode("latin-1"))
    assert_refused(main(erase_custom(tmp_path, tiny_data, tiny_model_dir, latin1)), capsys,
                   r"latin1\.txt is not UTF-8 text", out)
    assert_refused(main(erase_custom(tmp_path, tiny_data, tiny_model_dir, tmp_path / "nope.txt")), capsys,
                   r"nope\.txt does not exist", out)
    questions = tmp_path / "questions.json"
    questions.write_text('{"QA_train": [{"q": "a?", "q": "b?", "options": ["x", "y"], "correct_answer": "x"}], '
                         '"QA_test": []}')
    assert_refused(main(erase_custom(tmp_path, tiny_data, tiny_model_dir, pottery(tmp_path), "--questions",
                                     str(questions))), capsys, r"questions\.json.*repeats the key\(s\) 'q'", out)
    general = tmp_path / "mmlu.json"
    general.write_text(json.dumps([{"question": "q?", "choices": ["a", "b"], "answer": "E"}] * 4))
    assert_refused(main(["erase", "--concept", "Golf", "--data", str(tiny_data), "--model", str(tiny_model_dir),
                         "--general-questions-file", str(general), "--out", str(out), *FAST_ERASE]), capsys,
                   r"mmlu\.json.*the question list\[0\] needs 'correct_answer'", out)
    assert_refused(main(["erase", "--concept", "Quidditch", "--data", str(tiny_data), "--model", str(tiny_model_dir),
                         "--out", str(out)]), capsys, r"'Quidditch' is not in the benchmark", out)


def model_copy(tiny_model_dir: Path, tmp_path: Path, damage) -> Path:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    damage(folder)
    return folder


def to_pickle(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


MODEL_CASES = [
    ("pickle-only", to_pickle, r"only pickle weights \(pytorch_model\.bin\).*--allow-pickle"),
    ("no-tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
     r"model has no tokenizer files \(expected one of tokenizer\.json"),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), r"model has no weights: expected \*\.safetensors"),
    ("truncated-weights", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]),
     r"Could not load model .*model.*deserializing header"),
    ("config-not-json", lambda f: (f / "config.json").write_text("{oops"), r"config\.json' is not a valid JSON"),
    ("unknown-architecture", lambda f: edit_json(f, "config.json", lambda c: c.update(model_type="no-such-arch")),
     r"Could not load model .*no-such-arch"),
    ("no-config", lambda f: (f / "config.json").unlink(), r"model has no config\.json"),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folders_exit_2_naming_the_folder(case, tiny_data, tiny_model_dir, tmp_path, capsys):
    _, damage, message = case
    model = model_copy(tiny_model_dir, tmp_path, damage)
    out = tmp_path / "out"
    code = main(["erase", "--concept", "Golf", "--data", str(tiny_data), "--model", str(model), "--out", str(out),
                 *FAST_ERASE])
    assert_refused(code, capsys, message, out)


def test_pickle_weights_load_only_when_allowed(tiny_model_dir, tmp_path):
    from obliviate.models.loading import load_model

    model = model_copy(tiny_model_dir, tmp_path, to_pickle)
    with pytest.raises(ObliviateError, match="--allow-pickle"):
        load_model(str(model))
    allowed = load_model(str(model), allow_pickle=True)
    reference = load_model(str(tiny_model_dir))
    assert torch.equal(allowed.model.get_input_embeddings().weight, reference.model.get_input_embeddings().weight)


def test_remote_code_is_never_trusted(tiny_model_dir, tmp_path):
    """A folder whose config asks for its own Python code is refused, the code not run."""
    model = model_copy(tiny_model_dir, tmp_path, lambda f: edit_json(
        f, "config.json", lambda c: c.update(auto_map={"AutoModelForCausalLM": "evil.Model"})))
    (model / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    from obliviate.models.loading import load_model

    try:
        load_model(str(model))
    except ObliviateError:
        pass  # refusing is fine; running evil.py is not
    assert not (tmp_path / "ran").exists()


def eco_artifact(lm, folder: Path) -> Path:
    d = lm.model.config.hidden_size
    classifier = PromptClassifier(torch.randn(d), torch.zeros(1), torch.zeros(d), torch.ones(d), 1, 0.5)
    EcoArtifact(classifier, Corruption("gaussian", 0, 3.0), lm.name, lm.source, model_identity(lm.model),
                probe_rows(lm.model), (), 0, {"concept": "Golf"}).save(folder)
    return folder


def break_tensor(name: str, value: torch.Tensor):
    def damage(folder: Path) -> None:
        tensors, metadata = io.load_tensors(folder / "classifier.safetensors", "test")
        io.save_tensors(folder / "classifier.safetensors", {**tensors, name: value}, metadata)
    return damage


ECO_CASES = [
    ("another-model", lambda f: None, r"made for model tiny-gemma3 \(config\), not for /.*tiny-gemma3"),
    ("wrong-shape", break_tensor("weight", torch.zeros(7)), r"damaged ECO artifact.*'weight' is torch\.float32 \(7,\)"),
    ("wrong-dtype", break_tensor("mean", torch.zeros(32, dtype=torch.int64)), r"'mean' is torch\.int64 \(32,\)"),
    ("nan", break_tensor("std", torch.full((32,), float("nan"))), r"'std' holds NaN or infinite values"),
    ("missing-tensor", lambda f: io.save_tensors(f / "classifier.safetensors", {"weight": torch.zeros(32)}),
     r"has no tensor 'bias'"),
    ("wrong-format", lambda f: edit_json(f, "config.json", lambda c: c.update(format="other/9")),
     r"config\.json has format 'other/9'"),
    ("layer-out-of-range", lambda f: edit_json(f, "config.json", lambda c: c["classifier"].update(layer=99)),
     r"classifier layer 99 is outside 0\.\.4"),
    ("not-safetensors", lambda f: (f / "classifier.safetensors").write_bytes(b"garbage"),
     r"classifier\.safetensors is not a readable safetensors file"),
]


@pytest.mark.parametrize("case", ECO_CASES, ids=[c[0] for c in ECO_CASES])
def test_bad_eco_artifacts_exit_2_before_use(case, tiny_data, tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    _, damage, message = case
    other = make_tiny_lm(tiny_tokenizer, "gemma3", seed=1)  # same shapes, other weights
    artifact = eco_artifact(other, tmp_path / "eco")
    damage(artifact)
    out = tmp_path / "out"
    code = main(["eco", "evaluate", "--eco", str(artifact), "--concept", "Golf", "--data", str(tiny_data),
                 "--model", str(tiny_model_dir), "--out", str(out), "--bootstrap", "20"])
    assert_refused(code, capsys, message, out)


def test_out_that_is_a_file_exits_2_and_is_left_alone(tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("mine")
    code = main(["erase", "--concept", "Golf", "--data", str(tiny_data), "--model", str(tiny_model_dir),
                 "--out", str(out), *FAST_ERASE])
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot write {out}" in err and "a file stands where a folder" in err, err
    assert out.read_text() == "mine"


def failing(code: int, real):
    """os.replace that fails with ``code`` for files under an ``out`` folder, as a full disk would."""
    def replace(src, dst, *args, **kwargs):
        if "out" in Path(dst).parts:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *args, **kwargs)
    return replace


@pytest.mark.parametrize("code,advice", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied")])
def test_write_errors_mid_run_exit_2_naming_the_path_and_leave_nothing(code, advice, tiny_data, tiny_model_dir,
                                                                        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "replace", failing(code, os.replace))
    out = tmp_path / "out"
    exit_code = main(["erase", "--concept", "Golf", "--data", str(tiny_data), "--model", str(tiny_model_dir),
                      "--out", str(out), "--no-save-model", *FAST_ERASE])
    assert_refused(exit_code, capsys, rf"Cannot write {out}/\.checkpoint\.json: {advice}", out)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_read_only_folder_exits_2_naming_it(tiny_data, tiny_model_dir, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "out"
    if os.geteuid() == 0:  # root writes through chmod: refuse writes there as a read-only disk would
        real_open, real_os_open = open, os.open

        def read_only(path, write: bool):
            if write and Path(path).parent == parent:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        def fake_open(path, mode="r", *args, **kwargs):
            read_only(path, any(c in mode for c in "wax+"))
            return real_open(path, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            read_only(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr("builtins.open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
    else:
        parent.chmod(0o500)
    try:
        code = main(["erase", "--concept", "Golf", "--data", str(tiny_data), "--model", str(tiny_model_dir),
                     "--out", str(out), *FAST_ERASE])
    finally:
        parent.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot write {parent}" in err and ("read-only" in err or "permission denied" in err), err
    assert not out.exists() and not list(parent.iterdir())


def test_write_json_on_a_full_disk_leaves_neither_file_nor_temp(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", failing(errno.ENOSPC, os.replace))
    with pytest.raises(ObliviateError, match=rf"Cannot write {tmp_path}/out/r\.json: the disk is full"):
        io.write_json(tmp_path / "out" / "r.json", {"a": 1})
    assert list((tmp_path / "out").iterdir()) == []


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from obliviate.io import output_lock
    with output_lock(sys.argv[1], "obliviate erase --concept Golf --out busy"):
        print("locked", flush=True)
        time.sleep(120)
""")


def hold_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_naming_the_first(tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        code = main(["erase", "--concept", "Golf", "--data", str(tiny_data), "--model", str(tiny_model_dir),
                     "--out", str(out), *FAST_ERASE])
        assert_refused(code, capsys, rf"Output folder {out} is being written by process {holder.pid} "
                                     r"\(obliviate erase --concept Golf --out busy\)", out)
        code = main(["eco", "fit", "--concept", "Golf", "--data", str(tiny_data), "--model", str(tiny_model_dir),
                     "--out", str(out)])
        assert_refused(code, capsys, rf"being written by process {holder.pid}", out)
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path / "out")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in io.lock_path(tmp_path / "out").read_text()  # the dead writer's name is still there
    with io.output_lock(tmp_path / "out", "second"):
        assert json.loads(io.lock_path(tmp_path / "out").read_text()) == {"pid": os.getpid(), "command": "second"}


def test_leftovers_of_a_killed_writer_are_removed_under_the_lock(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "relearn" / "original").mkdir(parents=True)
    (out / "kept").mkdir()
    (out / "..checkpoint.json.abc123.tmp").write_text("{")
    (out / "kept" / ".state.json.x.tmp").write_text("{")
    (out / "kept" / "notes.tmp").write_text("the user's own file")
    with io.exclusive_output(out, "test"):
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["kept", "kept/notes.tmp"]


SAVE = textwrap.dedent("""
    import sys, torch
    from obliviate.io import save_tensors
    save_tensors(sys.argv[1], {"b": torch.arange(6.0), "a": torch.ones(2, 3)},
                 {name: str(i) for i, name in enumerate("qwertyuiopasdfgh")})
""")


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """Before: metadata with several keys came out in a different order in every process."""
    for name in ("one", "two", "three"):
        subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / f"{name}.safetensors")], check=True)
    first = (tmp_path / "one.safetensors").read_bytes()
    assert (tmp_path / "two.safetensors").read_bytes() == first == (tmp_path / "three.safetensors").read_bytes()
    tensors, metadata = io.load_tensors(tmp_path / "one.safetensors", "test")
    assert metadata == {name: str(i) for i, name in enumerate("qwertyuiopasdfgh")}
    assert torch.equal(tensors["b"], torch.arange(6.0))


def test_finished_files_get_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
