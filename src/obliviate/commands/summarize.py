"""`obliviate summarize`: pooled, paired statistics over erase or compare runs.

One concept's metrics are mostly noise (50 questions a split: +/-0.14 on an accuracy), so
runs are grouped by method, every metric is pooled over the method's concepts with a
stratified bootstrap, and methods are compared pairwise on the same questions
(obliviate.evaluation.pooled). Writes summary_pooled.json and summary_pooled.md.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping, Sequence

from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import CHANCE
from obliviate.evaluation.results import chance_text
from obliviate.evaluation.pooled import ORIGINAL, Arm, arm_from_results, paired_difference, pooled_metrics
from obliviate.evaluation.robustness import AttackedArm, attacked_arm, paired_worst_case, pooled_worst_case
from obliviate.io import write_json, write_text

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="an erase or attack output folder (holds results.json) or a compare folder "
                             "(CONCEPT/METHOD/results.json); attack runs give each method's pooled worst case")
    parser.add_argument("--baseline-method", default=None, metavar="M",
                        help="also compare every other method with M (paired, on their shared concepts)")
    parser.add_argument("--out", default=None,
                        help="folder for summary_pooled.json and summary_pooled.md (default: the RUN folder, "
                             "or the folder that holds all the RUNs when there are several)")
    parser.add_argument("--n-resamples", type=int, default=2000, help="bootstrap draws (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def results_files(runs: Sequence[str]) -> list[Path]:
    """results.json of every erase folder, and of every cell of every compare folder."""
    found = []
    for run in map(Path, runs):
        files = [run / "results.json"] if (run / "results.json").is_file() else sorted(run.glob("*/*/results.json"))
        if not files:
            raise ObliviateError(f"{run} holds no results.json (an erase folder) nor CONCEPT/METHOD/results.json "
                                 "(a compare folder).")
        found += files
    return found


def pairs(methods: Sequence[str], baseline: str | None) -> list[tuple[str, str]]:
    """(A, B) comparisons: every "X+ember" vs "X", "ember" vs the original, and with a
    baseline M every other method vs M."""
    out = [(m, m[:-len("+ember")]) for m in methods if m.endswith("+ember") and m[:-len("+ember")] in methods]
    if "ember" in methods:
        out.append(("ember", ORIGINAL))
    if baseline is not None:
        if baseline not in methods:
            raise ObliviateError(f"--baseline-method {baseline!r} has no runs; methods: {', '.join(methods)}.")
        out += [(m, baseline) for m in methods if m != baseline and (m, baseline) not in out]
    return out


def summarize(arms: Sequence[Arm], baseline: str | None = None, n_resamples: int = 2000, seed: int = 0,
              attacked: Sequence[AttackedArm] = ()) -> dict:
    """Pooled metrics a method and the paired differences, as JSON-ready dicts; with attack
    runs (``attacked``), each method's worst case over the battery and its paired differences."""
    by_method: dict[str, list[Arm]] = {}
    for arm in arms:
        by_method.setdefault(arm.method, []).append(arm)
    methods = sorted(by_method)
    # One number where every set of every concept has the same chance level (0.25: four options).
    levels = {f"{arm.concept}/{name}": arm.chance_of(name) for arm in arms for name in arm.questions}
    distinct = set(levels.values())
    chance = (distinct.pop() if distinct else CHANCE) if len(distinct) <= 1 else chance_text(levels)
    summary = {"chance": chance, "n_resamples": n_resamples, "seed": seed, "methods": {}, "differences": []}
    for method in methods:
        pooled = pooled_metrics(by_method[method], n_resamples, seed)
        summary["methods"][method] = {"concepts": sorted(a.concept for a in by_method[method]),
                                      "metrics": {k: v.as_dict() for k, v in pooled.items()}}
    known = set(methods) | {arm.method for arm in attacked}
    if baseline is not None and baseline not in known:
        raise ObliviateError(f"--baseline-method {baseline!r} has no runs; methods: {', '.join(sorted(known))}.")
    for a, b in pairs(methods, baseline if baseline in methods else None):
        diff = paired_difference(by_method[a], None if b == ORIGINAL else by_method[b], n_resamples, seed)
        summary["differences"].append({"a": a, "b": b, "metrics": {k: v.as_dict() for k, v in diff.items()}})
    if attacked:
        summary.update(worst_cases(attacked, baseline, n_resamples, seed))
    return summary


def worst_cases(attacked: Sequence[AttackedArm], baseline: str | None, n_resamples: int, seed: int) -> dict:
    """worst_case_recovered pooled a method, and paired between the methods ``pairs`` names."""
    by_method: dict[str, list[AttackedArm]] = {}
    for arm in attacked:
        by_method.setdefault(arm.method, []).append(arm)
    methods = sorted(by_method)
    return {
        "worst_case": {m: {**pooled_worst_case(by_method[m], n_resamples, seed).as_dict(),
                           "attacks": sorted({name for a in by_method[m] for name in a.attacked}),
                           "left_out": {f"{a.concept}/{k}": v for a in by_method[m] for k, v in a.left_out.items()}}
                       for m in methods},
        "worst_case_differences": [{"a": a, "b": b, **paired_worst_case(by_method[a], by_method[b], n_resamples,
                                                                         seed).as_dict()}
                                   for a, b in pairs(methods, baseline if baseline in methods else None)
                                   if b != ORIGINAL],
    }


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def interval_text(entry: Mapping) -> str:
    if entry["n_concepts"] == 0:
        return "-"
    return f"{number(entry['value'])} [{number(entry['low'])}, {number(entry['high'])}]"


def reasons_text(entry: Mapping) -> str:
    notes = {**entry["excluded"], **{c: f"kept; {why}" for c, why in entry["adjusted"].items()}}
    return "; ".join(f"{c}: {why}" for c, why in sorted(notes.items()))


def markdown(summary: Mapping) -> str:
    """One table a method, one a comparison (intervals: 95%, stratified bootstrap)."""
    lines = [f"Pooled over concepts, 95% stratified bootstrap intervals ({summary['n_resamples']} draws, "
             f"seed {summary['seed']}); chance = {summary['chance']}."]
    for method, entry in summary["methods"].items():
        lines += ["", f"### {method} ({len(entry['concepts'])} concepts)", "",
                  "| metric | value [95% interval] | n concepts | left out |", "| --- | --- | --- | --- |"]
        lines += [f"| {m} | {interval_text(e)} | {e['n_concepts']} | {reasons_text(e)} |"
                  for m, e in entry["metrics"].items()]
    for diff in summary["differences"]:
        lines += ["", f"### {diff['a']} minus {diff['b']} (paired)", "",
                  "| metric | difference [95% interval] | significant | min. detectable | n concepts | left out |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {m} | {interval_text(e)} | {'yes' if e['significant'] else 'no'} | "
                  f"{number(e['minimum_detectable'])} | {e['n_concepts']} | {reasons_text(e)} |"
                  for m, e in diff["metrics"].items()]
    if summary.get("worst_case"):
        lines += ["", "### worst case over the attack battery (share of the original's knowledge brought back)", "",
                  "| method | worst case [95% interval] | n concepts | attacks | left out |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {m} | {interval_text(e)} | {e['n_concepts']} | {', '.join(e['attacks'])} | {reasons_text(e)} |"
                  for m, e in summary["worst_case"].items()]
        lines += [f"| {d['a']} minus {d['b']} (paired) | {interval_text(d)} | {d['n_concepts']} | "
                  f"{'significant' if d['significant'] else 'inside the noise'} | {reasons_text(d)} |"
                  for d in summary["worst_case_differences"]]
    return "\n".join(lines) + "\n"


def default_out(runs: Sequence[str]) -> Path:
    # One RUN: that folder; several: the folder that holds them all.
    return Path(os.path.commonpath([str(Path(r).resolve()) for r in runs]))


def run(args: argparse.Namespace) -> int:
    from obliviate.pipeline.cells import read_cell

    found = [(path, read_cell(path)) for path in results_files(args.runs)]
    arms = [arm_from_results(r, where=str(path)) for path, r in found if r.kind != "attack"]
    attacked = [attacked_arm(r, where=str(path)) for path, r in found if r.kind == "attack"]
    summary = summarize(arms, args.baseline_method, args.n_resamples, args.seed, attacked)
    out = Path(args.out) if args.out else default_out(args.runs)
    text = markdown(summary)
    write_json(out / "summary_pooled.json", summary)
    write_text(out / "summary_pooled.md", text)
    print(text)
    print(f"-> {out / 'summary_pooled.json'} and {out / 'summary_pooled.md'}")
    return 0
