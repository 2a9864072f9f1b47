"""Quality of EMBER on every benchmark concept (the embedded model, 2 CPU cores).

    python bench/quality_table.py --data ../shared/data/ember-benchmark --out runs/quality

Each concept is a full `erase` (delta chosen on TRAIN questions, numbers on TEST), written
to OUT/<concept>/; finished concepts are skipped, so an interrupted run resumes. Prints a
Markdown table: base and edited test accuracies with 95% intervals, efficacy,
specificity, coherence, delta, tokens edited, and the top tokens of the first features.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import obliviate
from obliviate.data import list_concepts
from obliviate.report import fmt


def slug(concept: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in concept).strip("_").lower()


def run_concept(concept: str, data: str, out: Path, extra: dict) -> dict:
    results_file = out / slug(concept) / "results.json"
    if results_file.exists():
        return json.loads(results_file.read_text())
    start = time.perf_counter()
    result = obliviate.erase(concept, data=data, out=out / slug(concept), save_model=False, **extra)
    print(f"[{concept}] {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return result.results


def table(rows: list[dict]) -> str:
    lines = [
        "| concept | QA base | QA edited | SimDom base | SimDom edited | general base | general edited | efficacy | specificity | coherence | delta | tokens | features (top tokens) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = lambda k, side: f"{r[k][side]['value']:.2f} ({r[k][side]['low']:.2f}-{r[k][side]['high']:.2f})"  # noqa: E731
        value = lambda k: f"{r[k]['value']:.2f}" if k in r else "n/a"  # noqa: E731
        features = "; ".join(",".join(t.strip() for t in f["top_tokens"][:4]) for f in r["features"][:3])
        lines.append(
            f"| {r['concept']} | {acc('qa_test', 'base')} | {acc('qa_test', 'edited')} | {acc('simdom_test', 'base')} | "
            f"{acc('simdom_test', 'edited')} | {acc('general_test', 'base')} | {acc('general_test', 'edited')} | "
            f"{value('efficacy')} | {value('specificity')} | {value('coherence')} | {r['delta']} | "
            f"{r['edited_token_count']} | {features} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ember-benchmark")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--concepts", default=None, help="comma-separated; default all")
    parser.add_argument("--selection", default=None, help="contrast | reference | judge")
    args = parser.parse_args()
    concepts = args.concepts.split(",") if args.concepts else list_concepts(args.data)
    extra = {"ember": {"selection": args.selection}} if args.selection else {}
    rows = [run_concept(c, args.data, Path(args.out), extra) for c in concepts]
    print(table(rows))


if __name__ == "__main__":
    main()
