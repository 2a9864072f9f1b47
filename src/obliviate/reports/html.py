"""The report people look at: one self-contained HTML file (plots embedded as PNG) and
summary.csv, for one run or several side by side (methods, concepts, models).

Reads the results.json of `erase`, `eval` and `attack` runs. Every number that has a 95%
interval shows it: error bars on every bar, bands on the curves, "value [low, high]" in
the tables. Plots: the delta sweep (efficacy, specificity, coherence over delta),
per-concept bars of original vs erased vs after-relearning accuracy, the relearning curve
per epoch (with its table), probe accuracy per layer; tables: the summary, lm-evaluation-
harness tasks side by side, the erased features with their top tokens, and a few
generations of the original and the erased model (general prompts and concept text).
The page reflows to one column on a phone; wide tables scroll sideways.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obliviate.attacks import available as available_attacks
from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import CHANCE, Interval
from obliviate.evaluation.results import RunResults, chance_text
from obliviate.io import atomic_path, write_text

ATTACKS = tuple(a for a in available_attacks() if a != "probe")  # the probe reads sentences, not answers
# summary.csv columns: (column, where in the results: a TEST metric's name or a path into the
# command's parts, what it means)
COLUMNS = [
    ("qa_base", "qa_base", "QA test accuracy of the original model"),
    ("qa_erased", "qa_edited", "QA test accuracy after erasure (lower = more erased)"),
    ("simdom_erased", "simdom_edited", "similar-domain accuracy after erasure (should stay)"),
    ("general_erased", "general_edited", "general-knowledge accuracy after erasure (should stay)"),
    ("efficacy", "efficacy", "1 - share of the concept knowledge left"),
    ("specificity", "specificity", "share of unrelated knowledge kept"),
    ("coherence", "coherence", "coherence of generations for GENERAL prompts, relative to the original"),
    ("concept_fluency", "concept_fluency", "fluency on the concept's own prompts (diagnostic: the localized cost)"),
    ("qa_coverage", ("coverage", "qa", "share"), "share of QA test questions containing an edited token"),
    ("harmonic", "harmonic", "harmonic mean of efficacy and specificity"),
    ("relearn_after", ("relearn", "erased", "after"), "QA accuracy of the erased model after relearning"),
    ("relearn_recovered", ("relearn", "recovered_frac"), "share of the original knowledge relearning brings back"),
    ("worst_case_recovered", ("worst_case_recovered",),
     "the largest share of the original knowledge any attack of the run brought back"),
    ("in_context_after", ("in-context", "erased", "after"), "QA accuracy with concept paragraphs in context"),
    ("adversarial_worst", ("adversarial", "erased", "after"), "QA accuracy under the worst adversarial prefix"),
    ("gcg_after", ("gcg", "erased", "after"), "QA accuracy on held-out questions with the best GCG suffix"),
    ("probe_original", ("probe", "original", "after"), "best-layer probe accuracy, original (chance 0.5)"),
    ("probe_erased", ("probe", "erased", "after"), "best-layer probe accuracy, erased (chance 0.5)"),
    ("open_match_erased", ("open_ended", "qa_test", "edited", "match"), "open-ended QA answers matching the gold"),
]
METRICS = [name for name, _, _ in COLUMNS]
COLORS = {"original": "#4c72b0", "erased": "#dd8452", "relearned": "#c44e52", "efficacy": "#55a868",
          "specificity": "#4c72b0", "coherence": "#8172b3"}


# An attack run carries its erase run's TEST accuracies (and sweep, features, leak check)
# under "erase_results": where the run has no number of its own, the report shows those.
CARRIED_ACCURACIES = {"qa_base": ("erase_results", "qa_test", "base"), "qa_edited": ("erase_results", "qa_test", "edited")}


@dataclass(frozen=True)
class ReportRun:
    """One run on the report: the name it is shown under, and its results."""

    name: str
    results: RunResults

    def part(self, *path: str) -> Any:
        """The entry at ``path`` in the command's parts (None when absent)."""
        found: Any = self.results.parts
        for key in path:
            if not isinstance(found, dict) or key not in found:
                return None
            found = found[key]
        return found

    def erase_part(self, key: str) -> Any:
        """A part of the erase run: the run's own, else the one an attack run carries."""
        own = self.part(key)
        return own if own is not None else self.part("erase_results", key)


def _entry(run: ReportRun, source: str | tuple[str, ...]) -> Any:
    """A column's entry: a TEST metric by name (an attack run: its erase run's accuracy), or
    the part at a path."""
    if isinstance(source, tuple):
        return run.part(*source)
    found = run.results.metric(source)
    if found is None and source in CARRIED_ACCURACIES:
        return run.part(*CARRIED_ACCURACIES[source])
    return found.as_dict() if isinstance(found, Interval) else found


def _value(run: ReportRun, source: str | tuple[str, ...]) -> float | None:
    found = _entry(run, source)
    if isinstance(found, (int, float)) and not isinstance(found, bool):
        return float(found)  # a plain number (e.g. a coverage share)
    return found.get("value") if isinstance(found, dict) else None


def _bounds(run: ReportRun, source: str | tuple[str, ...]) -> tuple[float | None, float | None]:
    """The 95% interval (low, high) of an entry {value, low, high}; (None, None) without one."""
    found = _entry(run, source)
    if isinstance(found, dict) and isinstance(found.get("low"), (int, float)) and isinstance(found.get("high"), (int, float)):
        return float(found["low"]), float(found["high"])
    return None, None


def _err(entries: list[tuple[float | None, float | None, float | None]]) -> list[list[float]]:
    """matplotlib's yerr (below, above) from (value, low, high); 0 where there is no interval."""
    below = [max(0.0, v - lo) if None not in (v, lo) else 0.0 for v, lo, _ in entries]
    above = [max(0.0, hi - v) if None not in (v, hi) else 0.0 for v, _, hi in entries]
    return [below, above]


def load_runs(run_dirs: list[str | Path]) -> list[ReportRun]:
    runs = []
    for folder in run_dirs:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ObliviateError(f"{folder} has no results.json: pass folders written by erase, eval or attack.")
        runs.append(ReportRun(Path(folder).name or str(folder), RunResults.read(path)))
    return runs


def _qa_chance(run: ReportRun) -> float:
    """The chance level of a run's TEST QA questions (``CHANCE`` where the run records none)."""
    return run.results.chance_levels().get("qa", CHANCE)


def _chance_line(runs: list[ReportRun]) -> float:
    """Where a plot of these runs' QA accuracies draws chance (the mean where they differ)."""
    levels = [_qa_chance(run) for run in runs]
    return sum(levels) / len(levels) if levels else CHANCE


def _label(run: ReportRun) -> str:
    return f"{run.name}: {run.results.concept or '?'} / {run.results.method or '?'}"


def summary_rows(runs: list[ReportRun]) -> list[dict]:
    rows = []
    for run in runs:
        r = run.results
        row = {"run": run.name, "kind": r.kind, "concept": r.concept, "method": r.method, "model": r.model}
        for name, source, _ in COLUMNS:
            row[name] = _value(run, source)
            row[f"{name}_low"], row[f"{name}_high"] = _bounds(run, source)
        base = row["qa_base"] if row["qa_base"] is not None else _value(run, ("relearn", "original", "before"))
        row["note"] = ""
        if base is not None and r.original_near_chance(base):
            # a share of ~no knowledge is noise, not a finding
            row["relearn_recovered"] = row["relearn_recovered_low"] = row["relearn_recovered_high"] = None
            row["note"] = (f"original QA accuracy {base:.2f} is near chance ({_qa_chance(run):.3g}): "
                           "recovered fractions are undefined")
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


def plot_delta_sweep(run: ReportRun) -> str | None:
    sweep = list(run.erase_part("delta_sweep") or [])
    if not sweep:
        return None
    fig, ax = _figure()
    deltas = [e["params"]["delta"] for e in sweep]
    for name in ("efficacy", "specificity", "coherence"):
        entries = [e["metrics"].get(name) or {} for e in sweep]
        values = [m.get("value", math.nan) for m in entries]
        ax.plot(deltas, values, marker="o", label=name, color=COLORS[name])
        lows = [m.get("low", v) for m, v in zip(entries, values)]
        highs = [m.get("high", v) for m, v in zip(entries, values)]
        ax.fill_between(deltas, lows, highs, color=COLORS[name], alpha=0.12, linewidth=0)
    delta = run.erase_part("delta")
    if isinstance(delta, (int, float)):  # several concepts: a delta each, no one line
        ax.axvline(delta, color="grey", linestyle=":", label=f"chosen {delta}")
    ax.set(xscale="log", xlabel="delta", ylabel="train-question metric (95% band)", ylim=(-0.05, 1.05),
           title=f"Delta sweep: {run.results.concept}")
    if len(set(deltas)) == 1:  # a fixed --delta: one point, centred instead of squeezed against an edge
        ax.set_xlim(deltas[0] / 3, deltas[0] * 3)
    ax.set_xticks(deltas, [f"{d:g}" for d in deltas], fontsize=7)
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return _png(fig)


def _interval(run: ReportRun, source: str | tuple[str, ...]) -> tuple[float | None, float | None, float | None]:
    return (_value(run, source), *_bounds(run, source))


def _bar_groups(ax, groups: list[tuple], series: list[tuple[str, str]], width: float, chance: float) -> None:
    """Side-by-side bars with 95% error bars: groups are (label, (v, lo, hi), ...) tuples."""
    for offset, (label, color) in enumerate(series):
        entries = [g[offset + 1] for g in groups]
        if all(e[0] is None for e in entries):
            continue
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [e[0] if e[0] is not None else 0 for e in entries]
        ax.bar(xs, heights, width, label=label, color=color, yerr=_err(entries), capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "#333"})
        for x, e in zip(xs, entries):  # at the foot of the bar: higher up the error bar crosses it
            if e[0] is not None and e[0] >= 0.06:
                ax.text(x, 0.015, f"{e[0]:.2f}", ha="center", va="bottom", fontsize=6, color="white")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=7)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])


def _bar_chart(groups: list[tuple], series: list[tuple[str, str]], width: float, per_group: float, title: str,
               chance: float) -> str:
    fig, ax = _figure(max(4.6, per_group * len(groups)))
    _bar_groups(ax, groups, series, width, chance)
    ax.set(ylabel="QA test accuracy (95% CI)", ylim=(0, 1.25), title=title)
    ax.legend(fontsize=6, loc="upper center", ncol=4, frameon=False)
    return _png(fig)


def plot_concept_bars(runs: list[ReportRun]) -> str | None:
    groups = []
    for run in runs:
        base, erased = _interval(run, "qa_base"), _interval(run, "qa_edited")
        relearned = _interval(run, ("relearn", "erased", "after"))
        if base[0] is None and _value(run, ("relearn", "original", "before")) is not None:
            base, erased = _interval(run, ("relearn", "original", "before")), _interval(run, ("relearn", "erased", "before"))
        if base[0] is not None:
            groups.append((f"{run.results.concept}\n{run.results.method}", base, erased, relearned))
    if not groups:
        return None
    return _bar_chart(groups, [("original", COLORS["original"]), ("erased", COLORS["erased"]),
                               ("erased + relearning", COLORS["relearned"])], 0.25, 1.4,
                      "Original vs erased vs after relearning", _chance_line(runs))


RELEARN_ATTACKS = ("relearn", "relearn-strong", "repair-relearn")  # attacks that record a curve per epoch


def relearn_curves(runs: list[ReportRun]) -> list[tuple[ReportRun, str, dict[str, list[dict]]]]:
    """(run, attack, {role: curve}) for every attack with a per-epoch curve (epoch 0 = before)."""
    found = []
    for run in runs:
        for attack in RELEARN_ATTACKS:
            curves = {role: run.part(attack, role, "curve") for role in ("original", "erased")}
            curves = {role: c for role, c in curves.items() if c}
            if curves:
                found.append((run, attack, curves))
    return found


def plot_relearn_curves(runs: list[ReportRun]) -> str | None:
    found = relearn_curves(runs)
    if not found:
        return None
    fig, ax = _figure()
    for run, attack, curves in found:
        for role, curve in curves.items():
            epochs = list(range(len(curve)))
            values = [c["value"] for c in curve]
            entries = [(c["value"], c.get("low"), c.get("high")) for c in curve]
            label = role if len(found) == 1 else f"{role} ({run.results.concept}, {attack})"
            ax.errorbar(epochs, values, yerr=_err(entries), fmt="--o" if role == "original" else "-o", capsize=3,
                        color=COLORS[role], label=label, markersize=4, linewidth=1.2)
            ax.fill_between(epochs, [e[1] if e[1] is not None else e[0] for e in entries],
                            [e[2] if e[2] is not None else e[0] for e in entries], color=COLORS[role], alpha=0.10)
    return _finish(fig, ax, _chance_line([run for run, _, _ in found]), xlabel="relearning epoch (0 = before)",
                   ylabel="QA test accuracy (95% CI)",
                   ylim=(0, 1), title="Relearning attack, per epoch")


def _finish(fig, ax, chance: float, **labels) -> str:
    """A chance line, the labels, integer ticks and a legend; the figure as a PNG."""
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set(**labels)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_probe(runs: list[ReportRun]) -> str | None:
    with_probe = [r for r in runs if isinstance(r.part("probe"), dict)]
    if not with_probe:
        return None
    fig, ax = _figure()
    for run in with_probe:
        for role, style in (("original", "--"), ("erased", "-")):
            layers = run.part("probe", role, "per_layer")
            if layers:
                ax.plot(range(len(layers)), layers, style, marker=".", color=COLORS[role],
                        label=f"{role} ({run.results.concept})" if len(with_probe) > 1 else role)
    return _finish(fig, ax, 0.5, xlabel="layer (0 = embeddings)", ylabel="probe test accuracy", ylim=(0.4, 1.02),
                   title="Linear probe: concept vs neutral")


def plot_attacks(runs: list[ReportRun]) -> str | None:
    rows = [(f"{a}\n{r.results.concept}", _interval(r, (a, "original", "after")), _interval(r, (a, "erased", "before")),
             _interval(r, (a, "erased", "after"))) for r in runs for a in ATTACKS if isinstance(r.part(a), dict)]
    if not rows:
        return None
    return _bar_chart(rows, [("original, attacked", COLORS["original"]), ("erased, no attack", COLORS["erased"]),
                             ("erased, attacked", COLORS["relearned"])], 0.27, 1.3,
                      "Attacks: accuracy the attacker gets back", _chance_line(runs))


# ---- HTML --------------------------------------------------------------------------

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:14px 20px;color:#222;font-size:13px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:14px;margin:10px 0 4px}
.sub{color:#666;margin-bottom:8px} .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(440px,100%),1fr));gap:8px}
.card{border:1px solid #ddd;border-radius:6px;padding:4px 8px;background:#fff;min-width:0} img{max-width:100%;height:auto}
.full{grid-column:1/-1}
.wide{overflow-x:auto} details{margin:4px 0} summary{cursor:pointer}
table{border-collapse:collapse;font-size:12px;width:100%} th,td{border-bottom:1px solid #eee;padding:2px 6px;text-align:right;vertical-align:top}
th{background:#f5f5f5;cursor:help} td.l,th.l{text-align:left}
.ci{color:#777;font-size:11px;white-space:nowrap} .num{white-space:nowrap}
.good{color:#2a7a2a;font-weight:600} .bad{color:#b02a2a;font-weight:600} .tok{font-family:monospace;color:#444}
.gen td{text-align:left;white-space:pre-wrap;word-break:break-word;font-size:12px} .gen td.p{color:#555;font-style:italic}
@media (max-width:600px){body{margin:8px;font-size:14px} table{font-size:12px} h1{font-size:18px}
 .num .ci{display:block}}
"""


def _css_class(name: str, value: float) -> str:
    if name in ("efficacy", "specificity", "coherence", "concept_fluency", "harmonic"):
        return "good" if value >= 0.8 else "bad" if value < 0.5 else ""
    if name == "relearn_recovered":
        return "bad" if value >= 0.5 else "good" if value <= 0.2 else ""
    return ""


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" <span class='ci'>[{low:.2f}, {high:.2f}]</span>"


def _cell(name: str, value, low: float | None = None, high: float | None = None) -> str:
    """A table cell: text as it is; a number with its 95% interval when it has one."""
    if value is None:
        return "<td>–</td>"
    if not isinstance(value, float):
        return f"<td class='l'>{html.escape(str(value))}</td>"
    return f"<td class='num'><span class='{_css_class(name, value)}'>{value:.3f}</span>{_ci(low, high)}</td>"


def _row_cell(row: dict, name: str) -> str:
    return _cell(name, row[name], row.get(f"{name}_low"), row.get(f"{name}_high"))


def summary_table(rows: list[dict], chance: str = f"{CHANCE:g}") -> str:
    """One run: a metric per line (reads on a phone). Several: a run per line, scrolling sideways.
    ``chance``: the QA chance level, as ``chance_text`` gives it."""
    present = [(n, d) for n, _, d in COLUMNS if any(r[n] is not None for r in rows)]
    note = (f"<p class='sub'>Accuracies on TEST questions (chance {html.escape(chance)}); <span class='ci'>[low, high]"
            "</span> is the 95% bootstrap interval.</p>")
    if len(rows) == 1:
        row = rows[0]
        body = "".join(f"<tr><th class='l' title='{html.escape(d)}'>{n}</th>{_row_cell(row, n)}"
                       f"<td class='l sub'>{html.escape(d)}</td></tr>" for n, d in present)
        return (note + f"<div class='wide'><table><tr><th class='l'>metric</th><th>value [95% CI]</th>"
                f"<th class='l'>meaning</th></tr>{body}</table></div>")
    head = "".join(f"<th title='{html.escape(d)}'>{n.replace('_', '_<wbr>')}</th>" for n, d in present)
    body = "".join("<tr>" + _cell("run", f"{r['run']} ({r['kind']})") + _cell("concept", r["concept"])
                   + _cell("method", r["method"]) + "".join(_row_cell(r, n) for n, _ in present) + "</tr>" for r in rows)
    legend = "; ".join(f"<b>{n}</b>: {html.escape(d)}" for n, d in present)
    return (note + f"<div class='wide'><table><tr><th class='l'>run</th><th class='l'>concept</th><th class='l'>method</th>"
            f"{head}</tr>{body}</table></div><details class='sub'><summary>What the columns mean</summary>{legend}.</details>")


def relearn_table(runs: list[ReportRun]) -> str:
    """The relearning curves as numbers: accuracy per epoch with its interval, per role."""
    parts = []
    for run, attack, curves in relearn_curves(runs):
        epochs = max(len(c) for c in curves.values())
        roles = list(curves)
        rows = "".join(
            f"<tr><td>{epoch}</td>" + "".join(
                _cell(role, curves[role][epoch]["value"], curves[role][epoch].get("low"), curves[role][epoch].get("high"))
                if epoch < len(curves[role]) else "<td>–</td>" for role in roles) + "</tr>"
            for epoch in range(epochs))
        title = f"{html.escape(str(run.results.concept))}, {html.escape(attack)}" if len(runs) > 1 else html.escape(attack)
        parts.append(f"<div class='wide'><table><tr><th>epoch ({title})</th>"
                     + "".join(f"<th>{role} [95% CI]</th>" for role in roles) + f"</tr>{rows}</table></div>")
    return "".join(parts)


def lm_eval_table(runs: list[ReportRun]) -> str:
    """lm-evaluation-harness tasks (results.json "lm_eval", from evaluation.harness.run_harness):
    original and erased side by side with the harness's standard errors as 95% intervals, and
    the paired difference."""
    rows = []
    for run in runs:
        block = run.part("lm_eval")
        if not isinstance(block, dict):
            continue
        for task, metrics in (block.get("results") or {}).items():
            for key, entry in metrics.items():
                cells = []
                for role in ("original", "erased", "difference"):
                    e = entry.get(role) or {}
                    cells.append(_cell(key, e.get("value"), e.get("low"), e.get("high")) if "value" in e else "<td>–</td>")
                prefix = f"{run.name}: " if len(runs) > 1 else ""
                metric = key[:-len(",none")] if key.endswith(",none") else key  # the harness's "no filter"
                name = html.escape(prefix + task).replace("_", "_<wbr>")  # long task names wrap on a phone
                rows.append(f"<tr><td class='l'>{name}<br><span class='ci'>{html.escape(metric)}"
                            "</span></td>" + "".join(cells) + "</tr>")
    if not rows:
        return ""
    return ("<p class='sub'>Intervals: value ± 1.96 × the harness's standard error; the difference is erased − original "
            "on the same documents (paired). acc_norm on the EMBER tasks is obliviate's accuracy.</p><div class='wide'>"
            "<table><tr><th class='l'>task / metric</th><th>original</th><th>erased</th><th>difference</th></tr>"
            + "".join(rows) + "</table></div>")


def concepts_table(runs: list[ReportRun]) -> str:
    """Several concepts in one model: each concept's TEST QA and efficacy under the whole
    edit, and the cross table (concept Y's QA under concept X's rows alone)."""
    rows = []
    for run in runs:
        concepts = run.part("concepts") or {}
        for name, entry in concepts.items():
            qa = entry.get("qa_test", {})
            cross = run.part("cross", name) or {}
            cells = [_cell("qa", qa.get("base", {}).get("value"), qa.get("base", {}).get("low"), qa.get("base", {}).get("high")),
                     _cell("qa", qa.get("edited", {}).get("value"), qa.get("edited", {}).get("low"),
                           qa.get("edited", {}).get("high")),
                     _cell("efficacy", *(entry.get("efficacy", {}).get(k) for k in ("value", "low", "high")))]
            cells += [_cell("qa", *(cross.get(other, {}).get("edited", {}).get(k) for k in ("value", "low", "high")))
                      if cross else "<td>–</td>" for other in concepts]
            rows.append(f"<tr><td class='l'>{html.escape(name)}</td>" + "".join(cells) + "</tr>")
        if rows:
            others = "".join(f"<th>QA of {html.escape(other)} under these rows alone</th>" for other in concepts)
            return ("<p class='sub'>Each concept's TEST questions under the whole edit, and what each concept's own "
                    "EMBER rows do to every concept's questions (rows edited for several concepts carry every edit).</p>"
                    "<div class='wide'><table><tr><th class='l'>concept</th><th>QA original</th><th>QA erased</th>"
                    f"<th>efficacy</th>{others}</tr>" + "".join(rows) + "</table></div>")
    return ""


EXAMPLE_TITLES = {"general": "general prompts (should be unchanged)", "concept": "concept text (the erased words)"}


def generations_table(runs: list[ReportRun], per_kind: int = 3) -> str:
    """A few prompts with the original's and the erased model's continuations (results.json
    "examples"), and open-ended answers of `eval` runs."""
    parts = []
    for run in runs:
        prefix = f"{html.escape(run.name)}: " if len(runs) > 1 else ""
        for kind, examples in (run.part("examples") or {}).items():
            rows = "".join(f"<tr><td class='p'>{html.escape(str(e.get('prompt', '')))}</td>"
                           f"<td>{html.escape(str(e.get('original', '')).strip())}</td>"
                           f"<td>{html.escape(str(e.get('edited', '')).strip())}</td></tr>" for e in (examples or [])[:per_kind])
            if rows:
                parts.append(f"<h2>{prefix}{html.escape(EXAMPLE_TITLES.get(kind, kind))}</h2><div class='wide'>"
                             f"<table class='gen'><tr><th class='l'>prompt</th><th class='l'>original</th>"
                             f"<th class='l'>erased</th></tr>{rows}</table></div>")
        for split, entry in (run.part("open_ended") or {}).items():
            if not isinstance(entry, dict) or "base" not in entry:
                continue
            pairs = zip((entry["base"] or {}).get("examples", []), (entry.get("edited") or {}).get("examples", []))
            rows = "".join(f"<tr><td class='p'>{html.escape(str(b.get('q', '')))}<br>gold: {html.escape(str(b.get('gold', '')))}"
                           f"</td><td>{html.escape(str(b.get('answer', '')))}</td><td>{html.escape(str(e.get('answer', '')))}"
                           f"</td></tr>" for b, e in list(pairs)[:per_kind])
            if rows:
                parts.append(f"<h2>{prefix}open-ended answers ({html.escape(split)})</h2><div class='wide'><table class='gen'>"
                             f"<tr><th class='l'>question</th><th class='l'>original</th><th class='l'>erased</th></tr>"
                             f"{rows}</table></div>")
    return "".join(parts)


def feature_table(runs: list[ReportRun], limit: int = 8) -> str:
    rows = []
    for run in runs:
        features = run.erase_part("features") or []
        for feature in features[:limit]:
            tokens = ", ".join(html.escape(t.strip()) for t in feature.get("top_tokens", [])[:12])
            rows.append(f"<tr><td class='l'>{html.escape(run.results.concept)}</td><td>{feature.get('index')}</td>"
                        f"<td>{feature.get('ratio', math.nan):.1f}</td><td>{feature.get('concept_share', math.nan):.2f}</td>"
                        f"<td class='l tok'>{tokens}</td></tr>")
    if not rows:
        return ""
    return ("<div class='wide'><table><tr><th class='l'>concept</th><th>feature</th><th>ratio</th><th>concept share</th>"
            "<th class='l'>top tokens</th></tr>" + "".join(rows) + "</table></div>")


def _unique_erasures(runs: list[ReportRun]) -> list[ReportRun]:
    """One run per erasure, in the report's order: an attack run on an erase folder carries
    that run's sweep and features; show them once when the erase run itself is there too."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].results.kind != "erase")  # erase runs first
    seen, kept = set(), []
    for i in order:
        run = runs[i]
        key = (run.results.concept, run.results.method, str(run.erase_part("delta")),
               len(run.erase_part("delta_sweep") or []))
        if key not in seen:
            seen.add(key)
            kept.append(i)
    return [runs[i] for i in sorted(kept)]


def _leak_warning(run: ReportRun) -> str | None:
    """The erase run's leak warning, or a failed leak check (attack runs carry their erase run's)."""
    check = run.erase_part("leak_check") or {}
    if run.erase_part("leak_warning"):
        return run.erase_part("leak_warning")
    return None if check.get("passed", True) else f"leak check FAILED: {check.get('leak_count')} original rows in the saved files."


def _card(title: str, body: str, full: bool = False) -> str:
    return f"<div class='card{' full' if full else ''}'><h2>{html.escape(title)}</h2>{body}</div>"


def _img(data: str | None, alt: str) -> str | None:
    return None if data is None else f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def render_html(runs: list[ReportRun]) -> str:
    rows = summary_rows(runs)
    curve = _img(plot_relearn_curves(runs), "relearning curve")
    plots = [("Relearning curve per epoch", curve and curve + relearn_table(runs)),
             ("Original vs erased" + (" vs after relearning" if curve else ""),
              _img(plot_concept_bars(runs), "per-concept accuracy")),
             ("Attacks side by side", _img(plot_attacks(runs), "attack accuracies")),
             ("Probe accuracy per layer", _img(plot_probe(runs), "probe per layer"))]
    plots += [(f"Delta sweep ({r.results.concept})", _img(plot_delta_sweep(r), "delta sweep"))
              for r in _unique_erasures(runs)]
    cards = [_card(title, body) for title, body in plots if body]
    for title, body in (("Each concept, and the cross table", concepts_table(runs)),
                        ("lm-evaluation-harness, original vs erased", lm_eval_table(runs)),
                        ("Generations, original vs erased", generations_table(runs)),
                        ("Features erased (top tokens)", feature_table(_unique_erasures(runs)))):
        if body:
            cards.append(_card(title, body, full=True))
    judge = [f"{r.name}: open-ended judged by {r.part('open_ended').get('judge') or 'normalised answer match only (no judge ran)'}"
             for r in runs if isinstance(r.part("open_ended"), dict)]
    title = (f"Concept erasure: {runs[0].results.concept} ({runs[0].results.method})" if len(runs) == 1
             else f"Concept erasure: {len(runs)} runs")
    subtitle = "; ".join(f"{html.escape(_label(r))} on {html.escape(r.results.model)}" for r in runs)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><div class='sub'>{subtitle}</div>"
            + _card("Summary", summary_table(rows, chance_text({r.name: _qa_chance(r) for r in runs})))
            + "".join(f"<p class='sub bad'>{html.escape(r['run'])}: {html.escape(r['note'])}</p>" for r in rows if r["note"])
            + "".join(f"<p class='sub bad'>{html.escape(r.name or r.results.concept)}: {html.escape(w)}</p>"
                      for r in runs for w in [_leak_warning(r)] if w)
            + (f"<p class='sub'>{html.escape('; '.join(judge))}</p>" if judge else "")
            + f"<div class='grid'>{''.join(cards)}</div></body></html>")


def write_report(runs: list[ReportRun], out: str | Path) -> Path:
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
