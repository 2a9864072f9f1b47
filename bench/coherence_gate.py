"""EMBER's coherence gate on the point value or on the interval's low end, over the concepts.

    python bench/coherence_gate.py --out runs/gate [--concepts Gambling,Gun] [--write PAGE]

Each concept is erased twice with the default settings, once per rule
(`--coherence-gate-on value`, the reference's, and `low`: the low end of the candidate's 95%
interval on TRAIN prompts), into OUT/<rule>/<concept>/; the second run reads the original's
answers from the results cache. Finished runs are read back, so an interrupted run resumes.
Prints, per concept and rule: the chosen delta, its TRAIN coherence (95% interval), TEST
coherence, efficacy and specificity; then each rule pooled over the concepts (stratified
bootstrap) and low minus value, paired; and how many chosen edits fell below the gate on
TEST under each rule. No setting is tuned here: the gate stays 0.9 under both rules.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import obliviate
from obliviate.data import benchmark_dir
from obliviate.data.concepts import list_concepts
from obliviate.evaluation.pooled import arm_from_results, paired_difference, pooled_metrics
from obliviate.evaluation.results import RunResults, nothing_applied
from obliviate.io import write_json, write_text
from obliviate.pipeline.cells import run_cell
from quality_table import slug  # this folder's scripts name a concept's run folder alike

RULES = ("value", "low")
SHOWN = ("efficacy", "specificity", "coherence")


def run_rule(concept: str, rule: str, data: str | None, out: Path) -> RunResults:
    config = obliviate.make_config(None, concept=concept, out=str(out / rule / slug(concept)), save_model=False,
                                   data={"data": data} if data else {}, evaluation={"coherence_gate_on": rule})
    results = run_cell(config, None)
    print(f"[{concept} / {rule}] erase {results.parts.get('times', {}).get('erase', 0):.0f} s", file=sys.stderr)
    return results


def chosen_train_coherence(results: RunResults) -> dict | None:
    """The chosen delta's coherence on TRAIN prompts, as its grid measured it."""
    delta = results.parts.get("delta")
    chosen = [r for r in results.parts.get("delta_sweep", []) if r["params"].get("delta") == delta]
    return chosen[0]["metrics"].get("coherence") if chosen else None


def _interval(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def concept_rows(runs: dict[str, dict[str, RunResults]]) -> list[str]:
    lines = ["| concept | gate on | delta | TRAIN coherence | TEST coherence | efficacy | specificity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for concept, by_rule in runs.items():
        for rule, results in by_rule.items():
            applied = not nothing_applied(results.parts)
            test = lambda name: _interval(results.metric(name).as_dict()) if applied else "-"  # noqa: E731
            lines.append(f"| {concept} | {rule} | {results.parts.get('delta') or 'none'} | "
                         f"{_interval(chosen_train_coherence(results)) if applied else '-'} | {test('coherence')} | "
                         f"{test('efficacy')} | {test('specificity')} |")
    return lines


def pooled_rows(runs: dict[str, dict[str, RunResults]]) -> tuple[list[str], dict]:
    """Each rule pooled over the concepts where an edit was applied under both, and low minus value."""
    both = [c for c, by_rule in runs.items() if not any(nothing_applied(r.parts) for r in by_rule.values())]
    arms = {rule: [arm_from_results(runs[c][rule], c) for c in both] for rule in RULES}
    pooled = {rule: pooled_metrics(arms[rule]) for rule in RULES}
    paired = paired_difference(arms["low"], arms["value"])
    lines = [f"Pooled over the {len(both)} concepts with an edit under both rules ({', '.join(both)}):", "",
             "| metric | value rule | low rule | low minus value (paired) |", "| --- | --- | --- | --- |"]
    for name in SHOWN:
        cells = [pooled[rule][name].as_dict() for rule in RULES] + [paired[name].as_dict()]
        lines.append(f"| {name} | " + " | ".join(_interval(c) if c.get("value") is not None else "-" for c in cells)
                     + " |")
    record = {"concepts": both, **{rule: {n: p.as_dict() for n, p in pooled[rule].items()} for rule in RULES},
              "low_minus_value": {n: d.as_dict() for n, d in paired.items()}}
    return lines, record


def below_gate_on_test(runs: dict[str, dict[str, RunResults]], gate: float) -> list[str]:
    lines = []
    for rule in RULES:
        below = [f"{c} ({by_rule[rule].metric('coherence').value:.2f})" for c, by_rule in runs.items()
                 if not nothing_applied(by_rule[rule].parts) and by_rule[rule].metric("coherence").value < gate]
        lines.append(f"- gate on {rule}: {len(below)} chosen edit(s) below {gate} on TEST"
                     + (f": {', '.join(below)}" if below else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the benchmark folder (default: the one the package ships)")
    parser.add_argument("--out", type=Path, default=Path("runs/gate"))
    parser.add_argument("--concepts", default=None, help="comma-separated; default all")
    parser.add_argument("--write", type=Path, default=None, help="also write the tables to this page")
    args = parser.parse_args()
    concepts = args.concepts.split(",") if args.concepts else list_concepts(args.data or benchmark_dir())
    runs = {c: {rule: run_rule(c, rule, args.data, args.out) for rule in RULES} for c in concepts}
    gate = obliviate.make_config(None, concept=concepts[0]).evaluation.coherence_gate
    pooled, record = pooled_rows(runs)
    text = "\n".join(concept_rows(runs) + ["", *pooled, "", *below_gate_on_test(runs, gate)]) + "\n"
    print(text)
    write_json(args.out / "pooled.json", record)
    if args.write:
        command = "python bench/coherence_gate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_text(args.write, f"Written by `{command}` on {datetime.date.today()} (the embedded Gemma 3 270M, "
                               f"2 CPU cores, seed 42, TEST questions, 95% intervals).\n\n"
                               f"# The coherence gate: point value or interval low end\n\n{__doc__.split(chr(10), 3)[3].strip()}\n\n"
                               + text)


if __name__ == "__main__":
    main()
