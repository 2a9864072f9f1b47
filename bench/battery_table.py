"""Does the erasure hold? Each arm erases every concept, then the attack battery runs on its
output; the table is each attack's recovered fraction and the worst case, per concept and
pooled, with the arms paired against each other.

    python bench/battery_table.py --out runs/battery --arms ember --concepts Gambling,Gun \
        --attacks cheap --write docs/results/attacks.md

An arm is a method name, with ":key=value;key=value" for its settings (e.g.
"rmu:forget_text=respelled+ember") and "+ember" for EMBER first (its delta fixed to the one the
"ember" arm's grid chose, when that arm comes first). Runs go to OUT/<arm>/<concept>/
(erase, patch-only) and OUT/<arm>/<concept>/attack/ (the attacks); finished ones are
skipped, so an interrupted table resumes, and attacks asked later go to their own
attack-<name>/ folder. On TEST questions with 95% intervals: the share of the original's
above-chance knowledge each attack brings back (recovered), per concept; per arm, each
attack pooled over the concepts and the worst case over the battery (the maximum over
attacks inside every bootstrap draw, evaluation/robustness.py); and the paired difference
of the arms' worst cases (the same question draws in both).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import obliviate
from obliviate import attacks as battery
from obliviate.attacks.common import worst_case_recovered
from obliviate.cli import main as cli
from obliviate.evaluation.results import RunResults, nothing_applied
from obliviate.evaluation.robustness import AttackedArm, attacked_arm, paired_worst_case, pooled_worst_case
from obliviate.io import write_json, write_text

CONCEPTS = "Gambling,Gun,Golf,Culture of Greece,Cannabis,Ancient Rome,World War II"  # test QA >= 0.40 on the embedded model


def slug(concept: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in concept).strip("_").lower()


def parse_arm(arm: str) -> tuple[str, dict[str, str], bool]:
    """(method, its settings, EMBER first?) of an arm: ``method[:key=value[;key=value]][+ember]``."""
    head, _, ember = arm.partition("+")
    method, _, settings = head.partition(":")
    pairs = dict(item.split("=", 1) for item in settings.split(";") if item)
    return method, pairs, bool(ember) and method != "ember"


def erase_run(arm: str, concept: str, data: str | None, folder: Path, ember_delta: float | None = None) -> dict:
    """The arm's erase run (made if missing). ``ember_delta``: EMBER's strength in a plug-in
    arm, fixed (the delta the EMBER arm's own grid chose), so both arms carry the same
    EMBER edit and the plug-in run skips a second delta grid."""
    if not (folder / "results.json").exists():
        method, settings, plug_in = parse_arm(arm)
        obliviate.erase(concept, out=folder, save_model=False, method=method, with_ember=plug_in,
                        **({"data": data} if data else {}), **({"methods": {method: settings}} if settings else {}),
                        **({"ember": {"delta": ember_delta}} if plug_in and ember_delta is not None else {}))
    return json.loads((folder / "results.json").read_text())


def attack_results(folder: Path, name: str) -> Path | None:
    """The results.json holding attack ``name`` on this erase run: attack/ or attack-<name>/."""
    return next((f / "results.json" for f in (folder / "attack", folder / f"attack-{name}")
                 if (f / "results.json").exists() and name in json.loads((f / "results.json").read_text())), None)


def finished(folder: Path, names: list[str]) -> bool:
    """Whether the cell's erase and every asked attack have results, or the erase applied no
    edit (nothing left to run)."""
    path = folder / "results.json"
    if not path.exists():
        return False
    return nothing_applied(json.loads(path.read_text())) or all(attack_results(folder, name) for name in names)


def attack_run(folder: Path, data: str | None, names: list[str]) -> dict:
    """The attacks' results on one erase run: those in OUT/.../attack/ plus, for an attack
    asked later, its own folder attack-<name>/ (so a table grows without rerunning)."""
    results: dict = {}
    data_flag = ["--data", data] if data else []
    for name in names:
        if name in results:
            continue
        found = attack_results(folder, name)
        if found is None:
            out = folder / ("attack" if not (folder / "attack").exists() else f"attack-{name}")
            asked = ",".join(names) if out.name == "attack" else name
            code = cli(["attack", "--model", str(folder), *data_flag, "--attacks", asked, "--out", str(out),
                        "--no-progress"])
            if code:
                raise SystemExit(f"attack on {folder} failed with exit code {code}")
            found = out / "results.json"
        results.update(json.loads(found.read_text()))
    results["attacks"] = names
    return results


def cell(interval: dict | None) -> str:
    if not interval or interval.get("value") is None:
        return "-"
    return f"{interval['value']:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def concept_rows(arm: str, rows: list[tuple[dict, dict]], names: list[str]) -> list[str]:
    lines = []
    for erased, attacked in rows:
        worst = worst_case_recovered({n: attacked[n] for n in names})
        cells = [cell(erased["qa_test"]["base"]), cell(erased["qa_test"]["edited"]), cell(erased.get("efficacy"))]
        cells += [cell(attacked[n].get("recovered_frac")) for n in names]
        cells.append(f"{cell(worst)} ({worst['attack']})" if worst else "-")
        lines.append(f"| {arm} | {erased['concept']} | " + " | ".join(cells) + " |")
    return lines


def only(arm: AttackedArm, name: str) -> AttackedArm:
    return AttackedArm(arm.concept, arm.method, arm.base, {name: arm.attacked[name]}, arm.left_out, arm.chance)


def pooled_lines(arms: dict[str, list[AttackedArm]], names: list[str]) -> tuple[list[str], dict]:
    lines, record = [], {}
    for arm, arm_rows in arms.items():
        for name in names:
            kept = [only(a, name) for a in arm_rows if name in a.attacked]
            if not kept:
                continue
            pooled = pooled_worst_case(kept).as_dict()
            record[f"{arm}/{name}"] = pooled
            lines.append(f"| {arm} | {name} | {cell(pooled)} | {pooled['n_concepts']} | {', '.join(pooled['excluded']) or '-'} |")
        pooled = pooled_worst_case(arm_rows).as_dict()
        record[f"{arm}/worst case"] = pooled
        lines.append(f"| {arm} | **worst case** | **{cell(pooled)}** | {pooled['n_concepts']} | "
                     f"{', '.join(pooled['excluded']) or '-'} |")
    pairs = [(a, b) for i, a in enumerate(arms) for b in list(arms)[i + 1:]]
    for a, b in pairs:
        diff = paired_worst_case(arms[a], arms[b]).as_dict()
        record[f"{a} minus {b}/worst case"] = diff
        lines.append(f"| {a} minus {b} | worst case (paired) | {cell(diff)} | {diff['n_concepts']} | "
                     f"{'significant' if diff['significant'] else 'inside the noise'} |")
    return lines, record


def page(command: str, arms: dict[str, list[tuple[dict, dict]]], names: list[str]) -> tuple[str, dict]:
    robust = {arm: [attacked_arm(RunResults.from_dict({**r, "kind": "attack", "concept": e["concept"],
                                                       "method": e["method"]}))
                    for e, r in rows] for arm, rows in arms.items()}
    header = ["arm", "concept", "QA original", "QA erased", "efficacy", *(f"{n}" for n in names), "worst case"]
    out = [f"Written by `{command}` on {datetime.date.today().isoformat()} ({os.cpu_count()} CPU cores, "
           "the embedded Gemma 3 270M, seed 42). TEST questions, 95% intervals.", "",
           "Recovered: the share of the original's above-chance knowledge the erased model answers with after "
           "the attack (0: the erasure holds, 1: all of it back); the worst case is the largest over the attacks.", "",
           "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for arm, rows in arms.items():
        out += concept_rows(arm, rows, names)
    lines, record = pooled_lines(robust, names)
    out += ["", "Pooled over concepts (stratified bootstrap; the worst case takes the maximum over attacks inside "
            "each draw; concepts whose original is near chance are left out):", "",
            "| arm | attack | recovered, pooled | concepts | left out / paired |", "|" + " --- |" * 5, *lines]
    left_out = {f"{a.concept}/{name}": why for arm_rows in robust.values() for a in arm_rows for name, why in a.left_out.items()}
    if left_out:
        out += ["", "Not in the pooled worst case: " + "; ".join(f"{k}: {v}" for k, v in sorted(left_out.items())) + "."]
    return "\n".join(out) + "\n", record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the benchmark folder (default: the one the package ships)")
    parser.add_argument("--out", default="runs/battery")
    parser.add_argument("--arms", default="ember")
    parser.add_argument("--concepts", default=CONCEPTS)
    parser.add_argument("--attacks", default="cheap", help="attack names, 'cheap' or 'all'")
    parser.add_argument("--write", default=None, metavar="PAGE", help="also write the tables to this markdown page")
    parser.add_argument("--finished-only", action="store_true",
                        help="tabulate the finished cells, run nothing (the page names the cells left out)")
    args = parser.parse_args()
    names = [n for n in battery.parse_names(args.attacks) if n != "probe"]  # the probe brings back no answers
    arms: dict[str, list[tuple[dict, dict]]] = {}
    unfinished, not_applied = [], []
    for arm in args.arms.split(","):
        for concept in args.concepts.split(","):
            folder = Path(args.out) / slug(arm) / slug(concept)
            if args.finished_only and not finished(folder, names):
                unfinished.append(f"{arm} on {concept}")
                continue
            ember = [e for e, _ in arms.get("ember", []) if e["concept"] == concept]
            erased = erase_run(arm, concept, args.data, folder, ember[0]["delta"] if ember else None)
            if "qa_test" not in erased:  # nothing was erased (the original at chance): nothing to attack
                continue
            if nothing_applied(erased):  # no grid candidate passed the gates: the model is the original
                not_applied.append(f"{arm} on {concept}")
                continue
            arms.setdefault(arm, []).append((erased, attack_run(folder, args.data, names)))
    command = "python bench/battery_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text, record = page(command, arms, names)
    if unfinished:
        text += f"\nNot run (unfinished when the page was written): {', '.join(unfinished)}.\n"
    if not_applied:
        text += (f"\nNo edit applied (no candidate of the method's grid passed its gates on TRAIN, so the model is "
                 f"the original and there is nothing to attack): {', '.join(not_applied)}.\n")
    print(text)
    write_json(Path(args.out) / "pooled.json", record)
    if args.write:
        write_text(Path(args.write), text)


if __name__ == "__main__":
    main()
