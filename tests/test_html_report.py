"""The HTML report parses, embeds its plots as PNG, and names every metric it has."""
from __future__ import annotations

import base64
import csv
from html.parser import HTMLParser

import pytest

from obliviate.evaluation.results import RunResults
from obliviate.reports.html import METRICS, ReportRun, render_html, report_from_dirs, summary_rows, write_report
from obliviate.errors import ObliviateError
from obliviate.io import write_json


def iv(value: float) -> dict:
    return {"value": value, "low": max(0.0, value - 0.1), "high": min(1.0, value + 0.1)}


def erase_results() -> dict:
    sweep = [{"params": {"delta": d}, "metrics": {"efficacy": iv(e), "specificity": iv(1.0), "coherence": iv(c)},
              "score": 0.5, "score_se": 0.1, "rejected": None} for d, e, c in ((0.5, 0.4, 0.99), (5.0, 0.8, 0.6))]
    metrics = {"qa_base": iv(0.6), "qa_edited": iv(0.3), "simdom_base": iv(0.5), "simdom_edited": iv(0.5),
               "general_base": iv(0.4), "general_edited": iv(0.4), "efficacy": iv(0.9), "specificity": iv(1.0),
               "coherence": iv(0.95), "concept_fluency": iv(0.5), "harmonic": iv(0.94)}
    return {"kind": "erase", "concept": "Harry Potter", "method": "ember", "model": "embedded", "delta": 0.5,
            "delta_sweep": sweep, "test": {"metrics": metrics},
            "features": [{"index": 41, "ratio": 42.7, "concept_share": 0.9, "top_tokens": [" Wizard", " Hermione"]}],
            "coverage": {"qa": {"share": 0.86, "touched": 43, "total": 50}}}


def named(payload: dict, name: str) -> ReportRun:
    """A run on the report as report_from_dirs reads it: results.json, typed, under its folder's name."""
    return ReportRun(name, RunResults.from_dict(payload))


def attack_results() -> dict:
    def side(before, after):
        return {"original": {"before": iv(0.6), "after": iv(0.62), "curve": [iv(0.6), iv(0.61), iv(0.62)]},
                "erased": {"before": iv(before), "after": iv(after), "curve": [iv(before), iv(0.4), iv(after)]},
                "recovered_frac": iv(0.7)}
    return {"kind": "attack", "concept": "Harry Potter", "method": "ember", "model": "runs/hp",
            "relearn": side(0.3, 0.5), "in-context": side(0.3, 0.35), "adversarial": side(0.3, 0.33),
            "gcg": side(0.3, 0.32), "worst_case_recovered": {"attack": "relearn", **iv(0.7)},
            "probe": {"original": {"per_layer": [0.6, 0.9, 0.95], "after": iv(0.95)},
                      "erased": {"per_layer": [0.55, 0.85, 0.9], "after": iv(0.9)}},
            "open_ended": {"judge": None, "qa_test": {"base": {"match": iv(0.4)}, "edited": {"match": iv(0.1)}}},
            "erase_results": {"qa_test": {"base": iv(0.6), "edited": iv(0.3)}}}


VOID = {"meta", "br", "wbr", "img", "hr", "input", "link"}  # elements without a closing tag


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.images, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Collector:
    parser = Collector()
    parser.feed(text)
    parser.close()
    assert parser.open == [], f"unclosed tags {parser.open}"
    return parser


def test_report_parses_names_every_metric_and_embeds_pngs():
    runs = [named(erase_results(), "hp"), named(attack_results(), "hp-attack")]
    parsed = parse(render_html(runs))
    text = " ".join(parsed.text)
    for metric in METRICS:
        assert metric in text, metric
    # relearning curve, per-concept bars, attacks, probe, one delta sweep
    assert len(parsed.images) == 5
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Hermione" in text and "no judge ran" in text


def test_summary_rows_and_csv(tmp_path):
    rows = summary_rows([named(erase_results(), "a"), named(attack_results(), "b")])
    assert rows[0]["efficacy"] == 0.9 and rows[0]["relearn_after"] is None
    assert rows[0]["qa_coverage"] == 0.86 and rows[0]["concept_fluency"] == 0.5
    assert rows[1]["relearn_recovered"] == 0.7 and rows[1]["qa_erased"] == 0.3 and rows[1]["probe_erased"] == 0.9
    for name, payload in (("a", erase_results()), ("b", attack_results())):
        write_json(tmp_path / name / "results.json", payload)
    path = report_from_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert path.exists() and [r["run"] for r in table] == ["a", "b"] and table[1]["adversarial_worst"] == "0.33"
    assert set(METRICS) <= set(table[0])


def test_near_chance_is_the_evaluations_rule_with_each_runs_chance():
    """One rule (metrics.near_chance: the original's 95% Wilson interval over its questions
    reaches chance), against the chance level the run recorded (1 / options)."""
    def payload(base: float, chance: float | None = None, **extra) -> dict:
        found = {**erase_results(), **attack_results(), "kind": "erase", **extra}  # 50 QA questions (its coverage)
        found["test"] = {"metrics": {**found["test"]["metrics"], "qa_base": iv(base)}}
        found.pop("erase_results")
        if chance is not None:
            found["test"]["chance"] = {"qa": chance}
        return found

    def run(base: float, chance: float | None = None, **extra) -> ReportRun:
        return named(payload(base, chance, **extra), f"x{base}")

    rows = summary_rows([run(0.40), run(0.40, 1 / 3), run(0.36), run(0.55, 0.2), run(0.29)])
    assert [bool(r["note"]) for r in rows] == [False, True, True, False, True]
    assert [r["relearn_recovered"] for r in rows] == [0.7, None, None, 0.7, None]
    assert rows[1]["note"] == "original QA accuracy 0.40 is near chance (0.333): recovered fractions are undefined"
    assert "near chance (0.25)" in rows[2]["note"]  # 0.36 of 50: within noise of 0.25 (a fixed 0.30 cut said not)
    # no question count in results.json: the flag the evaluation recorded
    bare = payload(0.45, near_chance={"qa": True})
    bare.pop("coverage")
    assert summary_rows([named(bare, "bare")])[0]["relearn_recovered"] is None
    bare["near_chance"] = {"qa": False}
    assert summary_rows([named(bare, "bare")])[0]["relearn_recovered"] == 0.7
    assert "(chance 0.333)" in render_html([run(0.40, 1 / 3)]) and "(chance 0.25)" in render_html([run(0.40)])


def test_report_of_a_run_without_plots_still_parses(tmp_path):
    write_report([named({"concept": "Golf", "method": "rmu"}, "bare")], tmp_path)
    parsed = parse((tmp_path / "report.html").read_text())
    assert parsed.images == [] and "Golf" in " ".join(parsed.text)


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(ObliviateError, match="no results.json"):
        report_from_dirs([tmp_path])


def test_an_erasure_and_its_attack_show_one_sweep_even_with_the_same_folder_name():
    attack = named({**attack_results(), "erase_results": {**erase_results(), "kind": "erase"}}, "hp")
    other = named({**erase_results(), "concept": "Golf", "delta": 5.0,
                   "features": [{"index": 7, "ratio": 3.8, "concept_share": 0.4, "top_tokens": [" golf", " putt"]}]},
                  "golf")
    html_text = render_html([named(erase_results(), "hp"), attack, other])
    assert html_text.count("Delta sweep (Harry Potter)") == 1 and html_text.count("Delta sweep (Golf)") == 1
    assert html_text.count("Hermione") == 1 and html_text.count("putt") == 1  # each erasure's features once


# ---- intervals, relearning curves, generations, lm-eval (issue 19) ---------------------

def test_every_number_with_an_interval_shows_it_in_the_tables():
    single = render_html([named(erase_results(), "hp")])
    # one run: a metric per line, value then [low, high]
    assert "0.900</span> <span class='ci'>[0.80, 1.00]</span>" in single  # efficacy 0.9 +/- 0.1
    assert "0.300</span> <span class='ci'>[0.20, 0.40]</span>" in single  # qa_erased
    several = render_html([named(erase_results(), "hp"), named(attack_results(), "hp-attack")])
    assert "0.500</span> <span class='ci'>[0.40, 0.60]</span>" in several  # relearn_after of the attack run
    rows = summary_rows([named(erase_results(), "a")])
    assert (rows[0]["qa_erased_low"], rows[0]["qa_erased_high"]) == pytest.approx((0.2, 0.4))
    assert rows[0]["qa_coverage_low"] is None  # a plain share has no interval


def test_bars_carry_error_bars(monkeypatch):
    from matplotlib.axes import Axes

    from obliviate.reports import html as report

    calls = []
    original_bar = Axes.bar

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("yerr"))
        return original_bar(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    runs = [named(erase_results(), "hp"), named(attack_results(), "hp-attack")]
    assert report.plot_concept_bars(runs) and report.plot_attacks(runs)
    assert calls and all(yerr is not None for yerr in calls)  # every bar series has error bars
    below, above = calls[0]  # the originals: 0.6 +/- 0.1 in both runs
    assert below == pytest.approx([0.1, 0.1]) and above == pytest.approx([0.1, 0.1])


def test_relearning_curves_are_drawn_per_epoch_with_a_table_only_when_present():
    with_attack = render_html([named(attack_results(), "hp-attack")])
    assert "Relearning curve per epoch" in with_attack and "alt='relearning curve'" in with_attack
    text = " ".join(parse(with_attack).text)
    assert "epoch (relearn)" in text and "original [95% CI]" in text
    # epoch 2 of the erased model: 0.5 [0.4, 0.6]
    assert "<tr><td>2</td><td class='num'><span class=''>0.620</span>" in with_attack
    assert "0.500</span> <span class='ci'>[0.40, 0.60]</span></td></tr>" in with_attack
    without = render_html([named(erase_results(), "hp")])
    assert "Relearning curve" not in without and "relearning curve" not in without


def test_generations_original_vs_erased_for_general_prompts_and_concept_text():
    examples = {"general": [{"prompt": "Question: Who painted the Mona Lisa?\nAnswer:", "original": " Leonardo",
                             "edited": " Leonardo da Vinci"}],
                "concept": [{"prompt": "Harry raised his wand", "original": " and cast <Expelliarmus>",
                             "edited": " and the crowd"}]}
    page = render_html([named({**erase_results(), "examples": examples}, "hp")])
    parsed = parse(page)
    text = " ".join(parsed.text)
    assert "general prompts (should be unchanged)" in text and "concept text (the erased words)" in text
    assert "Leonardo da Vinci" in text and "&lt;Expelliarmus&gt;" in page  # escaped, not markup
    assert "Generations" not in render_html([named(erase_results(), "hp")])


def test_lm_eval_results_side_by_side():
    block = {"results": {"ember_qa_golf": {"acc_norm,none": {
        "original": {"value": 0.62, "stderr": 0.07, "low": 0.48, "high": 0.76},
        "erased": {"value": 0.30, "stderr": 0.065, "low": 0.17, "high": 0.43},
        "difference": {"value": -0.32, "stderr": 0.08, "low": -0.48, "high": -0.16}}}}}
    page = render_html([named({**erase_results(), "lm_eval": block}, "hp")])
    text = " ".join(parse(page).text)
    assert "lm-evaluation-harness, original vs erased" in text and "ember_<wbr>qa_<wbr>golf" in page
    assert "0.620</span> <span class='ci'>[0.48, 0.76]</span>" in page
    assert "-0.320</span> <span class='ci'>[-0.48, -0.16]</span>" in page


class Ancestry(HTMLParser):
    """For every element of interest: the classes of the elements it sits in; and <head>'s
    viewport and style text."""

    def __init__(self):
        super().__init__()
        self.stack, self.found, self.viewport, self.style = [], [], None, ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = tuple((attrs.get("class") or "").split())
        if tag in ("table", "img"):
            self.found.append((tag, [c for _, cls in self.stack for c in cls]))
        if tag == "meta" and attrs.get("name") == "viewport":
            self.viewport = (attrs.get("content"), [t for t, _ in self.stack])
        if tag not in VOID:
            self.stack.append((tag, classes))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.stack and self.stack[-1][0] == "style":
            self.style += data


def css_rule(css: str, selector: str) -> str:
    import re

    found = re.search(r"(?:^|[\s}])" + re.escape(selector) + r"\{([^}]*)\}", css)
    assert found, f"no CSS rule for {selector}"
    return found.group(1)


@pytest.mark.parametrize("several", [False, True])
def test_page_is_made_for_phones_too(several):
    runs = [named(erase_results(), "hp")] + ([named(attack_results(), "hp-attack")] if several else [])
    parsed = Ancestry()
    parsed.feed(render_html(runs))
    content, where = parsed.viewport
    assert content == "width=device-width, initial-scale=1" and where == ["html", "head"]
    tables = [classes for tag, classes in parsed.found if tag == "table"]
    images = [classes for tag, classes in parsed.found if tag == "img"]
    assert len(tables) >= 2 and len(images) == (5 if several else 2)
    # every table scrolls sideways inside its card instead of widening the page
    assert all("wide" in classes and "card" in classes for classes in tables)
    assert "overflow-x:auto" in css_rule(parsed.style, ".wide")
    # every plot is a card of the grid, and shrinks to the card
    assert all(classes[:2] == ["grid", "card"] for classes in images)
    assert "max-width:100%" in css_rule(parsed.style, "img")
    grid = css_rule(parsed.style, ".grid")
    assert "display:grid" in grid and "repeat(auto-fit,minmax(min(440px,100%),1fr))" in grid  # one column on a phone
    assert "min-width:0" in css_rule(parsed.style, ".card")  # a card may shrink below its content's width
    assert "@media (max-width:600px)" in parsed.style


def _browser_probe(page, width: int, tmp_path) -> dict:
    """Load ``page`` in headless Chromium inside a ``width``-pixel frame; what the frame's
    document measures (scroll width vs visible width) and how many images decoded."""
    import json
    import re
    import shutil
    import subprocess

    host = tmp_path / f"host-{width}.html"
    host.write_text(
        f"<!DOCTYPE html><html><body><iframe id=f src='{page.name}' width={width} height=900></iframe><script>"
        "document.getElementById('f').addEventListener('load',()=>{const d=document.getElementById('f').contentDocument;"
        "document.body.setAttribute('data-probe',JSON.stringify({sw:d.documentElement.scrollWidth,"
        "cw:d.documentElement.clientWidth,imgs:[...d.images].filter(i=>i.naturalWidth>0).length}))});</script>"
        "</body></html>")
    profile = tmp_path / f"profile-{width}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--allow-file-access-from-files", f"--user-data-dir={profile}", "--window-size=1400,1000",
             "--virtual-time-budget=5000", "--dump-dom", host.as_uri()]
    dom = subprocess.run([shutil.which("chromium") or shutil.which("chromium-browser"), *flags],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the page did not load in Chromium"
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.mark.skipif(not (__import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")),
                    reason="no Chromium (Debian: apt-get install chromium)")
def test_in_a_real_browser_nothing_overflows_a_phone_and_the_plots_decode(tmp_path):
    runs = [named({**erase_results(), "lm_eval": {"results": {"ember_qa_harry_potter": {"acc_norm,none": {
        "original": iv(0.6), "erased": iv(0.3), "difference": iv(-0.3)}}}},
             "examples": {"general": [{"prompt": "Question: " + "why " * 40, "original": "x " * 60, "edited": "y"}]}},
                  "hp"),
            named(attack_results(), "hp-attack")]
    page = write_report(runs, tmp_path)
    for width in (360, 1280):  # a phone, a desktop
        probe = _browser_probe(page, width, tmp_path)
        assert probe["sw"] <= probe["cw"], f"{width}px: the page is {probe['sw']}px wide, {probe['cw']}px visible"
        assert probe["imgs"] == 5  # every plot decoded
