"""Human-readable summaries of a run's results (a short Markdown report)."""
from __future__ import annotations

from typing import Mapping

from obliviate.evaluation.metrics import QUESTION_SETS, GateOn, Interval, below_gate
from obliviate.evaluation.results import HEADLINE, METRICS, RunResults, set_key

SHOWN = tuple(name for name in HEADLINE if name != "score")  # the score is the grids' business


def fmt(metric: Interval | Mapping | None) -> str:
    """0.42 [0.30, 0.55] from an interval (or its {value, low, high} form in results.json)."""
    if not metric:
        return "n/a"
    if isinstance(metric, Interval):
        metric = metric.as_dict()
    return f"{metric['value']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


def _question_sets(results: RunResults) -> dict[str, dict[str, Interval]]:
    return results.test.question_sets() if results.test is not None else {}


def print_summary(results: RunResults, model_label: str = "edited") -> None:
    """Test accuracies (original vs the model) and the derived metrics, for the terminal."""
    for name, pair in _question_sets(results).items():
        print(f"  {set_key(name):13s} original {fmt(pair['base'])}  {model_label} {fmt(pair['edited'])}")
    for name in SHOWN:
        if results.metric(name) is not None:
            print(f"  {name:15s} {fmt(results.metric(name))}")
    flagged = [name for name, near in results.near_chance.items() if near]
    if flagged:
        print("  near chance (the original's accuracy and probability of the correct option show no knowledge): "
              + ", ".join(flagged))
    gap = results.parts.get("train_test_gap", {})
    if gap:
        print("  chosen on TRAIN -> TEST: " + ", ".join(f"{name} {g['train']:.2f} -> {g['test']:.2f}"
                                                     for name, g in gap.items()))


def _accuracy_rows(results: RunResults) -> list[str]:
    rows = ["| set (test) | original | edited |", "| --- | --- | --- |"]
    for name, pair in _question_sets(results).items():
        rows.append(f"| {set_key(name)} | {fmt(pair['base'])} | {fmt(pair['edited'])} |")
    return rows if len(rows) > 2 else ["No questions were given: no accuracy is claimed."]


def _sweep_rows(sweep: list[dict], coherence_gate: float | None, gate_on: GateOn = "value") -> list[str]:
    rows = ["| params | efficacy | specificity | coherence | concept fluency | score | note |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in sweep:
        m = entry["metrics"]
        value = lambda k: f"{m[k]['value']:.3f}" if k in m else "n/a"  # noqa: E731
        note = entry["rejected"] or ""
        if not note and coherence_gate is not None and below_gate(m.get("coherence"), coherence_gate, gate_on):
            note = f"coherence{' (interval low end)' if gate_on == 'low' else ''} < {coherence_gate}: scores 0"
        rows.append(
            f"| {entry['params']} | {value('efficacy')} | {value('specificity')} | {value('coherence')} | "
            f"{value('concept_fluency')} | {entry['score']:.3f} | {note} |"
        )
    return rows


def no_candidate_chosen(results: RunResults) -> str | None:
    """A sentence saying a grid chose nothing, and why (None when it chose)."""
    parts = results.parts
    if parts.get("delta_sweep") and not parts.get("delta") and "method_sweep" not in parts:
        reasons = sorted({r["rejected"] for r in parts["delta_sweep"] if r.get("rejected")})
        why = "; ".join(reasons) if reasons else "every delta scored 0 (coherence on general prompts below the gate)"
        return (f"No delta was applied: {why}. The result is the original model; --delta applies a fixed "
                "strength anyway (the grid table in report.md shows every candidate).")
    if not parts.get("method_sweep") or parts.get("params"):
        return None
    gates = parts.get("config", {}).get("evaluation", {})
    kept = "the EMBER-edited model" if results.method.endswith("+ember") else "the original model"
    coherence = gates.get("method_coherence_gate")
    return (f"No grid point passed the gates (general-knowledge fraction >= {gates.get('method_general_gate')}, "
            f"QA fraction <= {gates.get('method_max_qa_frac')}"
            + (f", coherence >= {coherence}" if coherence is not None else "") + f"): the result is {kept}. "
            "The grid table says why; loosen a gate (--method-general-gate, --method-max-qa-frac"
            + (", --method-coherence-gate" if coherence is not None else "") + ") or change the grid (--set).")


OUTPUT_ROWS = {
    "neutral": "tied embeddings untied; the edited tokens' output rows set to the mean output row (nothing original saved)",
    "original": "tied embeddings untied as the reference does: only the input rows changed, lm_head keeps the originals",
    "shared": "tied embeddings edited together: the output rows got the same edit",
    "separate": "a separate output layer, untouched",
}


def _noise_lines(results: RunResults) -> list[str]:
    """Absolute drops with paired intervals, the continuous measure, and near-chance flags."""
    metrics = results.test.metrics if results.test is not None else {}
    lines = []
    for name in QUESTION_SETS:
        if f"{name}_drop" in metrics:
            prob = f"; probability of the correct option {fmt(metrics.get(f'{name}_prob_base'))} -> " \
                   f"{fmt(metrics.get(f'{name}_prob_edited'))}" if f"{name}_prob_base" in metrics else ""
            lines.append(f"- {name}: accuracy drop {fmt(metrics[f'{name}_drop'])}{prob}")
    flagged = [name for name, near in results.near_chance.items() if near]
    if flagged:
        lines.append(f"- near chance (the original's 95% interval reaches chance; its fraction is noise and is left "
                     f"out of specificity and pooled efficacy): {', '.join(flagged)}")
    return ["", *lines] if lines else []


def _coverage_rows(coverage: dict) -> list[str]:
    """Which questions contain an edited token, and accuracy on each part."""
    sets = [name for name in QUESTION_SETS if name in coverage]
    if not sets:
        return []
    rows = ["", "## Coverage: questions that contain an edited token", "",
            "| set | touched | touched: original -> edited | untouched: original -> edited |", "| --- | --- | --- | --- |"]
    for name in sets:
        c = coverage[name]
        part = lambda k: (f"{fmt(c[k].get('base'))} -> {fmt(c[k].get('edited'))}" if c[k] else "-")  # noqa: E731
        rows.append(f"| {name} | {c['touched']}/{c['total']} ({c['share']:.0%}) | {part('touched_accuracy')} | "
                    f"{part('untouched_accuracy')} |")
    for kind in ("general_prompts", "concept_prompts"):
        if kind in coverage:
            rows.append(f"\n{kind.replace('_', ' ')}: {coverage[kind]['touched']}/{coverage[kind]['total']} contain an edited token.")
    return rows


def _example_rows(examples: dict) -> list[str]:
    titles = {"general": "general prompts (coherence)", "concept": "concept text (fluency diagnostic)"}
    rows = []
    for kind, items in examples.items():
        rows += ["", f"## Generations on {titles.get(kind, kind)}: original vs edited", "",
                 "| prompt | original | edited |", "| --- | --- | --- |"]
        clean = lambda t: t.replace("|", "\\|").replace("\n", " ").strip()  # noqa: E731
        rows += [f"| {clean(e['prompt'])} | {clean(e['original'])} | {clean(e['edited'])} |" for e in items]
    return rows


def _concept_rows(results: RunResults) -> list[str]:
    """Several concepts: each one's TEST QA under the whole edit, and the cross table."""
    concepts = results.parts.get("concepts") or {}
    if not concepts:
        return []
    names = list(concepts)
    rows = ["", "## Each concept (TEST), and the cross table", "",
            "| concept | QA original | QA erased | efficacy | " + " | ".join(f"QA of {n} under these rows alone" for n in names) + " |",
            "|" + " --- |" * (4 + len(names))]
    for name, entry in concepts.items():
        cross = results.parts.get("cross", {}).get(name, {})
        cells = [fmt(cross.get(other, {}).get("edited")) if cross else "-" for other in names]
        rows.append(f"| {name} | {fmt(entry['qa_test']['base'])} | {fmt(entry['qa_test']['edited'])} | "
                    f"{fmt(entry.get('efficacy'))} | " + " | ".join(cells) + " |")
    shared = results.parts.get("shared_token_ids")
    if shared is not None:
        rows.append(f"\nRows edited for several concepts (they carry every such edit): {len(shared)}.")
    return rows


def _feature_rows(features: list[dict], limit: int = 12) -> list[str]:
    if not features:
        return ["No feature was selected: the edit changes nothing."]
    rows = ["| feature | ratio | concept share | top tokens |", "| --- | --- | --- | --- |"]
    for f in features[:limit]:
        tokens = ", ".join(repr(t.strip()) for t in f["top_tokens"][:10])
        rows.append(f"| {f['index']} | {f['ratio']:.1f} | {f['concept_share']:.2f} | {tokens} |")
    return rows


def _leak_lines(results: RunResults) -> list[str]:
    """The leak check's verdict, and the untied-embeddings warning when it applies."""
    check = results.parts.get("leak_check")
    lines = [] if not check else [
        f"Leak check: {'passed' if check['passed'] else 'FAILED'} ({check['tensors_checked']} tensors checked, "
        f"{check.get('leak_count', len(check['leaks']))} saved rows equal an edited token's original row)."]
    if results.parts.get("leak_warning"):
        lines += ["", f"> **Warning:** {results.parts['leak_warning']}"]
    return ["", *lines] if lines else []


def markdown_report(results: RunResults) -> str:
    parts = results.parts
    untied = "untied" if parts.get("embeddings_untied") else "tied"
    lines = [
        f"# Erasure of {results.concept!r} with {results.method}",
        "",
        f"Model: {results.model} (`{parts.get('model_source')}`); seed {results.seed}; "
        f"{OUTPUT_ROWS.get(parts.get('output_rows'), 'output embeddings ' + untied)}.",
        f"General knowledge: {parts.get('general_knowledge_source')}. Intervals are 95% bootstrap intervals over "
        "questions.",
        *_leak_lines(results),
        "",
        "## Test questions (final numbers, measured once)",
        *_accuracy_rows(results),
        "",
    ]
    lines += [f"- {METRICS[name].label}: {fmt(results.metric(name))}" for name in SHOWN
              if results.metric(name) is not None]
    lines += _concept_rows(results)
    lines += _noise_lines(results) + _coverage_rows(parts.get("coverage", {})) + _example_rows(parts.get("examples", {}))
    if parts.get("delta") is not None:
        lines += ["", f"## EMBER: delta = {parts['delta']}, {parts.get('edited_token_count')} tokens edited", ""]
        lines += _feature_rows(parts.get("features", []))
        tokens = parts.get("details", {}).get("ember", {}).get("edited_tokens", [])
        if tokens:
            lines += ["", "Most-changed tokens: " + ", ".join(repr(t) for t in tokens[:40])]
    gates = parts.get("config", {}).get("evaluation", {})
    for key, title, gate in (("delta_sweep", "EMBER delta grid (train questions)", gates.get("coherence_gate")),
                             ("method_sweep", "Method grid (train questions)", gates.get("method_coherence_gate"))):
        if parts.get(key):
            lines += ["", f"## {title}", *_sweep_rows(parts[key], gate, gates.get("coherence_gate_on", "value"))]
    nothing_chosen = no_candidate_chosen(results)
    if nothing_chosen:
        lines += ["", nothing_chosen]
    lines += ["", "## Timings (seconds)", ""]
    lines += [f"- {stage}: {seconds:.1f}" for stage, seconds in parts.get("timings", {}).items()]
    return "\n".join(lines) + "\n"
