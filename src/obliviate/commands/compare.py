"""`obliviate compare`: methods x concepts, with and without EMBER, each cell attacked by
relearning, into one table (compare.csv and compare.md in --out).

Each cell is an ordinary `erase` run in DIR/<concept>/<method>[+ember] (so an interrupted
comparison resumes cell by cell), followed by the relearning attack on the erased model
(obliviate.attacks.relearning): test QA accuracy after each relearning epoch.
"""
from __future__ import annotations

import argparse
import csv
import gc
import re
from pathlib import Path

from .. import methods
from ..cli import add_run_arguments, collect_overrides
from ..errors import ObliviateError

COLUMNS = ("concept", "method", "ember", "delta", "params", "efficacy", "specificity", "coherence", "harmonic",
           "qa_test_base", "qa_test_edited")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--methods", required=True, help=f"comma-separated, from: {', '.join(methods.available())}")
    parser.add_argument("--concepts", required=True, help="comma-separated benchmark concepts")
    parser.add_argument("--with-and-without-ember", action="store_true",
                        help="run every method twice: alone and on top of the EMBER edit")
    parser.add_argument("--relearn-epochs", type=int, default=2, help="relearning attack epochs (0: no attack; reference 2)")
    parser.add_argument("--relearn-paragraphs", type=int, default=100, help="relearning paragraphs (reference 100)")
    parser.add_argument("--set", dest="method_settings", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a setting of one method, e.g. --set rmu.steps=10 (repeatable)")


def parse_settings(pairs: list[str]) -> dict[str, dict]:
    settings: dict[str, dict] = {}
    for pair in pairs:
        match = re.fullmatch(r"(\w+)\.(\w+)=(.*)", pair.strip())
        if not match:
            raise ObliviateError(f"--set expects METHOD.KEY=VALUE (e.g. rmu.steps=10), got {pair!r}.")
        settings.setdefault(match.group(1), {})[match.group(2)] = match.group(3)
    return settings


def plan(method_list: str, concept_list: str, both: bool) -> list[tuple[str, str, bool]]:
    names = [m.strip() for m in method_list.split(",") if m.strip()]
    for name in names:
        methods.get(name)  # unknown names: a clear error listing the methods
    concepts = [c.strip() for c in concept_list.split(",") if c.strip()]
    if not names or not concepts:
        raise ObliviateError("--methods and --concepts each need at least one name.")
    variants = (False, True) if both else (False,)
    return [(c, m, e) for c in concepts for m in names for e in variants if not (m == "ember" and e)]


def relearn_curve(result, config, epochs: int, paragraphs: int, progress: bool) -> list[float] | None:
    """Test QA accuracy before and after each relearning epoch, or None without the attack."""
    try:
        from ..attacks import relearning
        from ..attacks.common import AttackContext
    except ImportError:
        return None
    from ..pipeline import load_concept_data

    data = load_concept_data(config)
    ctx = AttackContext(models={"erased": result.lm}, data=data, data_dir=data.data_dir,
                        scoring=config.evaluation.scoring, seed=config.seed, out=result.out, progress=progress)
    out = relearning.run(ctx, relearning.Config(epochs=epochs, paragraphs=paragraphs))
    return [point["value"] for point in out["erased"]["curve"]]


def cell_row(concept: str, method: str, ember: bool, results: dict, curve: list[float] | None) -> dict:
    value = lambda name: results.get(name, {}).get("value", "")  # noqa: E731
    row = {"concept": concept, "method": method, "ember": ember, "delta": results.get("delta"),
           "params": results.get("params"), "efficacy": value("efficacy"), "specificity": value("specificity"),
           "coherence": value("coherence"), "harmonic": value("harmonic"),
           "qa_test_base": results.get("qa_test", {}).get("base", {}).get("value", ""),
           "qa_test_edited": results.get("qa_test", {}).get("edited", {}).get("value", "")}
    for epoch, acc in enumerate(curve or []):
        if epoch:
            row[f"qa_after_relearn_epoch_{epoch}"] = acc
    return row


def write_table(out: Path, rows: list[dict]) -> None:
    columns = list(COLUMNS) + sorted({k for r in rows for k in r if k not in COLUMNS})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    from ..api import make_config
    from ..pipeline import erase

    if args.relearn_epochs < 0 or args.relearn_paragraphs < 1:
        raise ObliviateError("--relearn-epochs must be >= 0 and --relearn-paragraphs >= 1.")
    cells = plan(args.methods, args.concepts, args.with_and_without_ember)
    settings = parse_settings(args.method_settings)
    overrides = collect_overrides(args)
    out = Path(overrides.pop("out", None) or "runs/compare")
    rows = []
    for concept, method, ember in cells:
        cell = out / re.sub(r"[^\w.-]+", "_", concept) / (method + ("+ember" if ember else ""))
        config = make_config(args.config_file, **{**overrides, "concept": concept, "method": method,
                                                  "with_ember": ember, "out": str(cell), "methods": settings})
        result = erase(config)
        curve = relearn_curve(result, config, args.relearn_epochs, args.relearn_paragraphs, True) \
            if args.relearn_epochs else None
        rows.append(cell_row(concept, method, ember, result.results, curve))
        write_table(out, rows)  # after every cell, so a partial comparison is readable
        del result
        gc.collect()
    print(f"\n{len(rows)} runs -> {out / 'compare.csv'} and {out / 'compare.md'}")
    print((out / "compare.md").read_text(encoding="utf-8"))
    return 0
