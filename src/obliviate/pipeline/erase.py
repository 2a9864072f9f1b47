"""Erase a concept end to end: grid on TRAIN questions, final numbers once on TEST.

Selection follows the reference code's two rules (METHOD.md sections 1 and 4):
- EMBER's delta grid: a candidate whose general-knowledge fraction is below 0.9 is
  rejected (the monotone grid stops there); one whose coherence on GENERAL prompts is
  below 0.9 scores 0; otherwise score = harmonic(efficacy, specificity, coherence).
- A base method's grid (RMU, ELM, ...): a cell whose general-knowledge fraction is below
  0.7 or whose QA fraction stays above 0.6 is discarded; cells rank by harmonic(efficacy,
  specificity); coherence is then measured on the top few only (and gates them only if
  the user asks).
A question set whose original accuracy is within noise of chance cannot veto a candidate
(its fraction's denominator is noise); a concept whose QA set is at chance has nothing
measurable to erase, so no candidate can win on it. With 50 questions a split the score
is noisy, so the choice follows the one-standard-error rule: the FIRST candidate in grid
order (for EMBER the smallest delta) whose score is within one bootstrap standard error
of the best. If every score is 0, no edit is applied.
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from obliviate import methods
from obliviate.config import RunConfig
from obliviate.data.concepts import ConceptData, attach_general_prompts, load_benchmark_concept, load_user_concept
from obliviate.edits.embedding import CompositeEdit, EmbeddingPatch, apply_verified, check_revertible_path
from obliviate.errors import ObliviateError
from obliviate.evaluation.evaluator import Evaluator, SplitOutcome
from obliviate.reports.html import write_report as write_html_report
from obliviate.io import fingerprint, read_json, write_json, write_text
from obliviate.models.loading import LoadedModel, embeddings_are_tied, load_model, untie_output_embeddings

CHECKPOINT = ".checkpoint.json"


@dataclass
class CandidateResult:
    params: dict
    metrics: dict  # name -> {value, low, high} on TRAIN questions
    score: float
    score_se: float
    rejected: str | None = None

    def value(self, name: str) -> float:
        return self.metrics.get(name, {}).get("value", float("nan"))


@dataclass
class ErasureResult:
    results: dict
    lm: LoadedModel  # the edited model (the chosen edit applied)
    edit: object | None
    out: Path | None

    def __getitem__(self, key: str):
        return self.results[key]


def config_fingerprint(config: RunConfig) -> str:
    payload = config.to_dict()
    payload.pop("overwrite", None)
    payload.pop("out", None)
    return fingerprint(payload)


def prepare_out_dir(out: Path, fingerprint: str, overwrite: bool) -> dict:
    """Refuse to mix runs in one folder; return the resumable checkpoint if it is ours."""
    checkpoint = out / CHECKPOINT
    results = out / "results.json"
    if out.exists() and any(out.iterdir()):
        owner = None
        if checkpoint.exists():
            owner = read_json(checkpoint).get("fingerprint")
        elif results.exists():
            owner = read_json(results).get("config_fingerprint")
        if owner != fingerprint:
            if not overwrite:
                raise ObliviateError(
                    f"Output folder {out} already holds a different run. Choose another --out, or pass "
                    "--overwrite to replace it."
                )
            shutil.rmtree(out)
        elif checkpoint.exists() and not overwrite:
            return read_json(checkpoint)
    return {"fingerprint": fingerprint, "sweeps": {}}


def mark_out_dir(out: Path, state: dict) -> None:
    """Create the folder with our checkpoint as its first file: a run killed before its first
    result then resumes instead of finding a folder that looks like someone else's."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CHECKPOINT, state)


def load_concept_data(config: RunConfig) -> ConceptData:
    d = config.data
    if d.concept_sentences:
        data = load_user_concept(
            config.concept, d.concept_sentences, d.neutral_sentences, d.data, d.questions,
            d.coherency_prompts, d.general_questions_file, d.general_questions, config.seed,
        )
    elif not d.data:
        raise ObliviateError("Pass --data with the EMBER benchmark folder, or --concept-sentences for your own concept.")
    else:
        data = load_benchmark_concept(config.concept, d.data, d.general_questions, d.general_questions_file, config.seed)
    ev = config.evaluation
    attach_general_prompts(data, d.coherence_prompts, ev.general_prompts, ev.neutral_coherence_prompts, config.seed)
    return data


def tied_output_mode(lm: LoadedModel, config: RunConfig, uses_ember: bool) -> str:
    """What EMBER's edited tokens get as OUTPUT rows: "separate" (an untied model: untouched),
    "original" (the reference's untying: they keep the original rows, which leaks),
    "neutral" (the mean output row) or "shared" (the tied matrix gets the edit)."""
    if not embeddings_are_tied(lm.model):
        return "separate"
    if config.ember.untie_embeddings:
        return "original"
    return config.ember.tied_output if uses_ember else "shared"


def mean_output_row(lm: LoadedModel) -> torch.Tensor:
    return lm.model.get_output_embeddings().weight.detach().float().mean(dim=0).cpu()


@dataclass
class NeutralOutput:
    """EMBER's candidates, with the edited tokens' output rows set to the mean output row:
    an untied output layer that carries nothing of their original rows."""

    fitted: object
    mean_row: torch.Tensor

    def candidates(self) -> Iterator:
        for params, patch in self.fitted.candidates():
            rows = self.mean_row.to(patch.edited_rows.dtype).expand_as(patch.edited_rows).clone()
            yield params, replace(patch, output_rows=rows, original_output_rows=None)


def selection_rules(config: RunConfig) -> dict:
    """The gates and ranking the grids used, as results.json records them."""
    ev = config.evaluation
    return {
        "ember": {"reject_general_frac_below": ev.general_gate, "zero_coherence_below": ev.coherence_gate,
                  "rank_by": "harmonic(efficacy, specificity, coherence)"},
        "base_method": {"reject_general_frac_below": ev.method_general_gate,
                        "reject_qa_frac_above": ev.method_max_qa_frac, "rank_by": "harmonic(efficacy, specificity)",
                        "coherence_measured_on_top": ev.method_coherence_top,
                        "zero_coherence_below": ev.method_coherence_gate},
        "concept_fluency_gated": ev.gate_concept_fluency,
        "near_chance": "a set whose original accuracy's 95% Wilson interval reaches chance (0.25) does not veto a "
                       "candidate and is left out of specificity; a QA set at chance means nothing measurable to "
                       "erase (no candidate wins)",
        "choice": {"best": "the highest score, ties to the earlier candidate (reference)",
                   "one-se": "the first candidate within one bootstrap standard error of the best"}[ev.choice],
    }


NOTHING_TO_ERASE = "QA accuracy of the original is within noise of chance: no measurable knowledge to erase"


def ember_score(outcome: SplitOutcome, config) -> tuple[float, float, str | None]:
    """(score, its bootstrap standard error, rejection reason) under EMBER's own gates."""
    general = outcome.value("general_frac", 1.0)
    if "general" not in outcome.near_chance and general < config.general_gate:
        return 0.0, 0.0, f"general-knowledge fraction {general:.3f} < {config.general_gate}"
    if "qa" in outcome.near_chance:
        return 0.0, 0.0, NOTHING_TO_ERASE
    if _fails_coherence(outcome.metrics, config, config.coherence_gate):
        return 0.0, 0.0, None
    key = "score" if "score" in outcome.metrics else "harmonic"
    if key not in outcome.metrics:
        return 0.0, 0.0, "no questions to score"
    return _with_se(outcome.metrics[key])


def method_score(outcome: SplitOutcome, config) -> tuple[float, float, str | None]:
    """(score, standard error, rejection reason) under the base methods' gates
    (reference grid_eval_kwargs: min_mmlu, max_qa_acc); coherence is measured later."""
    general = outcome.value("general_frac", 1.0)
    if "general" not in outcome.near_chance and general < config.method_general_gate:
        return 0.0, 0.0, f"general-knowledge fraction {general:.3f} < {config.method_general_gate}"
    if "qa" in outcome.near_chance:
        return 0.0, 0.0, NOTHING_TO_ERASE
    qa_frac = outcome.value("qa_frac", 1.0)
    if qa_frac > config.method_max_qa_frac:
        return 0.0, 0.0, f"QA fraction {qa_frac:.3f} > {config.method_max_qa_frac} (too little erased)"
    if "harmonic" not in outcome.metrics:
        return 0.0, 0.0, "no questions to score"
    return _with_se(outcome.metrics["harmonic"])


def _with_se(interval) -> tuple[float, float, None]:
    return interval.value, (interval.high - interval.low) / 3.92, None


def _fails_coherence(metrics: dict, config, gate: float | None) -> bool:
    """Coherence on general prompts below ``gate`` (and, when opted in, fluency on concept text).
    ``metrics`` maps names to Intervals or to their dict form (saved sweeps)."""
    if gate is None:
        return False

    def value(name: str) -> float:
        entry = metrics.get(name)
        if entry is None:
            return 1.0
        return entry["value"] if isinstance(entry, dict) else entry.value

    return value("coherence") < gate or (config.gate_concept_fluency and value("concept_fluency") < gate)


def choose(results: list[CandidateResult], rule: str = "best") -> int | None:
    """The chosen candidate; None when nothing scores above 0. ``best`` (the reference): the
    highest score, ties to the earlier one in grid order (the smaller delta). ``one-se``: the
    first in grid order whose score is within one bootstrap standard error of the best."""
    scored = [i for i, r in enumerate(results) if r.rejected is None and r.score > 0]
    if not scored:
        return None
    best = max(scored, key=lambda i: (results[i].score, -i))
    floor = results[best].score - (results[best].score_se if rule == "one-se" else 0.0)
    return next(i for i in scored if results[i].score >= floor)


@contextmanager
def applied(edit, model):
    """Hold an edit applied for a block (used to train a base method on the EMBER-edited model)."""
    if edit is None:
        yield
        return
    edit.apply(model)
    try:
        yield
    finally:
        edit.revert(model)


def _under(base_edit, model, candidates: Iterator) -> Iterator:
    """Run a method's candidate generator with ``base_edit`` applied while it works."""
    while True:
        with applied(base_edit, model):
            try:
                params, edit = next(candidates)
            except StopIteration:
                return
        yield params, (CompositeEdit([base_edit, edit]) if base_edit is not None else edit)


def sweep(
    name: str, fitted, evaluator: Evaluator, config: RunConfig, state: dict, out: Path | None,
    base_edit=None, ember_rule: bool = False, stop_on_reject: bool = False,
) -> tuple[list[CandidateResult], list]:
    """Evaluate every candidate on TRAIN questions (resuming from ``state``). EMBER's rule
    measures coherence on every candidate; a base method's grid ranks without it."""
    done = state["sweeps"].setdefault(name, [])
    results, edits = [], []
    bar = tqdm(desc=f"{name} grid (train questions)", unit="candidate", disable=None)
    incoherent = 0
    rule = ember_score if ember_rule else method_score
    for index, (params, edit) in enumerate(_under(base_edit, evaluator.lm.model, fitted.candidates())):
        edits.append(edit)
        if index < len(done):
            results.append(CandidateResult(**done[index]))
        else:
            outcome_metrics, score, se, rejected = {}, 0.0, 0.0, None
            if evaluator.data.has_questions:
                outcome = evaluator.evaluate("train", edit, coherence=ember_rule)
                outcome_metrics = outcome.as_dict()["metrics"]
                score, se, rejected = rule(outcome, config.evaluation)
            results.append(CandidateResult(params, outcome_metrics, score, se, rejected))
            done.append(results[-1].__dict__)
            _save_state(out, state)
        bar.update(1)
        bar.set_postfix(params=params, score=round(results[-1].score, 3))
        if not stop_on_reject:
            continue
        fails = _fails_coherence(results[-1].metrics, config.evaluation, config.evaluation.coherence_gate)
        incoherent = incoherent + 1 if fails else 0
        if results[-1].rejected or 0 < config.evaluation.stop_after_incoherent <= incoherent:
            break
    bar.close()
    return results, edits


def measure_top_coherence(results: list[CandidateResult], edits: list, evaluator: Evaluator, config: RunConfig,
                          state: dict, out: Path | None) -> None:
    """Coherence on general prompts (and concept fluency) for the best few candidates of a
    base method's grid, as the reference does; they score 0 only under an explicit gate."""
    ev = config.evaluation
    ranked = sorted((i for i, r in enumerate(results) if r.rejected is None and r.score > 0),
                    key=lambda i: -results[i].score)[: ev.method_coherence_top]
    for index in ranked:
        result = results[index]
        if "coherence" not in result.metrics:
            outcome = evaluator.evaluate("train", edits[index], coherence=True)
            result.metrics.update({k: v.as_dict() for k, v in outcome.metrics.items()
                                   if k in ("coherence", "fluency", "repetition", "concept_fluency")})
            _save_state(out, state)
        if _fails_coherence(result.metrics, ev, ev.method_coherence_gate):
            result.score, result.score_se = 0.0, 0.0


def _save_state(out: Path | None, state: dict) -> None:
    if out is not None:
        write_json(out / CHECKPOINT, state)


def _split_summary(outcome: SplitOutcome | None) -> dict:
    if outcome is None:
        return {}
    summary = outcome.as_dict()
    m = summary["metrics"]
    for name in ("qa", "simdom", "general"):
        if f"{name}_base" in m:
            summary[f"{name}_test"] = {"base": m[f"{name}_base"], "edited": m[f"{name}_edited"]}
    return summary


def erase(config: RunConfig, progress: bool = True) -> ErasureResult:
    """Run one erasure and write its results (see the README for the folder layout)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    method = methods.get(config.method)  # fail fast on an unknown method
    out = Path(config.out) if config.out else None
    if config.revertible_patch:
        check_revertible_path(config.revertible_patch, out)  # before any work: never inside --out
    run_fingerprint = config_fingerprint(config)
    state = prepare_out_dir(out, run_fingerprint, config.overwrite) if out else {"fingerprint": run_fingerprint, "sweeps": {}}

    data = load_concept_data(config)
    if not data.has_questions and config.ember.delta is None and config.method == "ember":
        raise ObliviateError(
            f"Concept {config.concept!r} has no questions to choose delta on: pass --questions FILE, "
            "or fix the strength with --delta (you get the edit and its token report, no accuracy claims)."
        )
    lm = load_model(config.model.name, config.model.device, config.model.dtype, config.model.device_map,
                    allow_pickle=config.model.allow_pickle)
    timings["load"] = time.perf_counter() - clock
    if out is not None:
        mark_out_dir(out, state)  # only now: bad input above leaves nothing behind

    uses_ember = config.method == "ember" or config.with_ember
    output_rows = tied_output_mode(lm, config, uses_ember)
    untied = untie_output_embeddings(lm.model) if output_rows in ("original", "neutral") else False
    evaluator = Evaluator(lm, data, config.evaluation, config.seed)
    context = methods.MethodContext(progress=progress, checkpoint_dir=(out / "checkpoints") if out else None)
    report: dict = {"embeddings_untied": untied, "output_rows": output_rows}
    base_edit, ember_info, ember_sweep = None, None, None

    if uses_ember:
        ember = methods.get("ember")
        clock = time.perf_counter()
        ember_fit = ember.fit(lm, data, config.ember, config.seed, context)
        timings.update({f"ember_{k}": v for k, v in ember_fit.timings.items()})
        ember_info = ember_fit.report()
        clock = time.perf_counter()
        candidates = NeutralOutput(ember_fit, mean_output_row(lm)) if output_rows == "neutral" else ember_fit
        ember_sweep, ember_edits = sweep("ember", candidates, evaluator, config, state, out,
                                         ember_rule=True, stop_on_reject=config.ember.delta is None)
        timings["ember_grid"] = time.perf_counter() - clock
        pick = 0 if config.ember.delta is not None else choose(ember_sweep, config.evaluation.choice)
        base_edit = ember_edits[pick] if pick is not None else None
        report["ember"] = {**ember_info, "delta": ember_sweep[pick].params["delta"] if pick is not None else 0.0}

    chosen_edit, method_sweep, chosen_params = base_edit, None, {}
    if config.method != "ember":
        clock = time.perf_counter()
        settings = config.methods.get(config.method, {})
        from obliviate.config import build_section

        method_config = build_section(method.Config, settings, f"methods.{config.method}")
        with applied(base_edit, lm.model):
            fitted = method.fit(lm, data, method_config, config.seed, context)
        method_sweep, method_edits = sweep(config.method, fitted, evaluator, config, state, out, base_edit=base_edit)
        measure_top_coherence(method_sweep, method_edits, evaluator, config, state, out)
        timings["method_grid"] = time.perf_counter() - clock
        pick = choose(method_sweep, config.evaluation.choice)
        chosen_edit = method_edits[pick] if pick is not None else base_edit
        chosen_params = method_sweep[pick].params if pick is not None else {}
        report[config.method] = fitted.report() if hasattr(fitted, "report") else {}

    clock = time.perf_counter()
    test = evaluator.evaluate("test", chosen_edit) if data.has_questions or evaluator.prompts("test") else None
    timings["test_evaluation"] = time.perf_counter() - clock
    if chosen_edit is not None:
        if isinstance(chosen_edit, EmbeddingPatch):
            apply_verified(chosen_edit, lm.model)
        else:
            chosen_edit.apply(lm.model)

    results = _results(config, run_fingerprint, lm, data, report, ember_sweep, method_sweep, chosen_params, test, evaluator, timings)
    if out is not None:
        clock = time.perf_counter()
        save_outputs(out, lm, chosen_edit, results, progress)
        results["timings"]["save"] = time.perf_counter() - clock
        write_json(out / "results.json", results)
        (out / CHECKPOINT).unlink(missing_ok=True)
    return ErasureResult(results=results, lm=lm, edit=chosen_edit, out=out)


def _results(config, fingerprint, lm, data, report, ember_sweep, method_sweep, chosen_params, test, evaluator, timings) -> dict:
    delta = report.get("ember", {}).get("delta")
    test_summary = _split_summary(test)
    metrics = test_summary.get("metrics", {})
    results = {
        "concept": data.concept,
        "method": config.method + ("+ember" if config.with_ember and config.method != "ember" else ""),
        "model": lm.name,
        "model_source": lm.source,
        "seed": config.seed,
        "config_fingerprint": fingerprint,
        "delta": delta,
        "params": chosen_params,
        "features": report.get("ember", {}).get("features", []),
        "edited_token_count": report.get("ember", {}).get("edited_token_count", 0),
        "embeddings_untied": report["embeddings_untied"],
        "output_rows": report["output_rows"],
        "scoring": evaluator.config.scoring,
        "general_knowledge_source": data.general_source,
        "coherence_prompt_source": data.general_prompt_source,
        "selection": selection_rules(config),
        "questions_available": data.has_questions,
        "test": test_summary,
        "timings": timings,
        "details": report,
        "config": config.to_dict(),
    }
    for name in ("qa_test", "simdom_test", "general_test"):
        if name in test_summary:
            results[name] = test_summary[name]
    for name in ("efficacy", "specificity", "coherence", "concept_fluency", "harmonic", "score"):
        if name in metrics:
            results[name] = metrics[name]
    if test is not None:
        results.update(near_chance=test_summary["near_chance"], coverage=test.coverage, examples=test.examples,
                       per_question=test.per_question(), per_prompt=test.per_prompt())
    if ember_sweep is not None:
        results["delta_sweep"] = [r.__dict__ for r in ember_sweep]
    if method_sweep is not None:
        results["method_sweep"] = [r.__dict__ for r in method_sweep]
    return results


def save_outputs(out: Path, lm: LoadedModel, edit, results: dict, progress: bool) -> None:
    """model/ (plain from_pretrained), the patch, and report.md; each written atomically
    (model/ is written beside and renamed into place). Then the leak check: no saved file
    may hold an edited token's original row (an untied output layer is expected to, and warned of)."""
    from obliviate.edits.embedding import check_revertible_path
    from obliviate.edits.leak_check import UNTIED_WARNING, check_outputs
    from obliviate.reports.markdown import markdown_report

    revertible = results["config"].get("revertible_patch") or None
    if revertible:
        revertible = check_revertible_path(revertible, out)  # before writing anything
    model_dir = out / "model"
    staging = out / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    if results["config"]["save_model"]:
        lm.model.save_pretrained(staging)
        lm.tokenizer.save_pretrained(staging)
        shutil.rmtree(model_dir, ignore_errors=True)
        staging.rename(model_dir)
    patches = [e for e in (edit.edits if isinstance(edit, CompositeEdit) else [edit]) if isinstance(e, EmbeddingPatch)]
    for patch in patches:
        patch.metadata["embeddings_untied"] = str(results["embeddings_untied"])
        patch.save(out / "embedding_patch.safetensors")
        if revertible:
            patch.save(revertible, revertible=True)
    results["leak_check"] = check_outputs(out, patches)
    leaks_by_design = results["output_rows"] == "original"  # --untie-embeddings: the reference, warned of
    if leaks_by_design:
        results["leak_warning"] = UNTIED_WARNING
    write_text(out / "report.md", markdown_report(results))
    write_html_report([{**results, "_name": out.name}], out)  # report.html and summary.csv
    if not results["leak_check"]["passed"] and not leaks_by_design:
        write_json(out / "results.json", results)  # the record of the failure, then fail loudly
        leak = results["leak_check"]["leaks"][0]
        raise ObliviateError(
            f"Leak check failed: {results['leak_check']['leak_count']} saved row(s) still equal an edited token's "
            f"original row (first: token {leak['token_id']} in {leak['tensor']} row {leak['row']}, cosine "
            f"{leak['cosine']:.4f}). Whoever holds {out} could restore the original; do not share it. See "
            "results.json leak_check."
        )
