"""Erase a concept end to end: each stage's grid on TRAIN questions, final numbers once on TEST.

A run is a plan of stages. EMBER alone is one stage; ``--ember`` with a base method is
two: EMBER's grid under its own (plug-in) rule, then the base method fitted and judged
with EMBER's chosen edit applied (composition: the base method never knows). Every stage
is the same loop: fit -> candidates -> evaluate each on TRAIN (resumable) -> choose
(selection.py). The chosen edit is measured once on TEST, applied (verified), saved and
leak-checked (outputs.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obliviate import methods
from obliviate.config import RunConfig
from obliviate.data.concepts import ConceptData
from obliviate.edits.embedding import check_revertible_path
from obliviate.edits.protocol import apply_verified
from obliviate.errors import ObliviateError
from obliviate.evaluation.evaluator import Evaluator
from obliviate.evaluation.results import RunResults
from obliviate.io import fingerprint
from obliviate.models.loading import LoadedModel, embeddings_are_tied, load_model
from obliviate.pipeline.inputs import load_concept_data
from obliviate.pipeline.outputs import finish, mark_out_dir, prepare_out_dir, publish, save_outputs
from obliviate.pipeline.selection import (CandidateResult, applied, choose, measure_top_coherence, selection_rules,
                                          sweep)

PLUG_IN = "ember"  # the method that can run first under any other


@dataclass(frozen=True)
class Stage:
    name: str  # a registered method
    config: Any  # its Config
    plug_in: bool  # judged by the plug-in rule (EMBER's own gates, coherence on every candidate)
    fixed: bool = False  # a single strength the user fixed: applied whatever its score


@dataclass
class StageOutcome:
    sweep: list[CandidateResult]
    chosen: Any  # the edit in force after the stage (the previous stage's when nothing won)
    params: dict  # the chosen candidate's parameters ({} when none)
    report: dict


@dataclass
class ErasureResult:
    results: dict
    lm: LoadedModel  # the edited model (the chosen edit applied)
    edit: object | None
    out: Path | None

    def __getitem__(self, key: str):
        return self.results[key]


def plan(config: RunConfig) -> list[Stage]:
    """The stages of a run: [ember], [method] or [ember, method] (``--ember``)."""
    stages = []
    if config.method == PLUG_IN or config.with_ember:
        stages.append(Stage(PLUG_IN, config.ember, plug_in=True, fixed=config.ember.delta is not None))
    if config.method != PLUG_IN:
        stages.append(Stage(config.method, config.method_config(), plug_in=False))
    return stages


def config_fingerprint(config: RunConfig) -> str:
    payload = config.to_dict()
    payload.pop("overwrite", None)
    payload.pop("out", None)
    payload["evaluation"].pop("cache", None)  # where the original's numbers come from, not what they are
    return fingerprint(payload)


def erase(config: RunConfig, progress: bool = True) -> ErasureResult:
    """Run one erasure and write its results (see the README for the folder layout)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    stages = plan(config)
    out = Path(config.out) if config.out else None
    if config.revertible_patch:
        check_revertible_path(config.revertible_patch, out)  # before any work: never inside --out
    run_fingerprint = config_fingerprint(config)
    state = prepare_out_dir(out, run_fingerprint, config.overwrite) if out else {"fingerprint": run_fingerprint, "sweeps": {}}
    data = load_concept_data(config)
    if not data.has_questions and stages[0].plug_in and not stages[0].fixed and len(stages) == 1:
        raise ObliviateError(
            f"Concept {config.concept!r} has no questions to choose delta on: pass --questions FILE, "
            "or fix the strength with --delta (you get the edit and its token report, no accuracy claims)."
        )
    lm = load_model(config.model.name, config.model.device, config.model.dtype, config.model.device_map,
                    allow_pickle=config.model.allow_pickle)
    timings["load"] = time.perf_counter() - clock
    if out is not None:
        mark_out_dir(out, state)  # only now: bad input above leaves nothing behind

    evaluator = Evaluator(lm, data, config.evaluation, config.seed)
    context = methods.MethodContext(progress=progress, checkpoint_dir=(out / "checkpoints") if out else None)
    outcomes: dict[str, StageOutcome] = {}
    edit = None
    for stage in stages:
        outcome = run_stage(stage, lm, data, evaluator, config, context, state, out, edit, timings)
        outcomes[stage.name] = outcome
        edit = outcome.chosen

    clock = time.perf_counter()
    test = evaluator.evaluate("test", edit) if data.has_questions or evaluator.prompts("test") else None
    timings["test_evaluation"] = time.perf_counter() - clock
    if edit is not None:
        apply_verified(edit, lm.model)

    results = build_results(config, run_fingerprint, lm, data, stages, outcomes, test, evaluator, timings)
    if out is not None:
        clock = time.perf_counter()
        save_outputs(out, lm, edit, results)
        results["timings"]["save"] = time.perf_counter() - clock
        finish(out, results)
        publish(out, results)
    return ErasureResult(results=results, lm=lm, edit=edit, out=out)


def run_stage(stage: Stage, lm: LoadedModel, data: ConceptData, evaluator: Evaluator, config: RunConfig,
              context: methods.MethodContext, state: dict, out: Path | None, base_edit, timings: dict) -> StageOutcome:
    """Fit the stage's method (on the model with ``base_edit`` applied), evaluate its grid and
    choose; the chosen edit is composed with ``base_edit``."""
    clock = time.perf_counter()
    with applied(base_edit, lm.model):
        fitted = methods.get(stage.name).fit(lm, data, stage.config, config.seed, context)
    results, edits = sweep(stage.name, fitted, evaluator, config, state, out, base_edit=base_edit,
                           ember_rule=stage.plug_in, stop_on_reject=stage.plug_in and not stage.fixed)
    if not stage.plug_in:
        measure_top_coherence(results, edits, evaluator, config, state, out)
    pick = 0 if stage.fixed else choose(results, config.evaluation.choice)
    report = fitted.report()
    timings.update({f"{stage.name}_{k}": v for k, v in report.pop("timings", {}).items()})
    timings["ember_grid" if stage.plug_in else "method_grid"] = time.perf_counter() - clock
    params = results[pick].params if pick is not None else {}
    if stage.plug_in and results:  # the strength in force (0: nothing applied)
        report.update(params or {key: 0.0 for key in results[0].params})
    return StageOutcome(results, edits[pick] if pick is not None else base_edit, params, report)


def build_results(config: RunConfig, run_fingerprint: str, lm: LoadedModel, data: ConceptData, stages: list[Stage],
                  outcomes: dict[str, StageOutcome], test, evaluator: Evaluator, timings: dict) -> dict:
    plug_in = outcomes.get(PLUG_IN)
    base = next((outcomes[s.name] for s in stages if not s.plug_in), None)
    ember_report = plug_in.report if plug_in else {}
    tied = embeddings_are_tied(lm.model)
    parts = {
        "model_source": lm.source,
        "config_fingerprint": run_fingerprint,
        "delta": ember_report.get("delta"),
        "params": base.params if base else {},
        "features": ember_report.get("features", []),
        "edited_token_count": ember_report.get("edited_token_count", 0),
        "embeddings_untied": ember_report.get("embeddings_untied", False),
        "output_rows": ember_report.get("output_rows", "shared" if tied else "separate"),
        "scoring": evaluator.config.scoring,
        "general_knowledge_source": data.general_source,
        "coherence_prompt_source": data.general_prompt_source,
        "selection": selection_rules(config),
        "questions_available": data.has_questions,
        "timings": timings,
        "details": {"embeddings_untied": ember_report.get("embeddings_untied", False),
                    "output_rows": ember_report.get("output_rows", "shared" if tied else "separate"),
                    **{name: outcome.report for name, outcome in outcomes.items()}},
        "config": config.to_dict(),
    }
    split = test.results() if test is not None else None
    if test is not None:
        parts.update(near_chance=dict(split.near_chance), coverage=test.coverage, examples=test.examples,
                     per_question=test.per_question(), per_prompt=test.per_prompt())
    if plug_in is not None:
        parts["delta_sweep"] = [r.__dict__ for r in plug_in.sweep]
    if base is not None:
        parts["method_sweep"] = [r.__dict__ for r in base.sweep]
    method = config.method + ("+ember" if config.with_ember and config.method != PLUG_IN else "")
    results = RunResults("erase", data.concept, method, lm.name, config.seed, split, parts).to_dict()
    if split is None:
        results["test"] = {}
    return results
