"""Human-readable summaries of a run's results.json (a short Markdown report)."""
from __future__ import annotations


def fmt(metric: dict | None) -> str:
    """0.42 [0.30, 0.55] from a {value, low, high} interval."""
    if not metric:
        return "n/a"
    return f"{metric['value']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


def print_summary(results: dict, model_label: str = "edited") -> None:
    """Test accuracies (original vs the model) and the derived metrics, for the terminal."""
    for name in ("qa_test", "simdom_test", "general_test"):
        if name in results:
            print(f"  {name:13s} original {fmt(results[name]['base'])}  {model_label} {fmt(results[name]['edited'])}")
    for name in ("efficacy", "specificity", "coherence", "harmonic"):
        if name in results:
            print(f"  {name:13s} {fmt(results[name])}")


def _accuracy_rows(results: dict) -> list[str]:
    rows = ["| set (test) | original | edited |", "| --- | --- | --- |"]
    for name in ("qa_test", "simdom_test", "general_test"):
        if name in results:
            rows.append(f"| {name} | {fmt(results[name]['base'])} | {fmt(results[name]['edited'])} |")
    return rows if len(rows) > 2 else ["No questions were given: no accuracy is claimed."]


def _sweep_rows(sweep: list[dict], coherence_gate: float) -> list[str]:
    rows = ["| params | efficacy | specificity | coherence | score | note |", "| --- | --- | --- | --- | --- | --- |"]
    for entry in sweep:
        m = entry["metrics"]
        value = lambda k: f"{m[k]['value']:.3f}" if k in m else "n/a"  # noqa: E731
        note = entry["rejected"] or ""
        if not note and m.get("coherence", {}).get("value", 1.0) < coherence_gate:
            note = f"coherence < {coherence_gate}: scores 0"
        rows.append(
            f"| {entry['params']} | {value('efficacy')} | {value('specificity')} | {value('coherence')} | "
            f"{entry['score']:.3f} | {note} |"
        )
    return rows


def no_candidate_chosen(results: dict) -> str | None:
    """A sentence saying the trained method's grid chose nothing (None when it chose)."""
    if not results.get("method_sweep") or results.get("params"):
        return None
    gates = results.get("config", {}).get("evaluation", {})
    kept = "the EMBER-edited model" if results["method"].endswith("+ember") else "the original model"
    return (f"No grid point passed the gates (general-knowledge fraction >= {gates.get('general_gate')}, "
            f"coherence >= {gates.get('coherence_gate')}): the result is {kept}. The grid table says why; "
            "loosen a gate (--general-gate, --coherence-gate) or change the grid (--set).")


def _feature_rows(features: list[dict], limit: int = 12) -> list[str]:
    if not features:
        return ["No feature was selected: the edit changes nothing."]
    rows = ["| feature | ratio | concept share | top tokens |", "| --- | --- | --- | --- |"]
    for f in features[:limit]:
        tokens = ", ".join(repr(t.strip()) for t in f["top_tokens"][:10])
        rows.append(f"| {f['index']} | {f['ratio']:.1f} | {f['concept_share']:.2f} | {tokens} |")
    return rows


def _leak_lines(results: dict) -> list[str]:
    """The leak check's verdict, and the untied-embeddings warning when it applies."""
    check = results.get("leak_check")
    lines = [] if not check else [
        f"Leak check: {'passed' if check['passed'] else 'FAILED'} ({check['tensors_checked']} tensors checked, "
        f"{check.get('leak_count', len(check['leaks']))} saved rows equal an edited token's original row)."]
    if results.get("leak_warning"):
        lines += ["", f"> **Warning:** {results['leak_warning']}"]
    return ["", *lines] if lines else []


def markdown_report(results: dict) -> str:
    lines = [
        f"# Erasure of {results['concept']!r} with {results['method']}",
        "",
        f"Model: {results['model']} (`{results['model_source']}`); seed {results['seed']}; "
        f"output embeddings {'untied (only the input embedding changed)' if results['embeddings_untied'] else 'tied (the output layer changed too)'}.",
        f"General knowledge: {results['general_knowledge_source']}. Intervals are 95% bootstrap intervals over questions.",
        *_leak_lines(results),
        "",
        "## Test questions (final numbers, measured once)",
        *_accuracy_rows(results),
        "",
    ]
    for name in ("efficacy", "specificity", "coherence", "harmonic"):
        if name in results:
            lines.append(f"- {name}: {fmt(results[name])}")
    if results.get("delta") is not None:
        lines += ["", f"## EMBER: delta = {results['delta']}, {results['edited_token_count']} tokens edited", ""]
        lines += _feature_rows(results.get("features", []))
        tokens = results.get("details", {}).get("ember", {}).get("edited_tokens", [])
        if tokens:
            lines += ["", "Most-changed tokens: " + ", ".join(repr(t) for t in tokens[:40])]
    gate = results.get("config", {}).get("evaluation", {}).get("coherence_gate", 0.0)
    for key, title in (("delta_sweep", "EMBER delta grid (train questions)"), ("method_sweep", "Method grid (train questions)")):
        if results.get(key):
            lines += ["", f"## {title}", *_sweep_rows(results[key], gate)]
    nothing_chosen = no_candidate_chosen(results)
    if nothing_chosen:
        lines += ["", nothing_chosen]
    lines += ["", "## Timings (seconds)", ""]
    lines += [f"- {stage}: {seconds:.1f}" for stage, seconds in results.get("timings", {}).items()]
    return "\n".join(lines) + "\n"
