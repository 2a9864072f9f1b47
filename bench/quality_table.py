"""Quality of EMBER on every benchmark concept (the embedded model, 2 CPU cores).

    python bench/quality_table.py --data ../shared/data/ember-benchmark --out runs/quality \
        [--relearn-paragraphs 100]

Each concept is a full `erase` (delta chosen on TRAIN questions, numbers on TEST), written
to OUT/<concept>/; with --relearn-paragraphs N the reference relearning attack (2 epochs,
lr 1e-5) follows on the erased model. Finished concepts are skipped, so an interrupted
run resumes. Prints Markdown tables: per concept (base and edited test accuracies with 95%
intervals, efficacy, specificity, general coherence, fluency on concept text, the share of
QA questions that contain an edited token, delta, tokens), then the pooled rows (stratified
bootstrap over concepts, near-chance concepts left out and named), then the seconds each
concept took. The relearning attack is skipped where it would measure nothing: no edit was
applied, or the original's QA is near chance (obliviate.pipeline.cells).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import obliviate
from obliviate.attacks import relearning
from obliviate.data.concepts import list_concepts
from obliviate.evaluation.pooled import arm_from_results, paired_difference, pooled_metrics
from obliviate.evaluation.results import RunResults
from obliviate.io import write_json
from obliviate.pipeline.cells import run_cell


def slug(concept: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in concept).strip("_").lower()


def run_concept(concept: str, data: str, out: Path, extra: dict, paragraphs: int) -> dict:
    config = obliviate.make_config(None, concept=concept, out=str(out / slug(concept)), data={"data": data},
                                   save_model=False, **extra)
    results = run_cell(config, relearning.Config(paragraphs=paragraphs) if paragraphs else None).to_dict()
    print(f"[{concept}] " + ", ".join(f"{part} {s:.0f}s" for part, s in results["times"].items()), file=sys.stderr)
    return results


def time_table(rows: list[dict]) -> str:
    """Seconds per concept (this run's or an earlier, resumed one's) and the total."""
    lines = ["| concept | erase (s) | relearning (s) | total (s) |", "| --- | --- | --- | --- |"]
    totals = {"erase": 0.0, "relearn": 0.0}
    for r in rows:
        t = r.get("times", {})
        for part in totals:
            totals[part] += t.get(part, 0.0)
        cell = lambda part: f"{t[part]:.0f}" if part in t else "-"  # noqa: E731
        lines.append(f"| {r['concept']} | {cell('erase')} | {cell('relearn')} | {sum(t.values()):.0f} |")
    lines.append(f"| all ({len(rows)}) | {totals['erase']:.0f} | {totals['relearn']:.0f} | "
                 f"{sum(totals.values()):.0f} ({sum(totals.values()) / 60:.1f} min) |")
    return "\n".join(lines)


def _interval(entry: dict) -> str:
    return f"{entry['value']:.2f} ({entry['low']:.2f}-{entry['high']:.2f})"


def concept_table(rows: list[dict]) -> str:
    lines = [
        "| concept | QA base | QA edited | SimDom base -> edited | general base -> edited | efficacy | specificity | "
        "coherence (general) | fluency on concept text | QA coverage | delta | tokens | relearned QA (epochs) | "
        "near chance | features (top tokens) |",
        "|" + " --- |" * 15,
    ]
    for r in rows:
        value = lambda k: f"{r[k]['value']:.2f}" if k in r else "n/a"  # noqa: E731
        pair = lambda k: f"{r[k]['base']['value']:.2f} -> {r[k]['edited']['value']:.2f}"  # noqa: E731
        curve = r.get("relearn", {}).get("erased", {}).get("curve", [])
        relearned = " / ".join(f"{c['value']:.2f}" for c in curve[1:]) or "-"
        near = ",".join(k for k, v in r.get("near_chance", {}).items() if v) or "-"
        coverage = r.get("coverage", {}).get("qa", {}).get("share")
        features = "; ".join(",".join(t.strip() for t in f["top_tokens"][:4]) for f in r["features"][:2])
        lines.append(
            f"| {r['concept']} | {_interval(r['qa_test']['base'])} | {_interval(r['qa_test']['edited'])} | "
            f"{pair('simdom_test')} | {pair('general_test')} | {value('efficacy')} | {value('specificity')} | "
            f"{value('coherence')} | {value('concept_fluency')} | "
            f"{'' if coverage is None else f'{coverage:.2f}'} | {r['delta']} | {r['edited_token_count']} | "
            f"{relearned} | {near} | {features} |"
        )
    return "\n".join(lines)


def pooled_table(rows: list[dict]) -> tuple[str, dict]:
    arms = [arm_from_results(RunResults.from_dict(r), r["concept"]) for r in rows]
    pooled = {name: p.as_dict() for name, p in pooled_metrics(arms).items()}
    versus = {name: d.as_dict() for name, d in paired_difference(arms, None).items()}
    lines = ["| pooled metric | value (95% CI) | concepts | left out |", "| --- | --- | --- | --- |"]
    for name, p in pooled.items():
        if p["value"] is None:
            continue
        left_out = "; ".join(f"{c}" for c in p["excluded"]) or "-"
        lines.append(f"| {name} | {p['value']:.2f} ({p['low']:.2f}-{p['high']:.2f}) | {p['n_concepts']} | {left_out} |")
    return "\n".join(lines), {"pooled": pooled, "ember_minus_original": versus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ember-benchmark")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--concepts", default=None, help="comma-separated; default all")
    parser.add_argument("--selection", default=None, help="contrast | reference | judge")
    parser.add_argument("--relearn-paragraphs", type=int, default=0,
                        help="run the reference relearning attack on this many paragraphs (0: none; reference 100)")
    args = parser.parse_args()
    concepts = args.concepts.split(",") if args.concepts else list_concepts(args.data)
    extra = {"ember": {"selection": args.selection}} if args.selection else {}
    rows = [run_concept(c, args.data, Path(args.out), extra, args.relearn_paragraphs) for c in concepts]
    print(concept_table(rows))
    text, pooled = pooled_table(rows)
    print("\n" + text)
    print("\n" + time_table(rows))
    write_json(Path(args.out) / "pooled.json", pooled)


if __name__ == "__main__":
    main()
