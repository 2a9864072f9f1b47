"""`obliviate eval`: any model against the original on a concept: multiple choice, coherence
and open-ended answers on TEST questions, into results.json."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from obliviate.attacks.common import accuracy_interval
from obliviate.config import RunConfig
from obliviate.data.concepts import OpenQuestion, load_open_questions
from obliviate.edits.embedding import EmbeddingPatch
from obliviate.errors import ObliviateError
from obliviate.evaluation import open_ended
from obliviate.evaluation.evaluator import Evaluator
from obliviate.evaluation.harness import run_harness
from obliviate.evaluation.results import RunResults
from obliviate.io import fingerprint
from obliviate.methods import eco as eco_method
from obliviate.methods.eco import EcoEdit
from obliviate.models.loading import LoadedModel
from obliviate.pipeline.inputs import load_concept_data
from obliviate.pipeline.outputs import finish
from obliviate.pipeline.pair import erase_run_info, erased_as_edit, load_pair, open_out
from obliviate.progress import progress_bar


def run_eval(config, base: str | None = None, eco: str | None = None, judge: str | None = None,
             judge_model: str = "default", open_new_tokens: int = 24,
             progress: bool = True, harness: dict | None = None) -> dict:
    """Full evaluation of any model against the original; results.json in config.out."""
    recorded = erase_run_info(config.model.name)[1]
    concept = config.concept or recorded.get("config", {}).get("concept") or recorded.get("concept")
    if not concept:
        raise ObliviateError("Name the concept with --concept (e.g. --concept 'Harry Potter').")
    # every concept the erase run removed stays out of the general sets, as in the run itself
    erased = recorded.get("config", {})
    others = tuple(c for c in (erased.get("concept"), *erased.get("concepts", ())) if c and c != concept)
    config = replace(config, concept=concept, concepts=tuple(dict.fromkeys((*config.concepts, *others))))
    data = load_concept_data(config)
    artifact = eco_artifact(eco)
    out = Path(config.out)
    evaluation = {k: v for k, v in asdict(config.evaluation).items() if k != "cache"}  # not what the numbers are
    print_ = fingerprint({"kind": "eval", "model": config.model.name, "base": base, "eco": eco, "concept": concept,
                          "data": asdict(config.data), "evaluation": evaluation, "seed": config.seed,
                          "judge": judge, "open_new_tokens": open_new_tokens, "harness": harness})
    timings, clock = {}, time.perf_counter()
    _, pair = open_out(out, print_, config.overwrite, lambda: load_pair(config, base, artifact.model_name if artifact else None))
    candidate = eco_method.wrap(pair.erased, artifact) if artifact else pair.erased
    edit = erased_as_edit(pair)
    timings["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    evaluator = Evaluator(pair.original, data, config.evaluation, config.seed)
    if edit is not None:  # only the inputs the edit changes run again
        train = evaluator.evaluate("train", edit, coherence=False, progress=progress)
        test = evaluator.evaluate("test", edit, progress=progress)
    else:
        train = evaluator.compare("train", candidate, coherence=False, progress=progress)
        test = evaluator.compare("test", candidate, progress=progress)
    timings["multiple_choice_and_coherence"] = time.perf_counter() - clock
    parts = {
        "model_source": pair.erased.source, "base": pair.original.name, "base_source": pair.original.source,
        "eco": eco, "config_fingerprint": print_, "scoring": config.evaluation.scoring,
        "evaluated_as": evaluated_as(edit),
        "general_knowledge_source": data.general_source, "train": train.results().to_dict()["metrics"],
        "near_chance": dict(test.results().near_chance), "examples": test.examples,
        "per_question": test.per_question(), "per_prompt": test.per_prompt(),
    }
    method = pair.recorded.get("method", "external") + ("+eco" if eco else "")
    results = RunResults("eval", concept, method, config.model.name, config.seed, test.results(), parts).to_dict()
    if config.data.data_dir() is not None:
        clock = time.perf_counter()
        judge_obj = open_ended.make_judge(judge, judge_model, config.model.device)
        open_questions = load_open_questions(config.data.data_dir(), concept)
        results["open_ended"] = {"judge": judge_obj.name if judge_obj else None, "matcher": "normalised answer match",
                                 **open_ended_results(evaluator, open_questions, open_new_tokens, edit, candidate,
                                                      judge_obj, config, progress)}
        timings["open_ended"] = time.perf_counter() - clock
    if harness:
        clock = time.perf_counter()
        results["lm_eval"] = run_harness(pair.original, candidate, harness["tasks"], include_path=harness.get("include"),
                                         limit=harness.get("limit"), seed=config.seed)
        timings["lm_eval"] = time.perf_counter() - clock
    results["timings"] = timings
    finish(out, results)
    return results


def evaluated_as(edit: EmbeddingPatch | EcoEdit | None) -> str:
    if isinstance(edit, EmbeddingPatch):
        return f"an embedding patch of {len(edit.changed_token_ids())} rows on the original"
    return "the ECO hook on the original" if edit is not None else "two models, every input on both"


def open_ended_results(evaluator: Evaluator, open_questions: dict[str, list[OpenQuestion]], new_tokens: int,
                       edit: EmbeddingPatch | EcoEdit | None, candidate: LoadedModel, judge: open_ended.Judge | None,
                       config: RunConfig, progress: bool) -> dict[str, dict]:
    """Per TEST split: each model's open-ended match (and judged) accuracy with a few examples;
    a progress line per split."""
    splits = [split for split in ("qa_test", "simdom_test") if split in open_questions]
    out = {}
    with progress_bar(desc="open-ended answers", total=len(splits), unit="set", disable=not progress) as bar:
        for split in splits:
            questions, entry = open_questions[split], {}
            for role, given in open_answers(evaluator, questions, new_tokens, edit, candidate).items():
                judged = open_ended.judge_answers(questions, given, judge)
                entry[role] = {"match": accuracy_interval(judged["match"], config.evaluation.bootstrap, config.seed),
                               "examples": [{"q": q.question, "gold": q.answer, "answer": a}
                                            for q, a in zip(questions[:5], judged["answers"][:5])]}
                if "judged" in judged:
                    entry[role]["judged"] = accuracy_interval(judged["judged"], config.evaluation.bootstrap, config.seed)
            out[split] = entry
            bar.set_postfix(done=split)
            bar.update(1)
    return out


def open_answers(evaluator: Evaluator, questions: list[OpenQuestion], new_tokens: int,
                 edit: EmbeddingPatch | EcoEdit | None, candidate: LoadedModel) -> dict[str, list[str]]:
    """The original's open-ended answers (through its results cache) and the erased model's:
    as an edit of the original, only the questions the edit can change are generated again."""
    reference = evaluator.original_continuations(open_ended.answer_prompts(questions), new_tokens)
    tokenizer = evaluator.lm.tokenizer
    edited = (open_ended.decode_answers(tokenizer, evaluator.edited_continuations(reference, edit)[0])
              if edit is not None else open_ended.generate_answers(candidate, questions, new_tokens, evaluator.batching))
    return {"base": open_ended.decode_answers(tokenizer, reference.original_continuations), "edited": edited}


def eco_artifact(eco: str | None):
    """The ECO artifact of ``--eco`` (None without it); a missing folder is named."""
    if not eco:
        return None
    if not Path(eco).is_dir():
        raise ObliviateError(f"--eco {eco}: no such folder (pass a folder written by `obliviate eco fit`).")
    return eco_method.load(eco)
