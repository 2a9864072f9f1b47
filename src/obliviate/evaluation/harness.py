"""lm-evaluation-harness, both ways.

1. ``run_harness``: any harness tasks on the original and the erased model, side by side,
   with the harness's own standard errors. The in-memory models go through the harness's
   HF wrapper (``HFLM(pretrained=model, tokenizer=...)``), so an edit applied in memory (an
   embedding patch, an ECO hook) is what gets scored, with no model folder written.
2. ``write_task_folder``: the EMBER benchmark as an lm-eval task folder
   (``lm_eval --include_path DIR --tasks ember_qa``), built from a benchmark folder on disk.
   It holds the questions as JSON and a small ``utils.py`` that reads them: no hub, no
   ``datasets`` cache, and the folder can be moved.

The task scores like ``obliviate.evaluation.multiple_choice`` in ``loglik`` mode: context
"Question: {q}\\nAnswer:", continuation " {option}", options in our shuffled order (same
seed), and the harness's ``acc_norm`` (log-likelihood over the continuation's characters,
leading space included: the target delimiter is empty and the space is part of the choice)
is our accuracy. ``acc`` is the raw-sum variant.

The harness is an optional dependency (``pip install "obliviate[lm-eval]"``); it is imported
only here, lazily.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

from obliviate.data.concepts import list_concepts, load_benchmark_concept
from obliviate.errors import ObliviateError
from obliviate.evaluation.multiple_choice import shuffled_order
from obliviate.models.loading import LoadedModel

Z95 = 1.959963984540054  # normal 97.5% quantile: value +/- Z95 * stderr is the 95% interval
DEFAULT_SEED = 42  # the option shuffle of `obliviate erase/eval` (RunConfig.seed)
TASK_VERSION = 1.0
UTILS_PY = '''"""Written by `obliviate lm-eval-tasks`: reads this folder's JSON files (offline, no hub)."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(file, **_):
    """The splits of one concept's JSON file as a DatasetDict (custom_dataset of the tasks)."""
    payload = json.loads((HERE / file).read_text(encoding="utf-8"))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in payload.items()})


def choices(doc):
    """" {option}": the leading space belongs to the choice, so acc_norm divides by the same
    character count as obliviate (len(option) + 1) and the target delimiter is empty."""
    return [" " + option for option in doc["choices"]]
'''


# ---- the task folder ---------------------------------------------------------------

def slug(concept: str) -> str:
    """A task-name-safe form of a concept ("Valentine's Day" -> "valentines_day")."""
    return re.sub(r"[^a-z0-9]+", "_", concept.lower().replace("'", "")).strip("_")


def _docs(questions, seed: int) -> list[dict]:
    """Options in the order obliviate scores them (``shuffled_order``), answer as an index."""
    rows = []
    for question in questions:
        order = shuffled_order(question, seed)
        rows.append({"question": question.question, "choices": [question.options[i] for i in order],
                     "answer": order.index(question.answer)})
    return rows


def _task_yaml(task: str, concept: str, file: str, split: str) -> str:
    q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
    return "\n".join([
        f"# Written by `obliviate lm-eval-tasks`: {concept}, {split} questions.",
        "# acc_norm is obliviate's accuracy (log-likelihood per character of \" {option}\").",
        f"task: {task}",
        "custom_dataset: !function utils.load",
        "dataset_kwargs:",
        f"  file: {q(file)}",
        "output_type: multiple_choice",
        f"test_split: {split}_test",
        f"fewshot_split: {split}_train",
        'doc_to_text: "Question: {{question}}\\nAnswer:"',
        "doc_to_choice: !function utils.choices",
        "doc_to_target: answer",
        'target_delimiter: ""',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata:",
        f"  version: {TASK_VERSION}",
        f"  concept: {q(concept)}",
        "",
    ])


def _group_yaml(group: str, tasks: list[str], what: str) -> str:
    return "\n".join([
        f"# Written by `obliviate lm-eval-tasks`: {what}, pooled over concepts (weighted by questions).",
        f"group: {group}",
        "task:", *[f"  - {task}" for task in tasks],
        "aggregate_metric_list:",
        "  - {metric: acc, aggregation: mean, weight_by_size: true}",
        "  - {metric: acc_norm, aggregation: mean, weight_by_size: true}",
        "metadata:",
        f"  version: {TASK_VERSION}",
        "",
    ])


def write_task_folder(data_dir: str | Path, out: str | Path, concepts: Sequence[str] | None = None,
                      seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """The EMBER benchmark (or ``concepts`` of it) as an lm-eval task folder in ``out``.

    Per concept two tasks, ``ember_qa_<slug>`` (the concept's questions: low after erasure)
    and ``ember_simdom_<slug>`` (similar-domain questions: should stay), test split scored,
    train split for few-shot; groups ``ember_qa`` and ``ember_simdom`` pool them. Returns
    {"tasks": [...], "groups": [...]}.
    """
    available = list_concepts(data_dir)
    chosen = list(concepts) if concepts else available
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise ObliviateError(f"Concept(s) {', '.join(map(repr, unknown))} not in {data_dir}. "
                             f"Available: {', '.join(sorted(available))}.")
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text(UTILS_PY, encoding="utf-8")
    members: dict[str, list[str]] = {"qa": [], "simdom": []}
    for concept in chosen:
        data = load_benchmark_concept(concept, data_dir, general_questions=0, seed=seed)
        splits = {ours: _docs(questions, seed) for ours, questions in data.questions.items()}
        file = f"data/{slug(concept)}.json"
        (out / file).write_text(json.dumps(splits, ensure_ascii=False, indent=1), encoding="utf-8")
        for kind in members:
            if f"{kind}_test" not in splits:
                continue
            task = f"ember_{kind}_{slug(concept)}"
            (out / f"{task}.yaml").write_text(_task_yaml(task, concept, file, kind), encoding="utf-8")
            members[kind].append(task)
    groups = []
    for kind, tasks in members.items():
        if tasks:
            what = "concept questions" if kind == "qa" else "similar-domain questions"
            (out / f"_ember_{kind}.yaml").write_text(_group_yaml(f"ember_{kind}", tasks, what), encoding="utf-8")
            groups.append(f"ember_{kind}")
    (out / "README.md").write_text(_folder_readme(chosen, groups, seed), encoding="utf-8")
    return {"tasks": members["qa"] + members["simdom"], "groups": groups}


def _folder_readme(concepts: list[str], groups: list[str], seed: int) -> str:
    return (f"# EMBER benchmark tasks for lm-evaluation-harness\n\nConcepts: {', '.join(concepts)}.\n\n"
            f"```bash\nlm_eval --model hf --model_args pretrained=PATH --include_path {{this folder}} "
            f"--tasks {','.join(groups)}\n```\n\n"
            "Scoring: context \"Question: {q}\\nAnswer:\", continuation \" {option}\"; `acc_norm` (per-character "
            "log-likelihood, the leading space counted) is obliviate's accuracy; `acc` is the raw sum. Options are in "
            f"obliviate's shuffled order (seed {seed}); the data files are local JSON (no hub downloads). Chance is "
            "0.25.\n")


# ---- running the harness -----------------------------------------------------------

@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline for the duration: tasks read local files or the local cache,
    never download (set before the libraries read them, and patched where already read)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    patched = []
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("datasets.config", "HF_DATASETS_OFFLINE")):
        with contextlib.suppress(ImportError, AttributeError):
            target = __import__(module, fromlist=[attribute])
            patched.append((target, attribute, getattr(target, attribute)))
            setattr(target, attribute, True)
    try:
        yield
    finally:
        for target, attribute, value in patched:
            setattr(target, attribute, value)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ObliviateError(f"--lm-eval needs lm-evaluation-harness: pip install \"obliviate[lm-eval]\" ({err}).") from err
    return lm_eval, HFLM, TaskManager


def _metric_entry(values: dict, key: str) -> dict:
    """{value, stderr, low, high} for one "metric,filter" key of a harness result."""
    value = values[key]
    metric, _, flt = key.partition(",")
    stderr = values.get(f"{metric}_stderr,{flt}")
    entry = {"value": float(value)}
    if isinstance(stderr, (int, float)) and math.isfinite(stderr):
        entry.update(stderr=float(stderr), low=float(value) - Z95 * stderr, high=float(value) + Z95 * stderr)
    return entry


def _numbers(results: dict) -> dict[str, dict[str, dict]]:
    """{task: {metric: entry}} from a harness output (groups included), stderr keys folded in."""
    table = {}
    for task, values in results["results"].items():
        table[task] = {key: _metric_entry(values, key) for key, value in values.items()
                       if "_stderr" not in key and "," in key and isinstance(value, (int, float))
                       and not isinstance(value, bool)}
    return table


def _paired(samples_a: list[dict], samples_b: list[dict], metric: str) -> dict | None:
    """Erased minus original on the same documents, with the paired standard error."""
    a = {s["doc_id"]: s.get(metric) for s in samples_a}
    b = {s["doc_id"]: s.get(metric) for s in samples_b}
    docs = [d for d in a if d in b and isinstance(a[d], (int, float)) and isinstance(b[d], (int, float))]
    if len(docs) < 2:
        return None
    diffs = [float(b[d]) - float(a[d]) for d in docs]
    mean = sum(diffs) / len(diffs)
    stderr = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs))
    return {"value": mean, "stderr": stderr, "low": mean - Z95 * stderr, "high": mean + Z95 * stderr, "n": len(diffs)}


def evaluate_model(lm: LoadedModel, tasks: Sequence[str], task_manager, *, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
                   seed: int = DEFAULT_SEED) -> dict:
    """One model through the harness (its HF wrapper around the in-memory module)."""
    lm_eval, HFLM, _ = _import_harness()
    with offline(), _kept_random_state():  # the harness seeds the global generators
        wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
        return lm_eval.simple_evaluate(
            model=wrapped, tasks=list(tasks), task_manager=task_manager, limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def run_harness(original: LoadedModel, erased: LoadedModel, tasks: Sequence[str] | str,
                include_path: str | Path | Sequence[str | Path] | None = None, *, limit: int | float | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
                seed: int = DEFAULT_SEED, include_defaults: bool = True) -> dict:
    """Harness tasks on the original and the erased model, side by side.

    ``tasks``: names (or a comma-separated string) the harness knows, from its own task
    registry or from ``include_path`` (e.g. a folder written by ``write_task_folder``).
    Returns {"tasks", "harness_version", "settings", "results": {task: {metric: {"original":
    {value, stderr, low, high}, "erased": {...}, "difference": {...}}}}, "groups", "samples"},
    where low/high are value +/- 1.96 stderr (the harness's standard error) and "difference"
    is erased minus original on the same documents with a paired standard error (per task,
    not for groups). Everything runs offline: a task whose data is not on disk fails.
    ``include_defaults=False`` looks only in ``include_path``, not in the harness's own tasks.
    """
    lm_eval, _, _ = _import_harness()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ObliviateError("Name at least one lm-eval task (e.g. --lm-eval ember_qa or --lm-eval mmlu).")
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise ObliviateError(f"lm-eval include path {path} is not a folder (write one with `obliviate lm-eval-tasks`).")
    manager = task_manager(names, paths, include_defaults)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ObliviateError(f"lm-eval does not know the task(s) {', '.join(map(repr, unknown))}"
                             + (f" (include path: {', '.join(map(str, paths))})" if paths else
                                " (for the EMBER tasks pass the folder of `obliviate lm-eval-tasks` as include path)") + ".")
    settings = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                "bootstrap_iters": bootstrap_iters, "seed": seed, "include_path": [str(p) for p in paths]}
    outputs = {}
    for role, lm in (("original", original), ("erased", erased)):
        try:
            outputs[role] = evaluate_model(lm, names, manager, limit=limit, num_fewshot=num_fewshot,
                                           batch_size=batch_size, bootstrap_iters=bootstrap_iters, seed=seed)
        except ValueError as err:  # the harness's refusals: a task named twice, a bad config
            raise ObliviateError(f"lm-eval refused the tasks {', '.join(names)}: {err}") from err
        except (ConnectionError, OSError) as err:
            raise ObliviateError(f"lm-eval could not read the data of {', '.join(names)} offline ({err}). Tasks must "
                                 "use local files or data already in the Hugging Face cache.") from err
    return side_by_side(outputs["original"], outputs["erased"], names, lm_eval.__version__, settings)


def task_manager(names: Sequence[str], paths: Sequence[str | Path], include_defaults: bool = True):
    """The harness's task index: the include paths alone when they hold every named task
    (indexing the harness's thousands of built-in tasks takes seconds), else with them."""
    _, _, TaskManager = _import_harness()
    if paths:
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(manager.match_tasks([n]) for n in names) or not include_defaults:
            return manager
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=include_defaults)


def side_by_side(original: dict, erased: dict, names: list[str], version: str, settings: dict) -> dict:
    """Two harness outputs as one table, with paired differences where the samples allow."""
    numbers = {"original": _numbers(original), "erased": _numbers(erased)}
    table: dict[str, dict] = {}
    for task in numbers["original"]:
        for key, entry in numbers["original"][task].items():
            row = {"original": entry, "erased": numbers["erased"].get(task, {}).get(key)}
            metric = key.split(",")[0]
            samples = (original.get("samples", {}).get(task), erased.get("samples", {}).get(task))
            if all(samples):
                difference = _paired(samples[0], samples[1], metric)
                if difference:
                    row["difference"] = difference
            table.setdefault(task, {})[key] = row
    return {"tasks": names, "harness_version": version, "settings": settings, "results": table,
            "groups": sorted(original.get("groups", {})),
            "samples": {task: len(rows) for task, rows in original.get("samples", {}).items()}}
