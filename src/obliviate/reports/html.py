"""The report people look at: one self-contained HTML file (plots embedded as PNG) and
summary.csv, for one run or several side by side (methods, concepts, models).

Reads the results.json of `erase`, `eval` and `attack` runs. Plots: the delta sweep
(efficacy, specificity, coherence over delta), per-concept bars of original vs erased vs
after-relearning accuracy, the relearning curve per epoch, probe accuracy per layer, and
the table of erased features with their top tokens.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.io import atomic_path, read_json, write_text

ATTACKS = ("relearn", "relearn-strong", "in-context", "adversarial", "tied-restore", "embedding-repair", "repair-relearn")
# summary.csv columns: (column, where in results, what it means)
COLUMNS = [
    ("qa_base", ("qa_test", "base"), "QA test accuracy of the original model"),
    ("qa_erased", ("qa_test", "edited"), "QA test accuracy after erasure (lower = more erased)"),
    ("simdom_erased", ("simdom_test", "edited"), "similar-domain accuracy after erasure (should stay)"),
    ("general_erased", ("general_test", "edited"), "general-knowledge accuracy after erasure (should stay)"),
    ("efficacy", ("efficacy",), "1 - share of the concept knowledge left"),
    ("specificity", ("specificity",), "share of unrelated knowledge kept"),
    ("coherence", ("coherence",), "coherence of generations for GENERAL prompts, relative to the original"),
    ("concept_fluency", ("concept_fluency",), "fluency on the concept's own prompts (diagnostic: the localized cost)"),
    ("qa_coverage", ("coverage", "qa", "share"), "share of QA test questions containing an edited token"),
    ("harmonic", ("harmonic",), "harmonic mean of efficacy and specificity"),
    ("relearn_after", ("relearn", "erased", "after"), "QA accuracy of the erased model after relearning"),
    ("relearn_recovered", ("relearn", "recovered_frac"), "share of the original knowledge relearning brings back"),
    ("in_context_after", ("in-context", "erased", "after"), "QA accuracy with concept paragraphs in context"),
    ("adversarial_worst", ("adversarial", "erased", "after"), "QA accuracy under the worst adversarial prefix"),
    ("probe_original", ("probe", "original", "after"), "best-layer probe accuracy, original (chance 0.5)"),
    ("probe_erased", ("probe", "erased", "after"), "best-layer probe accuracy, erased (chance 0.5)"),
    ("open_match_erased", ("open_ended", "qa_test", "edited", "match"), "open-ended QA answers matching the gold"),
]
METRICS = [name for name, _, _ in COLUMNS]
NEAR_CHANCE = 0.05  # original accuracy within this of chance: no knowledge to erase or recover
COLORS = {"original": "#4c72b0", "erased": "#dd8452", "relearned": "#c44e52", "efficacy": "#55a868",
          "specificity": "#4c72b0", "coherence": "#8172b3"}


def _get(results: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def _value(results: dict, path: tuple[str, ...]) -> float | None:
    found = _get(results, path)
    if isinstance(found, (int, float)) and not isinstance(found, bool):
        return float(found)  # a plain number (e.g. a coverage share)
    return found.get("value") if isinstance(found, dict) else None


def load_runs(run_dirs: list[str | Path]) -> list[dict]:
    runs = []
    for folder in run_dirs:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ObliviateError(f"{folder} has no results.json: pass folders written by erase, eval or attack.")
        results = read_json(path)
        runs.append({**results, "_name": Path(folder).name or str(folder)})
    return runs


def _label(run: dict) -> str:
    return f"{run.get('_name', '')}: {run.get('concept', '?')} / {run.get('method', '?')}"


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        row = {"run": run.get("_name", ""), "kind": run.get("kind", "erase"), "concept": run.get("concept"),
               "method": run.get("method"), "model": run.get("model")}
        for name, path, _ in COLUMNS:
            value = _value(run, path)
            if value is None and path[0] == "qa_test":  # attack runs carry their erase run's numbers
                value = _value(run.get("erase_results", {}), path)
            row[name] = value
        base = row["qa_base"] if row["qa_base"] is not None else _value(run, ("relearn", "original", "before"))
        row["note"] = ""
        if base is not None and base - 0.25 < NEAR_CHANCE:
            row["relearn_recovered"] = None  # a share of ~no knowledge is noise, not a finding
            row["note"] = f"original QA accuracy {base:.2f} is near chance: recovered fractions are undefined"
        rows.append(row)
    return rows


def write_summary_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


# ---- plots -------------------------------------------------------------------------

def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure(width: float = 4.6, height: float = 2.7):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def plot_delta_sweep(run: dict) -> str | None:
    sweep = [e for e in run.get("delta_sweep") or run.get("erase_results", {}).get("delta_sweep", []) or []]
    if not sweep:
        return None
    fig, ax = _figure()
    deltas = [e["params"]["delta"] for e in sweep]
    for name in ("efficacy", "specificity", "coherence"):
        values = [e["metrics"].get(name, {}).get("value", math.nan) for e in sweep]
        ax.plot(deltas, values, marker="o", label=name, color=COLORS[name])
    if run.get("delta") is not None:
        ax.axvline(run["delta"], color="grey", linestyle=":", label=f"chosen {run['delta']}")
    ax.set(xscale="log", xlabel="delta", ylabel="train-question metric", ylim=(-0.05, 1.05),
           title=f"Delta sweep: {run.get('concept')}")
    ax.set_xticks(deltas, [f"{d:g}" for d in deltas], fontsize=7)
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return _png(fig)


def plot_concept_bars(runs: list[dict]) -> str | None:
    groups = []
    for run in runs:
        base = _value(run, ("qa_test", "base")) or _value(run.get("erase_results", {}), ("qa_test", "base"))
        erased = _value(run, ("qa_test", "edited")) or _value(run.get("erase_results", {}), ("qa_test", "edited"))
        relearned = _value(run, ("relearn", "erased", "after"))
        if base is None and _value(run, ("relearn", "original", "before")) is not None:
            base, erased = _value(run, ("relearn", "original", "before")), _value(run, ("relearn", "erased", "before"))
        if base is not None:
            groups.append((f"{run.get('concept')}\n{run.get('method')}", base, erased, relearned))
    if not groups:
        return None
    fig, ax = _figure(max(4.6, 1.4 * len(groups)))
    width = 0.25
    for offset, (label, index) in enumerate((("original", 1), ("erased", 2), ("relearned", 3))):
        if all(g[index] is None for g in groups):
            continue
        xs = [i + (offset - 1) * width for i in range(len(groups))]
        heights = [g[index] if g[index] is not None else 0 for g in groups]
        bars = ax.bar(xs, heights, width, label=label if label != "relearned" else "erased + relearning",
                      color=COLORS[label])
        ax.bar_label(bars, labels=[f"{h:.2f}" if g[index] is not None else "" for h, g in zip(heights, groups)], fontsize=7)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.axhline(0.25, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=7)
    ax.set(ylabel="QA test accuracy", ylim=(0, 1.2), title="Original vs erased vs after relearning")
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.legend(fontsize=6, loc="upper center", ncol=4, frameon=False)
    return _png(fig)


def plot_relearn_curves(runs: list[dict]) -> str | None:
    with_relearn = [r for r in runs if isinstance(r.get("relearn"), dict)]
    if not with_relearn:
        return None
    fig, ax = _figure()
    for run in with_relearn:
        for role, style in (("original", "--"), ("erased", "-")):
            curve = _get(run, ("relearn", role, "curve"))
            if curve:
                epochs = list(range(len(curve)))
                ax.plot(epochs, [c["value"] for c in curve], style, marker="o", color=COLORS[role],
                        label=f"{role} ({run.get('concept')})" if len(with_relearn) > 1 else role)
                ax.fill_between(epochs, [c["low"] for c in curve], [c["high"] for c in curve], color=COLORS[role], alpha=0.12)
    ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="relearning epoch", ylabel="QA test accuracy", ylim=(0, 1), title="Relearning attack")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_probe(runs: list[dict]) -> str | None:
    with_probe = [r for r in runs if isinstance(r.get("probe"), dict)]
    if not with_probe:
        return None
    fig, ax = _figure()
    for run in with_probe:
        for role, style in (("original", "--"), ("erased", "-")):
            layers = _get(run, ("probe", role, "per_layer"))
            if layers:
                ax.plot(range(len(layers)), layers, style, marker=".", color=COLORS[role],
                        label=f"{role} ({run.get('concept')})" if len(with_probe) > 1 else role)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set(xlabel="layer (0 = embeddings)", ylabel="probe test accuracy", ylim=(0.4, 1.02),
           title="Linear probe: concept vs neutral")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_attacks(runs: list[dict]) -> str | None:
    rows = [(f"{a}\n{r.get('concept')}", _value(r, (a, "original", "after")), _value(r, (a, "erased", "before")),
             _value(r, (a, "erased", "after"))) for r in runs for a in ATTACKS if isinstance(r.get(a), dict)]
    if not rows:
        return None
    fig, ax = _figure(max(4.6, 1.3 * len(rows)))
    width = 0.27
    for offset, (label, color) in enumerate((("original, attacked", COLORS["original"]),
                                             ("erased, no attack", COLORS["erased"]),
                                             ("erased, attacked", COLORS["relearned"]))):
        bars = ax.bar([i + (offset - 1) * width for i in range(len(rows))], [r[offset + 1] or 0 for r in rows], width,
                      label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.axhline(0.25, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set(ylabel="QA test accuracy", ylim=(0, 1.2), title="Attacks: accuracy the attacker gets back")
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.legend(fontsize=6, loc="upper center", ncol=3, frameon=False)
    return _png(fig)


# ---- HTML --------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:14px 20px;color:#222;font-size:13px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:14px;margin:10px 0 4px}
.sub{color:#666;margin-bottom:8px} .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:8px}
.card{border:1px solid #ddd;border-radius:6px;padding:4px 8px;background:#fff} img{max-width:100%;height:auto}
.wide{overflow-x:auto} details{margin:4px 0} summary{cursor:pointer}
table{border-collapse:collapse;font-size:12px;width:100%} th,td{border-bottom:1px solid #eee;padding:2px 6px;text-align:right}
th{background:#f5f5f5;cursor:help} td.l,th.l{text-align:left}
.good{color:#2a7a2a;font-weight:600} .bad{color:#b02a2a;font-weight:600} .tok{font-family:monospace;color:#444}
"""


def _cell(name: str, value) -> str:
    if value is None:
        return "<td>–</td>"
    if not isinstance(value, float):
        return f"<td class='l'>{html.escape(str(value))}</td>"
    css = ""
    if name in ("efficacy", "specificity", "coherence", "concept_fluency", "harmonic"):
        css = "good" if value >= 0.8 else "bad" if value < 0.5 else ""
    if name == "relearn_recovered":
        css = "bad" if value >= 0.5 else "good" if value <= 0.2 else ""
    return f"<td class='{css}'>{value:.3f}</td>"


def summary_table(rows: list[dict]) -> str:
    present = [(n, d) for n, _, d in COLUMNS if any(r[n] is not None for r in rows)]
    head = "".join(f"<th title='{html.escape(d)}'>{n.replace('_', '_<wbr>')}</th>" for n, d in present)
    body = "".join("<tr>" + _cell("run", f"{r['run']} ({r['kind']})") + _cell("concept", r["concept"])
                   + _cell("method", r["method"]) + "".join(_cell(n, r[n]) for n, _ in present) + "</tr>" for r in rows)
    legend = "; ".join(f"<b>{n}</b>: {html.escape(d)}" for n, d in present)
    return (f"<div class='wide'><table><tr><th class='l'>run</th><th class='l'>concept</th><th class='l'>method</th>"
            f"{head}</tr>{body}</table></div><details class='sub'><summary>What the columns mean (accuracies on TEST "
            f"questions; chance 0.25)</summary>{legend}.</details>")


def feature_table(runs: list[dict], limit: int = 8) -> str:
    rows = []
    for run in runs:
        features = run.get("features") or run.get("erase_results", {}).get("features") or []
        for feature in features[:limit]:
            tokens = ", ".join(html.escape(t.strip()) for t in feature.get("top_tokens", [])[:12])
            rows.append(f"<tr><td class='l'>{html.escape(str(run.get('concept')))}</td><td>{feature.get('index')}</td>"
                        f"<td>{feature.get('ratio', math.nan):.1f}</td><td>{feature.get('concept_share', math.nan):.2f}</td>"
                        f"<td class='l tok'>{tokens}</td></tr>")
    if not rows:
        return ""
    return ("<table><tr><th class='l'>concept</th><th>feature</th><th>ratio</th><th>concept share</th><th class='l'>top tokens</th></tr>"
            + "".join(rows) + "</table>")


def _unique_erasures(runs: list[dict]) -> list[dict]:
    """One run per erasure, in the report's order: an attack run on an erase folder carries
    that run's sweep and features; show them once when the erase run itself is there too."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].get("kind", "erase") != "erase")  # erase runs first
    seen, kept = set(), []
    for i in order:
        run = runs[i]
        erase = run if run.get("kind", "erase") == "erase" else {**run, **run.get("erase_results", {})}
        key = (run.get("concept"), run.get("method"), erase.get("delta"), len(erase.get("delta_sweep") or []))
        if key not in seen:
            seen.add(key)
            kept.append((i, erase))
    return [erase for _, erase in sorted(kept, key=lambda item: item[0])]


def _leak_warning(run: dict) -> str | None:
    """The erase run's leak warning, or a failed leak check (attack runs carry their erase run's)."""
    erase = {**run.get("erase_results", {}), **run}
    check = erase.get("leak_check") or {}
    if erase.get("leak_warning"):
        return erase["leak_warning"]
    return None if check.get("passed", True) else f"leak check FAILED: {check.get('leak_count')} original rows in the saved files."


def _card(title: str, body: str) -> str:
    return f"<div class='card'><h2>{html.escape(title)}</h2>{body}</div>"


def _img(data: str | None, alt: str) -> str | None:
    return None if data is None else f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def render_html(runs: list[dict]) -> str:
    rows = summary_rows(runs)
    first = runs[0] if runs else {}
    plots = [("Relearning curve per epoch", _img(plot_relearn_curves(runs), "relearning curve")),
             ("Original vs erased vs after relearning", _img(plot_concept_bars(runs), "per-concept accuracy")),
             ("Attacks side by side", _img(plot_attacks(runs), "attack accuracies")),
             ("Probe accuracy per layer", _img(plot_probe(runs), "probe per layer"))]
    plots += [(f"Delta sweep ({r.get('concept')})", _img(plot_delta_sweep(r), "delta sweep")) for r in _unique_erasures(runs)]
    cards = [_card(title, body) for title, body in plots if body]
    features = feature_table(_unique_erasures(runs))
    if features:
        cards.append(_card("Features erased (top tokens)", features))
    judge = [f"{r['_name']}: open-ended judged by {r['open_ended'].get('judge') or 'normalised answer match only (no judge ran)'}"
             for r in runs if isinstance(r.get("open_ended"), dict)]
    title = (f"Concept erasure: {first.get('concept')} ({first.get('method')})" if len(runs) == 1
             else f"Concept erasure: {len(runs)} runs")
    subtitle = "; ".join(f"{html.escape(_label(r))} on {html.escape(str(r.get('model')))}" for r in runs)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><div class='sub'>{subtitle}</div>"
            + _card("Summary", summary_table(rows))
            + "".join(f"<p class='sub bad'>{html.escape(r['run'])}: {html.escape(r['note'])}</p>" for r in rows if r["note"])
            + "".join(f"<p class='sub bad'>{html.escape(str(r.get('_name', r.get('concept'))))}: {html.escape(w)}</p>"
                      for r in runs for w in [_leak_warning(r)] if w)
            + (f"<p class='sub'>{html.escape('; '.join(judge))}</p>" if judge else "")
            + f"<div class='grid'>{''.join(cards)}</div></body></html>")


def write_report(runs: list[dict], out: str | Path) -> Path:
    """report.html and summary.csv in ``out``; returns the HTML path."""
    out = Path(out)
    write_text(out / "report.html", render_html(runs))
    write_summary_csv(summary_rows(runs), out / "summary.csv")
    return out / "report.html"


def report_from_dirs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    if not run_dirs:
        raise ObliviateError("Pass at least one run folder to report on.")
    runs = load_runs(run_dirs)
    target = Path(out) if out else (Path(run_dirs[0]) if len(run_dirs) == 1 else Path("runs/report"))
    return write_report(runs, target)
