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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from obliviate import methods
from obliviate.config import RunConfig
from obliviate.data.concepts import ConceptData, merge_concepts
from obliviate.edits.embedding import EmbeddingPatch, check_revertible_path, merge_patches
from obliviate.edits.protocol import applied, apply_verified, parts_of
from obliviate.errors import ObliviateError
from obliviate.evaluation.evaluator import Evaluator
from obliviate.evaluation.results import RunResults
from obliviate.io import fingerprint
from obliviate.models.loading import LoadedModel, embeddings_are_tied, load_model
from obliviate.pipeline.inputs import load_concept_data
from obliviate.pipeline.checkpoint import CandidateResult, RunCheckpoint
from obliviate.pipeline.outputs import finish, publish, save_outputs
from obliviate.training.sharding import world
from obliviate.progress import write_line
from obliviate.pipeline.selection import NOTHING_TO_ERASE, choose, measure_top_coherence, selection_rules, sweep

PLUG_IN = methods.PLUG_IN


@dataclass(frozen=True)
class Stage:
    name: str  # a registered method
    config: Any  # its Config
    plug_in: bool  # judged by the plug-in rule (EMBER's own gates, coherence on every candidate)
    fixed: bool = False  # a single strength the user fixed: applied whatever its score


@dataclass(frozen=True)
class StageKey:
    """Which grid of a run: a stage's method, and the concept when EMBER erases several one
    after another. ``str`` is its name in the checkpoint and results.json ("ember[Gun]")."""
    method: str
    concept: str | None = None

    def __str__(self) -> str:
        return self.method if self.concept is None else f"{self.method}[{self.concept}]"


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


def describe_plan(config: RunConfig) -> str:
    """One line a user reads before the run starts: what runs, in order."""
    steps = []
    for stage in plan(config):
        if stage.fixed:
            steps.append(f"{stage.name} at delta {stage.config.delta}")
        elif stage.plug_in:
            steps.append(f"{stage.name}: up to {len(stage.config.delta_grid)} deltas scored on TRAIN questions "
                         "and general prompts")
        else:
            steps.append(f"{stage.name}: its grid trained and scored on TRAIN questions")
    return "plan: " + "; then ".join(steps) + "; then the chosen edit measured once on TEST (progress lines give each stage's ETA)"


def config_fingerprint(config: RunConfig) -> str:
    payload = config.to_dict()
    payload.pop("overwrite", None)
    payload.pop("out", None)
    payload.pop("train_only", None)  # training first, then the evaluation: one run, one folder
    payload.pop("push_to_hub", None)  # where the result goes, not what it is
    payload.pop("private", None)
    payload["evaluation"].pop("cache", None)  # where the original's numbers come from, not what they are
    payload["evaluation"].pop("fit_at_chance", None)  # sweeps a grid no candidate can win: same result
    return fingerprint(payload)


def load_concepts(config: RunConfig) -> dict[str, ConceptData]:
    """Every concept the run erases, each with the others left out of its general sets."""
    return {name: load_concept_data(config, name) for name in config.all_concepts()}


def union(datas: dict[str, ConceptData]) -> ConceptData:
    """What a base method forgets and is judged on: the one concept, or their union."""
    return next(iter(datas.values())) if len(datas) == 1 else merge_concepts(list(datas.values()))


def load_run_model(config: RunConfig) -> LoadedModel:
    m = config.model
    return load_model(m.name, m.device, m.dtype, m.device_map, allow_pickle=m.allow_pickle)


def train_only(config: RunConfig, progress: bool = True) -> dict:
    """Train every candidate of the run's trained method into out/checkpoints and stop (no
    evaluation, nothing else written): the part that runs on several processes. Every
    process runs this; the training loop shards the model over them and the first one writes."""
    stages = plan(config)
    if not config.out:
        raise ObliviateError("--train-only needs --out: the trained candidates are kept in OUT/checkpoints.")
    if stages[-1].plug_in:
        raise ObliviateError("--train-only trains a base method (--method rmu, elm, grad_diff, npo): EMBER is not trained.")
    if stages[0].plug_in and not stages[0].fixed:
        raise ObliviateError("--train-only with --ember needs EMBER's strength fixed (--delta D): choosing it needs the "
                             "evaluation, which the run without --train-only does.")
    out = Path(config.out)
    if world()[0] == 0:  # the folder is this run's: the evaluating run resumes in it
        RunCheckpoint.open(out, config_fingerprint(config), config.overwrite).mark()
    datas = load_concepts(config)
    data, lm = union(datas), load_run_model(config)
    context = methods.MethodContext(progress=progress, checkpoint_dir=out / "checkpoints")
    edit, trained = None, []
    for stage in stages:
        with applied(edit, lm.model):
            fitted = methods.get(stage.name).fit(lm, data, stage.config, config.seed, context)
        for params, candidate in fitted.candidates():  # a trained grid trains (or finds) each point here
            if stage.plug_in:
                edit = candidate
                break
            trained.append(params)
    return {"trained": trained, "checkpoints": str(out / "checkpoints")}


def erase(config: RunConfig, progress: bool = True) -> ErasureResult:
    """Run one erasure and write its results (see the README for the folder layout)."""
    clock = time.perf_counter()
    stages = plan(config)
    out = Path(config.out) if config.out else None
    if config.revertible_patch:
        check_revertible_path(config.revertible_patch, out)  # before any work: never inside --out
    run_fingerprint = config_fingerprint(config)
    checkpoint = RunCheckpoint.open(out, run_fingerprint, config.overwrite)
    timings = checkpoint.timings
    datas = load_concepts(config)
    names = list(datas)
    for name, data in datas.items():
        if not data.has_questions and len(stages) == 1 and stages[0].plug_in and not stages[0].fixed:
            raise ObliviateError(
                f"Concept {name!r} has no questions to choose delta on: pass --questions FILE, "
                "or fix the strength with --delta (you get the edit and its token report, no accuracy claims)."
            )
    lm = load_run_model(config)
    timings["load"] = time.perf_counter() - clock
    checkpoint.mark()  # only now: bad input above leaves nothing behind

    evaluators = {name: Evaluator(lm, data, config.evaluation, config.seed) for name, data in datas.items()}
    data = union(datas)
    evaluator = evaluators[names[0]] if len(names) == 1 else Evaluator(lm, data, config.evaluation, config.seed)
    context = methods.MethodContext(progress=progress, checkpoint_dir=(out / "checkpoints") if out else None,
                                    log=write_line if progress else (lambda _message: None))
    outcomes: dict[StageKey, StageOutcome] = {}
    concept_rows: dict[str, set[int]] = {}  # several concepts: the rows each one's EMBER edit moved
    edit = None
    for stage in stages:
        if stage.plug_in and len(names) > 1:  # one concept after another, each edit on top of the last
            for name in names:
                key = StageKey(stage.name, name)
                outcomes[key] = run_stage(stage, key, evaluators[name], config, context, checkpoint, edit)
                if outcomes[key].params:
                    concept_rows[name] = parts_of(outcomes[key].chosen)[-1].changed_token_ids()
                edit = outcomes[key].chosen
            edit = merge_patches(parts_of(edit)) if parts_of(edit) else None
        else:
            key = StageKey(stage.name)
            outcomes[key] = run_stage(stage, key, evaluator, config, context, checkpoint, edit)
            edit = outcomes[key].chosen

    clock = time.perf_counter()
    measured = data.has_questions or evaluator.prompts("test")
    test = evaluator.evaluate("test", edit, progress=progress) if measured else None
    several = each_concept(names, evaluators, edit, concept_rows) if len(names) > 1 else {}
    timings["test_evaluation"] = time.perf_counter() - clock
    if edit is not None:
        apply_verified(edit, lm.model)

    results = build_results(config, run_fingerprint, lm, data, stages, outcomes, test, evaluator, timings)
    results.update(several)
    if out is not None:
        clock = time.perf_counter()
        save_outputs(out, lm, edit, results)
        results["timings"]["save"] = time.perf_counter() - clock
        finish(out, results)
        publish(out, results)
    return ErasureResult(results=results, lm=lm, edit=edit, out=out)


def run_stage(stage: Stage, key: StageKey, evaluator: Evaluator, config: RunConfig, context: methods.MethodContext,
              checkpoint: RunCheckpoint, base_edit) -> StageOutcome:
    """Fit the stage's method (on the model with ``base_edit`` applied), evaluate its grid
    (``key`` in the checkpoint) and choose; the chosen edit is composed with ``base_edit``."""
    clock = time.perf_counter()
    lm, data, timings = evaluator.lm, evaluator.data, checkpoint.timings
    stage_time = "ember_grid" if stage.plug_in else "method_grid"
    if nothing_to_erase(stage, data, evaluator, config):
        # no candidate can win (selection.py), so fitting and sweeping the grid is wasted work
        context.log(f"{key}: not fitted: {NOTHING_TO_ERASE} (TRAIN questions)")
        timings[stage_time] = time.perf_counter() - clock
        return StageOutcome([], base_edit, {}, {"skipped": NOTHING_TO_ERASE})
    if base_edit is not None:
        context = replace(context, vocabulary=lm.model.get_output_embeddings().weight.detach().clone())
    method = methods.get(stage.name)
    with applied(None if method.FITS_BEFORE_PLUG_IN else base_edit, lm.model):
        fitted = method.fit(lm, data, stage.config, config.seed, context)
    earlier = checkpoint.seconds_before_resume(str(key))
    if earlier:  # candidates an interrupted run evaluated: read back, their seconds still count
        timings["resumed_grid"] = timings.get("resumed_grid", 0.0) + earlier
    results, edits = sweep(str(key), fitted, evaluator, config, checkpoint, base_edit=base_edit,
                           ember_rule=stage.plug_in, stop_on_reject=stage.plug_in and not stage.fixed)
    if not stage.plug_in:
        measure_top_coherence(str(key), results, edits, evaluator, config, checkpoint)
    pick = 0 if stage.fixed else choose(results, config.evaluation.choice)
    report = fitted.report()
    timings.update({f"{stage.name}_{k}": v for k, v in report.pop("timings", {}).items()})
    timings[stage_time] = time.perf_counter() - clock
    params = results[pick].params if pick is not None else {}
    if stage.plug_in and results:  # the strength in force (0: nothing applied)
        report.update(params or {name: 0.0 for name in results[0].params})
    return StageOutcome(results, edits[pick] if pick is not None else base_edit, params, report)


def nothing_to_erase(stage: Stage, data: ConceptData, evaluator: Evaluator, config: RunConfig) -> bool:
    """Neither the original's TRAIN QA accuracy nor its probability of the correct option shows
    knowledge: no candidate of the stage's grid can win, so it is not fitted (unless the
    strength is fixed or the user asks)."""
    return (not stage.fixed and data.has_questions and not config.evaluation.fit_at_chance
            and "qa" in evaluator.original_near_chance("train", ("qa",)))


def each_concept(names: list[str], evaluators: dict[str, Evaluator], edit, concept_rows: dict[str, set[int]]) -> dict:
    """Several concepts: each one's TEST numbers under the whole edit, and the cross table:
    concept Y's QA accuracy under concept X's EMBER rows alone (rows that several concepts
    edited carry every concept's edit; they are listed in ``shared_token_ids``)."""
    per_concept = {}
    for name in names:
        outcome = evaluators[name].evaluate("test", edit, coherence=False)
        per_concept[name] = RunResults("erase", name, "", "", 0, outcome.results()).to_dict()
    result: dict = {"concepts": per_concept}
    patch = next((part for part in parts_of(edit) if isinstance(part, EmbeddingPatch)), None)
    if patch is None or not concept_rows:
        return result
    result["shared_token_ids"] = [int(t) for t in patch.metadata.get("shared_token_ids", "").split(",") if t]
    result["edited_token_count"] = len(patch.changed_token_ids())  # every concept's rows, shared ones once
    result["cross"] = {}
    for x, rows in concept_rows.items():
        alone = patch.restricted_to(rows)
        result["cross"][x] = {y: evaluators[y].evaluate("test", alone, coherence=False).results().to_dict()["qa_test"]
                              for y in names}
    return result


GAP_METRICS = ("efficacy", "specificity", "coherence")


def train_test_gap(outcomes: dict[StageKey, StageOutcome], test_metrics: dict) -> dict:
    """The chosen candidate's metrics on TRAIN (where the grid chose it) beside TEST: a gate
    passed on TRAIN prompts and questions does not promise the same on new ones. {} when
    nothing was chosen."""
    chosen = [o for o in outcomes.values() if o.params]
    if not chosen:
        return {}
    final = chosen[-1]
    train = next(r for r in final.sweep if r.params == final.params).metrics
    return {name: {"train": train[name]["value"], "test": test_metrics[name].value,
                   "gap": train[name]["value"] - test_metrics[name].value}
            for name in GAP_METRICS if name in train and name in test_metrics}


def build_results(config: RunConfig, run_fingerprint: str, lm: LoadedModel, data: ConceptData, stages: list[Stage],
                  outcomes: dict[StageKey, StageOutcome], test, evaluator: Evaluator, timings: dict) -> dict:
    plug_ins = {key: outcome for key, outcome in outcomes.items() if key.method == PLUG_IN}
    plug_in = next(iter(plug_ins.values()), None)
    base = next((outcomes[StageKey(s.name)] for s in stages if not s.plug_in), None)
    ember_report = plug_in.report if plug_in else {}
    tied = embeddings_are_tied(lm.model)
    parts = {
        "model_source": lm.source,
        "config_fingerprint": run_fingerprint,
        "delta": ember_report.get("delta", 0.0) if plug_in else None,  # 0: nothing applied
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
                    **{str(key): outcome.report for key, outcome in outcomes.items()}},
        "config": config.to_dict(),
    }
    split = test.results() if test is not None else None
    if test is not None:
        parts.update(near_chance=dict(split.near_chance), coverage=test.coverage, examples=test.examples,
                     per_question=test.per_question(), per_prompt=test.per_prompt(),
                     train_test_gap=train_test_gap(outcomes, test.metrics))
    if len(plug_ins) > 1:  # several concepts: EMBER's strength and grid per concept
        parts["delta"] = {key.concept: outcome.report.get("delta") for key, outcome in plug_ins.items()}
        parts["features"] = [f for outcome in plug_ins.values() for f in outcome.report.get("features", [])]
        parts["delta_sweep"] = [{**asdict(r), "params": {"concept": key.concept, **r.params}}
                                for key, outcome in plug_ins.items() for r in outcome.sweep]
    elif plug_in is not None:
        parts["delta_sweep"] = [asdict(r) for r in plug_in.sweep]
    if base is not None:
        parts["method_sweep"] = [asdict(r) for r in base.sweep]
    method = config.method + ("+ember" if config.with_ember and config.method != PLUG_IN else "")
    results = RunResults("erase", data.concept, method, lm.name, config.seed, split, parts).to_dict()
    if split is None:
        results["test"] = {}
    return results
