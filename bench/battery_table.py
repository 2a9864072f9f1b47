"""Which defences hold against an adversary who holds the erased weights (issue 14): each
arm erases every concept, then the white-box attacks run on its output.

    python bench/white_box_table.py --data ../shared/data/ember-benchmark --out runs/white-box \
        [--arms ember,rmu+ember] [--concepts Gambling,Gun,...] \
        [--attacks tied-restore,embedding-repair,repair-relearn,gcg]

An arm is a method name, with "+ember" for EMBER first (its delta fixed to the one the
"ember" arm's grid chose, when that arm comes first). Runs go to OUT/<arm>/<concept>/
(erase, patch-only) and OUT/<arm>/<concept>/attack/ (the attacks); finished ones are
skipped, so an interrupted table resumes, and an existing erase run can be linked there.
Prints, on TEST questions with 95% intervals: accuracy of the original, of the erased
model and after each attack, per concept; then per arm the pooled share of the original's
knowledge each attack brings back, and the paired difference between the arms (the same
question draws in both).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import obliviate
from obliviate.cli import main as cli
from obliviate.evaluation.pooled import Arm, arm_from_results, paired_difference, pooled_metrics
from obliviate.io import write_json

CONCEPTS = "Gambling,Gun,Golf,Culture of Greece,Cannabis"  # the embedded model knows them (test QA >= 0.40)
ATTACKS = "tied-restore,embedding-repair,repair-relearn"


def slug(concept: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in concept).strip("_").lower()


def erase_run(arm: str, concept: str, data: str, folder: Path, ember_delta: float | None = None) -> dict:
    """The arm's erase run (made if missing). ``ember_delta``: EMBER's strength in a plug-in
    arm, fixed (the delta the EMBER arm's own grid chose), so both arms carry the same
    EMBER edit and the plug-in run skips a second delta grid."""
    if not (folder / "results.json").exists():
        method, _, ember = arm.partition("+")
        plug_in = bool(ember) and method != "ember"
        obliviate.erase(concept, data=data, out=folder, save_model=False, method=method, with_ember=plug_in,
                        **({"ember": {"delta": ember_delta}} if plug_in and ember_delta is not None else {}))
    return json.loads((folder / "results.json").read_text())


def attack_run(folder: Path, data: str, attacks: str) -> dict:
    """The attacks' results on one erase run: those in OUT/.../attack/ plus, for an attack
    asked later, its own folder attack-<name>/ (so a table grows without rerunning)."""
    results: dict = {}
    for name in attacks.split(","):
        if name in results:
            continue
        found = [f / "results.json" for f in (folder / "attack", folder / f"attack-{name}")
                 if (f / "results.json").exists() and name in json.loads((f / "results.json").read_text())]
        if not found:
            out = folder / ("attack" if not (folder / "attack").exists() else f"attack-{name}")
            asked = attacks if out.name == "attack" else name
            code = cli(["attack", "--model", str(folder), "--data", data, "--attacks", asked, "--out", str(out)])
            if code:
                raise SystemExit(f"attack on {folder} failed with exit code {code}")
            found = [out / "results.json"]
        results.update(json.loads(found[0].read_text()))
    return results


def after(result: dict, role: str = "erased") -> list[int]:
    """Per-question answers after an attack (repair-relearn: after its last epoch)."""
    entry = result[role]
    return entry["curve_correct"][-1] if "curve_correct" in entry else entry["correct_after"]


def attacked_arm(erased: dict, result: dict) -> Arm:
    """The erase run's arm whose 'relearned' answers are those after this attack, so the
    pooled 'regained' is the share of the original's knowledge the attack brings back.
    An attack measured on part of the questions (gcg: those its suffixes were not tuned
    on) keeps only those."""
    arm = arm_from_results(erased)
    questions = dict(arm.questions)
    kept = result["erased"].get("held_out_questions")
    if kept is not None:
        questions["qa"] = {key: values[kept] for key, values in arm.questions["qa"].items()}
    return Arm(arm.concept, arm.method, questions, arm.prompts, arm.near_chance, np.asarray(after(result), float))


def cell(interval: dict) -> str:
    return f"{interval['value']:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def concept_rows(arm: str, rows: list[tuple[dict, dict]], attacks: list[str]) -> list[str]:
    lines = []
    for erased, attacked in rows:
        cells = [cell(erased["qa_test"]["base"]), cell(erased["qa_test"]["edited"])]
        cells += [cell(attacked[a]["erased"]["after"]) for a in attacks]
        if "repair-relearn" in attacks:
            cells.append(cell(attacked["repair-relearn"]["original"]["after"]))
        flagged = attacked.get("embedding-repair", {}).get("erased", {})
        found = (f"{flagged['flagged']} ({flagged.get('touched_and_edited', '?')}/{flagged.get('edited_rows', '?')})"
                 if flagged else "-")
        lines.append(f"| {arm} | {erased['concept']} | " + " | ".join(cells) + f" | {found} |")
    return lines


def pooled_lines(arms: dict[str, list[tuple[dict, dict]]], attacks: list[str]) -> tuple[list[str], dict]:
    lines, record = [], {}
    per_attack = {a: {arm: [attacked_arm(e, r[a]) for e, r in rows] for arm, rows in arms.items()} for a in attacks}
    for attack in attacks:
        for arm, arm_rows in per_attack[attack].items():
            pooled = pooled_metrics(arm_rows)
            record[f"{arm}/{attack}"] = {k: pooled[k].as_dict() for k in ("efficacy", "regained")}
            p = pooled["regained"].as_dict()
            left = ", ".join(p["excluded"]) or "-"
            lines.append(f"| {arm} | {attack} | {cell(pooled['efficacy'].as_dict())} | {cell(p)} | "
                         f"{p['n_concepts']} | {left} |")
        names = list(per_attack[attack])
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                diff = paired_difference(per_attack[attack][a], per_attack[attack][b])["regained"].as_dict()
                record[f"{a} minus {b}/{attack}"] = diff
                lines.append(f"| {a} minus {b} | {attack} | | {cell(diff)} (paired) | {diff['n_concepts']} | "
                             f"{'significant' if diff['significant'] else 'inside the noise'} |")
    return lines, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ember-benchmark")
    parser.add_argument("--out", default="runs/white-box")
    parser.add_argument("--arms", default="ember,rmu+ember")
    parser.add_argument("--concepts", default=CONCEPTS)
    parser.add_argument("--attacks", default=ATTACKS)
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    arms: dict[str, list[tuple[dict, dict]]] = {}
    for arm in args.arms.split(","):
        for concept in args.concepts.split(","):
            folder = Path(args.out) / arm / slug(concept)
            ember = [e for e, _ in arms.get("ember", []) if e["concept"] == concept]
            erased = erase_run(arm, concept, args.data, folder, ember[0]["delta"] if ember else None)
            arms.setdefault(arm, []).append((erased, attack_run(folder, args.data, args.attacks)))
    header = ["arm", "concept", "QA original", "QA erased", *(f"after {a}" for a in attacks)]
    header += ["original after repair-relearn"] if "repair-relearn" in attacks else []
    header += ["rows flagged (edited among them)"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for arm, rows in arms.items():
        print("\n".join(concept_rows(arm, rows, attacks)))
    lines, record = pooled_lines(arms, attacks)
    print("\n| arm | attack | pooled efficacy | pooled knowledge back | concepts | left out |\n|" + " --- |" * 6)
    print("\n".join(lines))
    write_json(Path(args.out) / "pooled.json", record)


if __name__ == "__main__":
    main()
