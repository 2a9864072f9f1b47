"""How a grid's candidates are judged and one is chosen (METHOD.md sections 1 and 4).

Two rules, as in the reference code:
- the plug-in's grid (EMBER's deltas): a candidate whose general-knowledge fraction is
  below 0.9 is rejected (the monotone grid stops there); one whose coherence on GENERAL
  prompts is below 0.9 scores 0; otherwise score = harmonic(efficacy, specificity, coherence).
- a base method's grid (RMU, ELM, SNMF, ECO, ...): a cell whose general-knowledge fraction
  is below 0.7 or whose QA fraction stays above 0.6 is discarded; cells rank by
  harmonic(efficacy, specificity); coherence is then measured on the top few only (and
  gates them only if the user asks).
A question set where neither the original's accuracy nor its probability of the correct
option shows knowledge cannot veto a candidate (its fraction's denominator is noise); a
concept whose QA set is so has nothing measurable to erase, so no candidate can win on it.
A set at chance by accuracy alone is judged on the probability. If every score is 0, no edit is applied.
"""
from __future__ import annotations

import time
from typing import Iterator

from obliviate.config import RunConfig
from obliviate.edits.protocol import CompositeEdit, applied
from obliviate.evaluation.evaluator import Evaluator, SplitOutcome
from obliviate.evaluation.metrics import below_gate
from obliviate.pipeline.checkpoint import CandidateResult, RunCheckpoint
from obliviate.progress import progress_bar

COHERENCE_METRICS = ("coherence", "fluency", "repetition", "concept_fluency")  # measured on the top cells


def selection_rules(config: RunConfig) -> dict:
    """The gates and ranking the grids used, as results.json records them."""
    ev = config.evaluation
    return {
        "ember": {"reject_general_frac_below": ev.general_gate, "zero_coherence_below": ev.coherence_gate,
                  "rank_by": "harmonic(efficacy, specificity, coherence)"},
        "coherence_gated_on": {"value": "the candidate's point value",
                               "low": "the low end of the candidate's 95% interval"}[ev.coherence_gate_on],
        "base_method": {"reject_general_frac_below": ev.method_general_gate,
                        "reject_qa_frac_above": ev.method_max_qa_frac, "rank_by": "harmonic(efficacy, specificity)",
                        "coherence_measured_on_top": ev.method_coherence_top,
                        "zero_coherence_below": ev.method_coherence_gate},
        "concept_fluency_gated": ev.gate_concept_fluency,
        "near_chance": "a set whose original accuracy's 95% Wilson interval reaches chance (1 / options, averaged over "
                       "its questions: 0.25 for four) and whose mean probability of the correct option's 95% "
                       "interval reaches chance plus one question's worth (1 / n) does not veto a candidate and is "
                       "left out of specificity; a QA set at chance by both means nothing measurable to erase (no "
                       "candidate wins); a set at chance by accuracy only is judged on the correct option's "
                       "probability (judged_by_probability)",
        "choice": {"best": "the highest score; ties to the larger drop of the correct option's probability on "
                           "TRAIN QA, then to the earlier candidate (reference)",
                   "one-se": "the first candidate within one bootstrap standard error of the best"}[ev.choice],
    }


NOTHING_TO_ERASE = ("the original's QA accuracy and its probability of the correct option are within noise of "
                    "chance: no measurable knowledge to erase")


def ember_score(outcome: SplitOutcome, config) -> tuple[float, float, str | None]:
    """(score, its bootstrap standard error, rejection reason) under EMBER's own gates."""
    general = outcome.value("general_frac", 1.0)
    if "general" not in outcome.near_chance and general < config.general_gate:
        return 0.0, 0.0, f"general-knowledge fraction {general:.3f} < {config.general_gate}"
    if "qa" in outcome.near_chance:
        return 0.0, 0.0, NOTHING_TO_ERASE
    if fails_coherence(outcome.metrics, config, config.coherence_gate):
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


def fails_coherence(metrics: dict, config, gate: float | None) -> bool:
    """Coherence on general prompts below ``gate`` (and, when opted in, fluency on concept text),
    judged on the point value or the interval's low end (``coherence_gate_on``). ``metrics``
    maps names to Intervals or to their dict form (saved sweeps)."""
    if gate is None:
        return False
    names = ("coherence", "concept_fluency") if config.gate_concept_fluency else ("coherence",)
    return any(below_gate(metrics.get(name), gate, config.coherence_gate_on) for name in names)


def choose(results: list[CandidateResult], rule: str = "best") -> int | None:
    """The chosen candidate; None when nothing scores above 0. ``best`` (the reference): the
    highest score; a tie (a score saturated at its ceiling, as efficacy is once the edited
    accuracy reaches chance) goes to the candidate that lowers the correct option's
    probability most (the continuous measure does not saturate), then to the earlier one in
    grid order (the smaller delta). ``one-se``: the first in grid order whose score is
    within one bootstrap standard error of the best."""
    scored = [i for i, r in enumerate(results) if r.rejected is None and r.score > 0]
    if not scored:
        return None
    best = max(scored, key=lambda i: (results[i].score, _probability_drop(results[i]), -i))
    if rule != "one-se":
        return best
    floor = results[best].score - results[best].score_se
    return next(i for i in scored if results[i].score >= floor)


def _probability_drop(result: CandidateResult) -> float:
    """How far the candidate lowered the correct option's probability on TRAIN QA (0 unmeasured)."""
    drop = result.value("qa_prob_drop")
    return 0.0 if drop != drop else drop  # NaN: a sweep saved without it


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
    name: str, fitted, evaluator: Evaluator, config: RunConfig, checkpoint: RunCheckpoint,
    base_edit=None, ember_rule: bool = False, stop_on_reject: bool = False,
) -> tuple[list[CandidateResult], list]:
    """Evaluate every candidate on TRAIN questions (resuming from ``checkpoint``'s grid
    ``name``). EMBER's rule measures coherence on every candidate; a base method's grid ranks
    without it."""
    done = list(checkpoint.grid(name))
    results, edits = [], []
    bar = progress_bar(desc=f"{name} grid (train questions)", unit="candidate", disable=None)
    incoherent = 0
    rule = ember_score if ember_rule else method_score
    concept_fluency = config.evaluation.grid_concept_fluency or config.evaluation.gate_concept_fluency
    candidates = _under(base_edit, evaluator.lm.model, fitted.candidates())
    if ember_rule and evaluator.data.has_questions:
        # the plug-in's candidates are patches built in memory: their continuations of the
        # general prompts are generated together (the stop rule may leave a few unused)
        candidates = list(candidates)
        evaluator.generate_ahead("train", [edit for _, edit in candidates[len(done):]], concept_fluency)
    for index, (params, edit) in enumerate(candidates):
        edits.append(edit)
        if index < len(done):
            results.append(done[index])
        else:
            outcome_metrics, score, se, rejected = {}, 0.0, 0.0, None
            clock = time.perf_counter()
            if evaluator.data.has_questions:
                outcome = evaluator.evaluate("train", edit, coherence=ember_rule, concept_fluency=concept_fluency)
                outcome_metrics = outcome.as_dict()["metrics"]
                score, se, rejected = rule(outcome, config.evaluation)
            results.append(CandidateResult(params, outcome_metrics, score, se, rejected, time.perf_counter() - clock))
            checkpoint.record(name, results)
        bar.update(1)
        pick = choose(results, config.evaluation.choice)  # so the last line names the chosen candidate
        bar.set_postfix(last=params, chosen=results[pick].params if pick is not None else None,
                        score=round(results[pick].score, 3) if pick is not None else 0.0)
        if not stop_on_reject:
            continue
        fails = fails_coherence(results[-1].metrics, config.evaluation, config.evaluation.coherence_gate)
        incoherent = incoherent + 1 if fails else 0
        if results[-1].rejected or 0 < config.evaluation.stop_after_incoherent <= incoherent:
            break
    bar.close()
    return results, edits


def measure_top_coherence(name: str, results: list[CandidateResult], edits: list, evaluator: Evaluator,
                          config: RunConfig, checkpoint: RunCheckpoint) -> None:
    """Coherence on general prompts (and concept fluency) for the best few candidates of a
    base method's grid, as the reference does; they score 0 only under an explicit gate."""
    ev = config.evaluation
    ranked = sorted((i for i, r in enumerate(results) if r.rejected is None and r.score > 0),
                    key=lambda i: -results[i].score)[: ev.method_coherence_top]
    for index in ranked:
        result = results[index]
        if "coherence" not in result.metrics:
            clock = time.perf_counter()
            outcome = evaluator.evaluate("train", edits[index], coherence=True, questions=False)  # scored in the sweep
            result.metrics.update({k: v.as_dict() for k, v in outcome.metrics.items()
                                   if k in COHERENCE_METRICS})
            result.seconds += time.perf_counter() - clock
            checkpoint.record(name, results)
        if fails_coherence(result.metrics, ev, ev.method_coherence_gate):
            result.score, result.score_se = 0.0, 0.0
