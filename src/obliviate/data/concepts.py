"""Benchmark and user-concept loading, with schema checks that name the file and field.

The EMBER benchmark folder holds concept_sentences.json, neutral_sentences.json,
mc_questions.json, open_questions.json, coherency_prompts.json and, optionally,
relearn_paragraphs.json (see its README); the package ships one without the last
(``obliviate.data.benchmark_dir``), the default ``--data``. A user concept comes as a
sentences file plus, optionally, questions in the benchmark's schema. Concept names are
matched without regard to case, in one place: ``resolve_concept``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from obliviate.errors import ObliviateError

MC_SPLITS = {"qa_train": "QA_train", "qa_test": "QA_test", "simdom_train": "SimdomQA_train", "simdom_test": "SimdomQA_test"}
MIN_SENTENCES = 5
# Longer than any sentence, question or paragraph in the benchmark (max ~750 characters) by
# far; a bigger string is a wrong file or field, not text to tokenize for minutes.
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True)
class MCQuestion:
    question: str
    options: tuple[str, ...]
    answer: int  # index of the correct option in ``options``


@dataclass(frozen=True)
class OpenQuestion:
    question: str
    answer: str


@dataclass
class ConceptData:
    """Everything about one concept that erasure and evaluation need."""

    concept: str
    concept_sentences: list[str]
    neutral_sentences: list[str]
    # Other concepts' sentences: negatives that make "concept-only" mean this concept,
    # not the genre of encyclopedic text about any concept.
    contrast_sentences: list[str] = field(default_factory=list)
    questions: dict[str, list[MCQuestion]] = field(default_factory=dict)  # keys of MC_SPLITS
    general: dict[str, list[MCQuestion]] = field(default_factory=dict)  # "train" / "test"
    general_source: str = "none"
    coherency_prompts: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    # Prompts NOT about the concept, for coherence (METHOD.md section 4): "train" / "test".
    general_prompts: dict[str, list[str]] = field(default_factory=dict)
    general_prompt_source: str = "none"

    @property
    def has_questions(self) -> bool:
        return bool(self.questions.get("qa_train")) and bool(self.questions.get("qa_test"))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ObliviateError(f"Data file {path} is missing: --data must name a folder in the EMBER benchmark's "
                             "format (leave --data out to use the benchmark shipped with obliviate).")
    try:
        return json.loads(_read_text(path), object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
    except json.JSONDecodeError as err:
        raise ObliviateError(f"Data file {path} is not valid JSON (line {err.lineno}): {err.msg}.") from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ObliviateError(f"Data file {path} is not UTF-8 text (byte {err.start}: {err.reason}): save it as UTF-8.") from err


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict:
    """A JSON object whose keys are unique (json.loads would silently keep the last one)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1}) if len(set(keys)) < len(keys) else []
    _require(not repeated, path, f"an object repeats the key(s) {', '.join(map(repr, repeated))}")
    return dict(pairs)


def _check_text(value: Any, path: Path, field_at: str) -> None:
    """A non-empty string of at most MAX_TEXT_CHARS characters."""
    _require(isinstance(value, str), path, f"{field_at} must be a string, not {type(value).__name__}")
    _require(value.strip() != "", path, f"{field_at} is empty")
    _require(len(value) <= MAX_TEXT_CHARS, path, f"{field_at} has {len(value)} characters (limit {MAX_TEXT_CHARS})")


def _require(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise ObliviateError(f"Data file {path} is malformed: {what}. See the benchmark README for the schema.")


def _clean_sentences(sentences: list[Any], path: Path, what: str) -> list[str]:
    _require(isinstance(sentences, list), path, f"{what} must be a list of strings")
    for index, sentence in enumerate(sentences):
        _require(isinstance(sentence, str), path, f"{what}[{index}] must be a string, not {type(sentence).__name__}")
        _require(len(sentence) <= MAX_TEXT_CHARS, path,
                 f"{what}[{index}] has {len(sentence)} characters (limit {MAX_TEXT_CHARS})")
    cleaned = [s.strip() for s in sentences if s.strip()]
    if len(cleaned) < MIN_SENTENCES:
        raise ObliviateError(
            f"{path}: {what} has {len(cleaned)} non-empty sentences; at least {MIN_SENTENCES} are needed "
            "(the reference uses about 300)."
        )
    return cleaned


def parse_mc_questions(items: Any, path: Path, where: str) -> list[MCQuestion]:
    """Benchmark schema {q, correct_answer, options} or MMLU's {question, choices, answer}."""
    _require(isinstance(items, list), path, f"{where} must be a list of questions")
    questions = []
    for index, item in enumerate(items):
        field_at = f"{where}[{index}]"
        _require(isinstance(item, dict), path, f"{field_at} must be an object")
        text_key = "q" if "q" in item or "question" not in item else "question"
        options_key = "options" if "options" in item or "choices" not in item else "choices"
        text, options = item.get(text_key), item.get(options_key)
        _check_text(text, path, f"{field_at}.{text_key}")
        _require(isinstance(options, list) and len(options) >= 2, path,
                 f"{field_at}.{options_key} must be a list of at least 2 strings")
        for option_index, option in enumerate(options):
            _check_text(option, path, f"{field_at}.{options_key}[{option_index}]")
        _require(len(set(options)) == len(options), path, f"{field_at}.{options_key} lists the same option twice")
        if "correct_answer" in item:
            _require(item["correct_answer"] in options, path, f"{field_at}.correct_answer is not one of its options")
            answer = options.index(item["correct_answer"])
        else:
            answer = item.get("answer")
            if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
                answer = ord(answer.upper()) - ord("A")
            valid = isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options)
            _require(valid, path, f"{field_at} needs 'correct_answer' (or 'answer', an option index or letter)")
        questions.append(MCQuestion(text.strip(), tuple(options), answer))
    return questions


def parse_open_questions(items: Any, path: Path, where: str) -> list[OpenQuestion]:
    _require(isinstance(items, list), path, f"{where} must be a list")
    out = []
    for index, item in enumerate(items):
        _require(isinstance(item, dict), path, f"{where}[{index}] must be an object with string fields 'q' and 'a'")
        for key in ("q", "a"):
            _check_text(item.get(key), path, f"{where}[{index}].{key}")
        out.append(OpenQuestion(item["q"].strip(), item["a"].strip()))
    return out


def check_data_dir(data_dir: str | Path) -> Path:
    """``data_dir`` as a Path, if it is a folder (a clear error for a file or a wrong path)."""
    path = Path(data_dir)
    if path.is_dir():
        return path
    if path.exists():
        raise ObliviateError(f"--data {path} is a file: it must be a folder holding the benchmark's files "
                             "(concept_sentences.json, mc_questions.json, ...), or leave --data out to use the "
                             "EMBER benchmark shipped with obliviate.")
    raise ObliviateError(f"Data folder {path} does not exist: check the path, or leave --data out to use the "
                         "EMBER benchmark shipped with obliviate.")


def resolve_concept(concept: str, available: Collection[str]) -> str:
    """The name in ``available`` that ``concept`` means: itself, else the one that matches
    without regard to case (`gambling` -> "Gambling"); a clear error listing them otherwise."""
    if concept in available:
        return concept
    matches = [name for name in available if name.casefold() == concept.strip().casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ObliviateError(f"Concept {concept!r} matches {', '.join(map(repr, sorted(matches)))} "
                             "(they differ only in case): give the exact name.")
    raise _unknown_concept(concept, list(available))


def _canonical(names: Collection[str], available: Collection[str]) -> set[str]:
    """``names`` as spelled in ``available`` where they match it without regard to case
    (a concept of the user's own, in no benchmark, stays as it is)."""
    folded = {name.casefold(): name for name in available}
    return {name if name in available else folded.get(name.strip().casefold(), name) for name in names}


def list_concepts(data_dir: str | Path) -> list[str]:
    path = check_data_dir(data_dir) / "concept_sentences.json"
    entries = _read_json(path)
    _require(isinstance(entries, list), path, "the top level must be a list of {concept, sentences}")
    _require(all(isinstance(e, dict) and "concept" in e for e in entries), path, "every entry needs 'concept'")
    return [entry["concept"] for entry in entries]


def _unknown_concept(concept: str, available: list[str]) -> ObliviateError:
    return ObliviateError(
        f"Concept {concept!r} is not in the benchmark. Available: {', '.join(sorted(available))} "
        "(case does not matter; `obliviate concepts` lists them). "
        "For another concept pass --concept-sentences FILE (and optionally --questions FILE)."
    )


def _benchmark_sentences(data_dir: Path) -> dict[str, list[str]]:
    path = data_dir / "concept_sentences.json"
    entries = _read_json(path)
    _require(isinstance(entries, list), path, "the top level must be a list of {concept, sentences}")
    out = {}
    for index, entry in enumerate(entries):
        _require(isinstance(entry, dict) and isinstance(entry.get("concept"), str), path, f"entry {index} needs 'concept'")
        _require(entry["concept"] not in out, path, f"entry {index}: concept {entry['concept']!r} appears twice")
        out[entry["concept"]] = _clean_sentences(entry.get("sentences"), path, f"entry {index}.sentences")
    return out


@dataclass(frozen=True)
class ConceptSizes:
    """How much data a benchmark folder holds for one concept (``obliviate concepts``)."""

    concept: str
    sentences: int
    qa_train: int
    qa_test: int
    open_questions: int | None  # QA_train + QA_test of open_questions.json; None without the file


def concept_sizes(data_dir: str | Path) -> list[ConceptSizes]:
    """Every concept of a benchmark folder with its sizes, read and validated as a run reads
    them (a malformed folder fails here, not minutes into a run)."""
    data_dir = check_data_dir(data_dir)
    sentences = _benchmark_sentences(data_dir)
    mc_path = data_dir / "mc_questions.json"
    mc_raw = _read_json(mc_path)
    _require(isinstance(mc_raw, dict), mc_path, "the top level must map concept names to splits")
    open_path = data_dir / "open_questions.json"
    open_raw = _read_json(open_path) if open_path.is_file() else None
    _require(open_raw is None or isinstance(open_raw, dict), open_path,
             "the top level must map concept names to splits")
    sizes = []
    for concept, group in sentences.items():
        mc = _mc_splits(mc_raw[concept], mc_path, concept) if concept in mc_raw else {}
        opened = None
        if open_raw is not None and isinstance(open_raw.get(concept), dict):
            opened = sum(len(parse_open_questions(open_raw[concept].get(split, []), open_path, f"{concept}.{split}"))
                         for split in ("QA_train", "QA_test"))
        sizes.append(ConceptSizes(concept, len(group), len(mc.get("qa_train", [])), len(mc.get("qa_test", [])), opened))
    return sizes


def load_neutral_sentences(path: str | Path) -> list[str]:
    """The benchmark's list of {url, title, sentence}, a JSON list of strings, or a text file."""
    path = Path(path)
    if path.suffix == ".json":
        items = _read_json(path)
        if isinstance(items, list) and items and isinstance(items[0], dict):
            _require(all("sentence" in item for item in items), path, "every entry needs 'sentence'")
            items = [item["sentence"] for item in items]
        return _clean_sentences(items, path, "the sentence list")
    return load_sentence_file(path)


def load_sentence_file(path: str | Path) -> list[str]:
    """One sentence a line, or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise ObliviateError(f"Sentence file {path} does not exist: check the path.")
    if path.suffix == ".json":
        return _clean_sentences(_read_json(path), path, "the sentence list")
    return _clean_sentences(_read_text(path).splitlines(), path, "the sentence lines")


def _mc_splits(entry: Any, path: Path, where: str) -> dict[str, list[MCQuestion]]:
    _require(isinstance(entry, dict), path, f"{where} must map split names to question lists")
    splits = {}
    for ours, theirs in MC_SPLITS.items():
        if theirs in entry:
            splits[ours] = parse_mc_questions(entry[theirs], path, f"{where}.{theirs}")
    _require("QA_train" in entry and "QA_test" in entry, path, f"{where} needs the splits QA_train and QA_test")
    return splits


def _excluded(exclude: str | Collection[str], available: Collection[str]) -> set[str]:
    return _canonical({exclude} if isinstance(exclude, str) else set(exclude), available)


def sample_general_questions(
    mc_by_concept: dict[str, dict[str, list[MCQuestion]]], exclude: str | Collection[str], per_split: int, seed: int
) -> dict[str, list[MCQuestion]]:
    """General knowledge = the OTHER concepts' QA questions (MMLU is not available offline);
    ``exclude``: the concept(s) being erased.

    Sampled evenly across the other concepts with a fixed seed so the set is the same in
    every run.
    """
    excluded = _excluded(exclude, mc_by_concept)
    others = sorted(name for name in mc_by_concept if name not in excluded)
    rng = random.Random(seed)
    return {split: _round_robin([list(mc_by_concept[name].get(f"qa_{split}", [])) for name in others], per_split, rng)
            for split in ("train", "test")}


def _round_robin(pools: list[list], count: int, rng: random.Random) -> list:
    """Up to ``count`` items taken evenly from shuffled pools (one from each in turn)."""
    for pool in pools:
        rng.shuffle(pool)
    picked: list = []
    depth = 0
    while len(picked) < count and any(depth < len(pool) for pool in pools):
        picked.extend(pool[depth] for pool in pools if depth < len(pool))
        depth += 1
    return picked[:count]


def load_general_file(path: str | Path, seed: int) -> dict[str, list[MCQuestion]]:
    """An MMLU-style file: {"train": [...], "test": [...]} or one list split in half."""
    path = Path(path)
    payload = _read_json(path)
    if isinstance(payload, dict):
        _require("train" in payload and "test" in payload, path, "an object needs 'train' and 'test' lists")
        return {split: parse_mc_questions(payload[split], path, split) for split in ("train", "test")}
    questions = parse_mc_questions(payload, path, "the question list")
    random.Random(seed).shuffle(questions)
    half = len(questions) // 2
    return {"train": questions[:half], "test": questions[half:]}


def load_benchmark_concept(
    concept: str,
    data_dir: str | Path,
    general_questions: int = 100,
    general_file: str | Path | None = None,
    seed: int = 42,
    erased_too: Collection[str] = (),
) -> ConceptData:
    """One concept of the EMBER benchmark, with other concepts as contrast and general sets
    (``erased_too``: concepts erased from the same model, in neither)."""
    data_dir = check_data_dir(data_dir)
    sentences = _benchmark_sentences(data_dir)
    concept = resolve_concept(concept, sentences)
    excluded = _canonical({concept, *erased_too}, sentences)
    mc_path = data_dir / "mc_questions.json"
    mc_raw = _read_json(mc_path)
    _require(isinstance(mc_raw, dict), mc_path, "the top level must map concept names to splits")
    if concept not in mc_raw:
        raise ObliviateError(f"{mc_path} has no questions for {concept!r}; its concepts: {', '.join(sorted(mc_raw))}.")
    mc = {name: _mc_splits(entry, mc_path, name) for name, entry in mc_raw.items()}
    if general_file:
        general, source = load_general_file(general_file, seed), f"file:{general_file}"
    else:
        general = sample_general_questions(mc, excluded, general_questions, seed)
        source = f"other benchmark concepts' QA ({general_questions} per split)"
    coherency_path = data_dir / "coherency_prompts.json"
    coherency = _read_json(coherency_path)
    _require(isinstance(coherency, dict), coherency_path, "the top level must map concepts to prompt lists")
    return ConceptData(
        concept=concept,
        concept_sentences=sentences[concept],
        neutral_sentences=load_neutral_sentences(data_dir / "neutral_sentences.json"),
        contrast_sentences=[s for name, group in sentences.items() if name not in excluded for s in group],
        questions=mc[concept],
        general=general,
        general_source=source,
        coherency_prompts=_clean_sentences(coherency.get(concept, []), coherency_path, concept)
        if concept in coherency
        else [],
        data_dir=data_dir,
    )


def load_user_concept(
    concept: str,
    concept_sentences: str | Path,
    neutral_sentences: str | Path | None = None,
    data_dir: str | Path | None = None,
    questions: str | Path | None = None,
    coherency_prompts: str | Path | None = None,
    general_file: str | Path | None = None,
    general_questions: int = 100,
    seed: int = 42,
    erased_too: Collection[str] = (),
) -> ConceptData:
    """A concept the benchmark does not have: the user's sentences (and maybe questions)."""
    excluded = {concept, *erased_too}
    if data_dir is not None:
        data_dir = check_data_dir(data_dir)
    if neutral_sentences is None:
        if data_dir is None:
            raise ObliviateError("A custom concept needs neutral sentences: pass --neutral-sentences FILE or --data DIR.")
        neutral_sentences = Path(data_dir) / "neutral_sentences.json"
    data = ConceptData(
        concept=concept,
        concept_sentences=load_sentence_file(concept_sentences),
        neutral_sentences=load_neutral_sentences(neutral_sentences),
        data_dir=Path(data_dir) if data_dir else None,
    )
    if data_dir is not None and (Path(data_dir) / "concept_sentences.json").exists():
        others = _benchmark_sentences(Path(data_dir))
        excluded = _canonical(excluded, others)
        data.contrast_sentences = [s for name, group in others.items() if name not in excluded for s in group]
    if questions is not None:
        path = Path(questions)
        payload = _read_json(path)
        named = _canonical({concept}, payload).pop() if isinstance(payload, dict) else None
        if isinstance(payload, dict) and named in payload:
            payload = payload[named]
        data.questions = _mc_splits(payload, path, concept)
    if general_file is not None:
        data.general, data.general_source = load_general_file(general_file, seed), f"file:{general_file}"
    elif data_dir is not None and (Path(data_dir) / "mc_questions.json").exists():
        mc_raw = _read_json(Path(data_dir) / "mc_questions.json")
        mc = {name: _mc_splits(entry, Path(data_dir) / "mc_questions.json", name) for name, entry in mc_raw.items()}
        data.general = sample_general_questions(mc, excluded, general_questions, seed)
        data.general_source = f"benchmark concepts' QA ({general_questions} per split)"
    if coherency_prompts is not None:
        data.coherency_prompts = load_sentence_file(coherency_prompts)
    return data


def load_open_questions(data_dir: str | Path, concept: str) -> dict[str, list[OpenQuestion]]:
    path = check_data_dir(data_dir) / "open_questions.json"
    payload = _read_json(path)
    _require(isinstance(payload, dict), path, "the top level must map concept names to splits")
    concept = resolve_concept(concept, payload)
    return {ours: parse_open_questions(payload[concept][theirs], path, f"{concept}.{theirs}")
            for ours, theirs in MC_SPLITS.items() if theirs in payload[concept]}


def load_relearn_paragraphs(data_dir: str | Path, concept: str, limit: int = 100) -> list[str]:
    """The relearning attack's text: the first ``limit`` paragraphs (the paper uses 100)."""
    path = check_data_dir(data_dir) / "relearn_paragraphs.json"
    payload = _read_json(path)
    _require(isinstance(payload, dict), path, "the top level must map concept names to {RelearnParagraphs}")
    concept = resolve_concept(concept, payload)
    paragraphs = payload[concept].get("RelearnParagraphs")
    return _clean_sentences(paragraphs, path, f"{concept}.RelearnParagraphs")[:limit]


# General prompts for coherence: the OTHER concepts' open questions in the benchmark's
# open-ended format, plus openings of neutral sentences (Alpaca is not available offline).
GENERAL_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
MAX_PROMPT_CHARS = 4000


def sample_general_prompts(data_dir: str | Path, exclude: str | Collection[str], per_split: int,
                           seed: int) -> dict[str, list[str]]:
    """Other concepts' open questions as prompts, sampled evenly across concepts per split."""
    path = Path(data_dir) / "open_questions.json"
    payload = _read_json(path)
    _require(isinstance(payload, dict), path, "the top level must map concept names to splits")
    rng = random.Random(seed)
    excluded = _excluded(exclude, payload)
    prompts = {}
    for split in ("train", "test"):
        pools = [[GENERAL_PROMPT_TEMPLATE.format(question=q.question)
                  for q in parse_open_questions(payload[name].get(f"QA_{split}", []), path, f"{name}.QA_{split}")]
                 for name in sorted(payload) if name not in excluded]
        prompts[split] = _round_robin(pools, per_split, rng)
    return prompts


def neutral_openings(sentences: list[str], count: int) -> dict[str, list[str]]:
    """The first half (by words) of ``count`` neutral sentences per split, as prompts to continue."""
    def opening(sentence: str) -> str:
        words = sentence.split()
        return " ".join(words[: max(3, len(words) // 2)])
    return {"train": [opening(s) for s in sentences[:count]],
            "test": [opening(s) for s in sentences[count: 2 * count]]}


def load_prompt_file(path: str | Path, seed: int) -> dict[str, list[str]]:
    """A user's general prompts: Alpaca-style JSON ([{instruction, input}...]), a JSON list
    of strings, or one prompt a line; shuffled with the seed and split in half (train, test)."""
    path = Path(path)
    if not path.is_file():
        raise ObliviateError(f"Prompts file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ObliviateError(f"Prompts file {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from err
    prompts = _parse_prompts(text, path)
    if len(prompts) < 2:
        raise ObliviateError(f"Prompts file {path} holds {len(prompts)} prompt(s): give at least 2 (half for the "
                             "grid on train questions, half for the final test numbers).")
    random.Random(seed).shuffle(prompts)
    half = len(prompts) // 2
    return {"train": prompts[:half], "test": prompts[half:]}


def _parse_prompts(text: str, path: Path) -> list[str]:
    stripped = text.lstrip()
    if not stripped.startswith(("[", "{")):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise ObliviateError(f"Prompts file {path} is not valid JSON (line {err.lineno}: {err.msg}).") from err
    _require(isinstance(payload, list), path, "a JSON prompts file must hold a list")
    return [_prompt_item(item, path, index) for index, item in enumerate(payload)]


def _prompt_item(item: Any, path: Path, index: int) -> str:
    if isinstance(item, dict):
        _require(isinstance(item.get("instruction"), str) and item["instruction"].strip(), path,
                 f"item {index} needs a non-empty 'instruction' string")
        extra = item.get("input") or ""
        _require(isinstance(extra, str), path, f"item {index}: 'input' must be a string")
        prompt = f"Instruction: {item['instruction'].strip()}\n" + (f"Input: {extra.strip()}\n" if extra.strip() else "") + "Response:"
    else:
        _require(isinstance(item, str) and item.strip(), path, f"item {index} must be a non-empty string or an "
                 "object with 'instruction' (and optional 'input')")
        prompt = item.strip()
    _require(len(prompt) <= MAX_PROMPT_CHARS, path, f"item {index} is longer than {MAX_PROMPT_CHARS} characters")
    return prompt


def attach_general_prompts(data: ConceptData, prompts_file: str | Path | None, per_split: int,
                           neutral_count: int, seed: int, erased_too: Collection[str] = ()) -> None:
    """Fill ``data.general_prompts``: the user's file, else other concepts' open questions
    (when the benchmark folder has them) plus neutral openings."""
    if prompts_file:
        data.general_prompts, data.general_prompt_source = load_prompt_file(prompts_file, seed), f"file:{prompts_file}"
        return
    openings = neutral_openings(data.neutral_sentences, neutral_count)
    questions: dict[str, list[str]] = {"train": [], "test": []}
    if data.data_dir is not None and (Path(data.data_dir) / "open_questions.json").is_file() and per_split > 0:
        questions = sample_general_prompts(data.data_dir, {data.concept, *erased_too}, per_split, seed)
    data.general_prompts = {split: questions[split] + openings[split] for split in ("train", "test")}
    data.general_prompt_source = (f"other concepts' open questions ({len(questions['train'])} train / "
                                  f"{len(questions['test'])} test) + {neutral_count} neutral sentence openings per split")


def merge_concepts(datas: list[ConceptData]) -> ConceptData:
    """Several concepts erased at once, as one: the union of their sentences, questions and
    own prompts (what a trained method forgets and is judged on); general knowledge, general
    prompts and neutral text from the first (each already excludes every erased concept)."""
    first = datas[0]
    splits = {split for data in datas for split in data.questions}
    return ConceptData(
        concept=" + ".join(data.concept for data in datas),
        concept_sentences=[s for data in datas for s in data.concept_sentences],
        neutral_sentences=first.neutral_sentences,
        contrast_sentences=first.contrast_sentences,
        questions={split: [q for data in datas for q in data.questions.get(split, [])] for split in splits},
        general=first.general, general_source=first.general_source,
        coherency_prompts=[p for data in datas for p in data.coherency_prompts],
        data_dir=first.data_dir, general_prompts=first.general_prompts,
        general_prompt_source=first.general_prompt_source,
    )
