"""`obliviate compare`: methods x concepts, with and without EMBER, each cell attacked by
relearning, into one table (compare.csv and compare.md in --out).

Each cell is an ordinary `erase` run in DIR/<concept>/<method>[+ember], followed by the
relearning attack on the erased model (obliviate.pipeline.cells; a finished erase or attack
is read back, so an interrupted comparison resumes cell by cell): test QA accuracy after
each relearning epoch, the share of the original model's knowledge it regains, and the
seconds of each part (times.csv); report.html plots them all. The attack is skipped where
it would measure nothing: no edit was applied, or the original's QA is near chance (unless
--relearn-near-chance). After the last cell, metrics pooled over concepts and paired
differences (obliviate summarize's) go to compare.md's "Pooled" section and pooled.json.
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import re
from pathlib import Path

from obliviate import methods
from obliviate.commands.arguments import add_run_arguments, add_set_argument, collect_overrides, comma_list, parse_settings
from obliviate.errors import ObliviateError
from obliviate.data.concepts import resolve_concept
from obliviate.reports.html import ReportRun, write_report
from obliviate.evaluation.metrics import CHANCE, knowledge_fraction
from obliviate.evaluation.results import HEADLINE, RunResults
from obliviate.io import exclusive_output, write_json, write_text

SHOWN = tuple(name for name in HEADLINE if name != "score")
COLUMNS = ("concept", "method", "ember", "delta", "params", *SHOWN, "qa_test_base", "qa_test_edited")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, one_concept=False)
    parser.add_argument("--methods", required=True, help=f"comma-separated, from: {', '.join(methods.available())}")
    parser.add_argument("--concepts", required=True, help="comma-separated benchmark concepts, or all (every concept of the benchmark)")
    parser.add_argument("--with-and-without-ember", action="store_true",
                        help="run every method twice: alone and on top of the EMBER edit")
    parser.add_argument("--relearn-epochs", type=int, default=2, help="relearning attack epochs (0: no attack; reference 2)")
    parser.add_argument("--relearn-paragraphs", type=int, default=100, help="relearning paragraphs (reference 100)")
    parser.add_argument("--relearn-near-chance", action="store_true",
                        help="also attack concepts whose original QA is near chance (skipped by default: no knowledge "
                             "to regain, and pooled statistics leave them out)")
    add_set_argument(parser, "METHOD", "rmu.steps=10")


def cell_settings(settings: dict[str, dict], method: str, ember: bool) -> dict[str, dict]:
    """The --set settings one cell runs with: its method's, and EMBER's when it runs EMBER
    first. Another method's setting must not change the cell (its fingerprint decides
    whether a finished cell is read back)."""
    return {name: values for name, values in settings.items() if name == method or (ember and name == methods.PLUG_IN)}


def plan(method_list: str, concept_list: str, both: bool, available: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """The cells, concept by concept. ``available``: the benchmark's concepts (from --data),
    which "all" stands for and every named concept must be one of (checked before any run)."""
    names = comma_list(method_list)
    for name in names:
        methods.get(name)  # unknown names: a clear error listing the methods
    concepts = comma_list(concept_list)
    if concepts == ["all"]:
        if available is None:
            raise ObliviateError("--concepts all needs a benchmark folder (--data), not a concept of your own.")
        concepts = list(available)
    if available is not None:
        concepts = [resolve_concept(c, available) for c in concepts]  # case-insensitive; unknown names fail here
    if not names or not concepts:
        raise ObliviateError("--methods and --concepts each need at least one name.")
    variants = (False, True) if both else (False,)
    return [(c, m, e) for c in concepts for m in names for e in variants if not (m == "ember" and e)]


def cell_row(concept: str, method: str, ember: bool, results: RunResults) -> dict:
    value = lambda name: results.metric(name).value if results.metric(name) is not None else ""  # noqa: E731
    base = value("qa_base") if results.metric("qa_base") is not None else None
    row = {"concept": concept, "method": method, "ember": ember, "delta": results.parts.get("delta"),
           "params": results.parts.get("params"), **{name: value(name) for name in SHOWN}, "qa_test_base": base,
           "qa_test_edited": value("qa_edited")}
    curve = results.parts.get("relearn", {}).get("erased", {}).get("curve", [])
    for epoch, point in enumerate(curve[1:], start=1):
        row[f"qa_after_relearn_epoch_{epoch}"] = point["value"]
    if curve and base is not None and not results.original_near_chance(base):  # else nothing to regain
        row["relearn_regained"] = knowledge_fraction(curve[-1]["value"], base, results.chance_levels().get("qa", CHANCE))
    return row


def write_times(out: Path, cells: dict[str, RunResults]) -> None:
    """times.csv: each cell's seconds per part (apart from the tables: no two runs share them)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["cell", "erase_seconds", "relearn_seconds"])
    for name, results in cells.items():
        times = results.parts.get("times", {})
        writer.writerow([name, *(f"{times[part]:.0f}" if part in times else "" for part in ("erase", "relearn"))])
    write_text(out / "times.csv", text.getvalue())


def write_table(out: Path, rows: list[dict], appendix: str = "") -> None:
    columns = list(COLUMNS) + sorted({k for r in rows for k in r if k not in COLUMNS})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "compare.csv", text.getvalue())
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    write_text(out / "compare.md", "\n".join(lines) + "\n" + appendix)


def pooled_section(out: Path, cells: dict[str, RunResults]) -> str:
    """Pooled metrics and paired differences of the cells with per-question results
    (pooled.json, and the markdown for compare.md); "" when no cell has them."""
    from obliviate.evaluation.pooled import arm_from_results
    from obliviate.commands.summarize import markdown, summarize

    usable = {name: r for name, r in cells.items() if "per_question" in r.parts}
    skipped = sorted(name for name in cells if name not in usable)
    if not usable:
        print("pooled statistics: no cell has per-question results (rerun the cells with this version).")
        return ""
    summary = summarize([arm_from_results(r, where=name) for name, r in usable.items()])
    summary["cells_without_per_question"] = skipped
    write_json(out / "pooled.json", summary)
    note = f"\nCells left out (no per-question results, rerun them): {', '.join(skipped)}.\n" if skipped else ""
    return "\n## Pooled\n\n" + markdown(summary) + note


def run(args: argparse.Namespace) -> int:
    from obliviate.api import make_config
    from obliviate.attacks import relearning
    from obliviate.data.concepts import list_concepts
    from obliviate.pipeline.cells import run_cell

    if args.relearn_epochs < 0 or args.relearn_paragraphs < 1:
        raise ObliviateError("--relearn-epochs must be >= 0 and --relearn-paragraphs >= 1.")
    settings = parse_settings(args.settings)
    overrides = collect_overrides(args)
    data_dir = make_config(args.config_file, **overrides).data.data_dir()  # --data, the YAML's, or the packaged one
    cells = plan(args.methods, args.concepts, args.with_and_without_ember, list_concepts(data_dir) if data_dir else None)
    out = Path(overrides.pop("out", None) or "runs/compare")
    attack = relearning.Config(epochs=args.relearn_epochs, paragraphs=args.relearn_paragraphs) if args.relearn_epochs else None
    with exclusive_output(out):  # one writer per comparison folder
        rows, done = [], {}
        for concept, method, ember in cells:
            cell = out / re.sub(r"[^\w.-]+", "_", concept) / (method + ("+ember" if ember else ""))
            config = make_config(args.config_file, **{**overrides, "concept": concept, "method": method,
                                                      "with_ember": ember, "out": str(cell),
                                                      "methods": cell_settings(settings, method, ember)})
            results = run_cell(config, attack, progress=args.progress, near_chance_too=args.relearn_near_chance)
            rows.append(cell_row(concept, method, ember, results))
            done[f"{cell.parent.name}/{cell.name}"] = results
            write_table(out, rows)  # after every cell, so a partial comparison is readable
            write_times(out, done)
            write_report([ReportRun(name, r) for name, r in done.items()], out)  # report.html, summary.csv
            gc.collect()
        write_table(out, rows, pooled_section(out, done))
    print(f"\n{len(rows)} runs -> {out / 'compare.csv'}, {out / 'compare.md'} and {out / 'report.html'}")
    print((out / "compare.md").read_text(encoding="utf-8"))
    return 0
