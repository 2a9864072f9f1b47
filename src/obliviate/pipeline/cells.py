"""One cell of a comparison: an erase run in its own folder, then the relearning attack on
the erased model. Each finished part stays in the folder (results.json, relearn.json) with
its seconds (times.json) and is read back, so a comparison of many cells resumes cell by
cell and part by part, and its time table still adds up. The attack is skipped, with the
reason in relearn.json, where it could measure nothing: no edit was applied, or the
original model's QA is near chance (no knowledge to regain)."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from obliviate.attacks import relearning
from obliviate.attacks.common import AttackContext
from obliviate.config import RunConfig
from obliviate.evaluation.results import RunResults, nothing_applied
from obliviate.evaluation.scoring import Batching
from obliviate.io import read_json, write_json
from obliviate.pipeline.erase import config_fingerprint, erase
from obliviate.pipeline.inputs import load_concept_data
from obliviate.pipeline.pair import load_erased

RESULTS, RELEARN, TIMES = "results.json", "relearn.json", "times.json"
SKIPPED = "no edit was applied: the erased model is the original, so its relearning says nothing of an erasure"
AT_CHANCE = ("the original model's QA is near chance: it holds no knowledge of the concept to regain, and pooled "
             "statistics leave such a concept out")


def run_cell(config: RunConfig, relearn: relearning.Config | None, progress: bool = True,
             near_chance_too: bool = False) -> RunResults:
    """The erase run's results in ``config.out``, with ``relearn`` (the attack's results, or
    why it was skipped) and ``times`` (seconds of each part) added. A part finished by an
    earlier run with the same settings is read back, not run again. ``near_chance_too``:
    attack a concept whose original QA is near chance as well."""
    folder = Path(config.out)
    times = _times(folder)
    results, lm = _finished_erase(folder, config), None
    if results is None:
        clock, times = time.perf_counter(), {}
        run = erase(config, progress)
        results, lm = dict(run.results), run.lm
        _record(folder, times, "erase", clock, earlier=results.get("timings", {}).get("resumed_grid", 0.0))
    if relearn is not None:
        skip = why_no_attack(results, near_chance_too)
        outcome = _finished_relearn(folder, relearn, results.get("config_fingerprint"))
        if outcome is None or outcome.get("skipped") != skip:  # an attack skipped before may be asked for now
            clock = time.perf_counter()
            if skip:
                outcome = {"skipped": skip, "settings": asdict(relearn)}
            else:
                lm = lm or load_erased(str(folder), results)
                outcome = relearning.run(_attack_context(config, lm, folder, progress), relearn)
            write_json(folder / RELEARN, {**outcome, "erase_fingerprint": results.get("config_fingerprint")})
            _record(folder, times, "relearn", clock)
        results["relearn"] = outcome
    results["times"] = times
    return RunResults.from_dict(results)


def read_cell(results_file: Path) -> RunResults:
    """A run's results.json, typed, with its cell's relearning attack (relearn.json beside
    it, when that attacked this erase) as the part ``relearn``, as ``run_cell`` adds it."""
    results = RunResults.read(results_file)
    attack = results_file.parent / RELEARN
    if attack.is_file():
        outcome = read_json(attack)
        if _attacked(outcome, results.parts.get("config_fingerprint")):
            results = replace(results, parts={**results.parts, "relearn": outcome})
    return results


def why_no_attack(results: dict, near_chance_too: bool = False) -> str | None:
    """Why relearning would measure nothing on this cell (None: run it)."""
    if nothing_applied(results):
        return SKIPPED
    return AT_CHANCE if results.get("near_chance", {}).get("qa") and not near_chance_too else None


def _finished_erase(folder: Path, config: RunConfig) -> dict | None:
    path = folder / RESULTS
    if not path.is_file():
        return None
    results = read_json(path)
    return results if results.get("config_fingerprint") == config_fingerprint(config) else None


def _finished_relearn(folder: Path, relearn: relearning.Config, erase_fingerprint: str | None) -> dict | None:
    """relearn.json when it holds this attack on this erase (the attack adds notes of its
    own to the settings)."""
    path = folder / RELEARN
    if not path.is_file():
        return None
    outcome, wanted = read_json(path), asdict(relearn)
    recorded = outcome.get("settings", {})
    same_attack = {k: recorded.get(k) for k in wanted} == wanted
    return outcome if same_attack and _attacked(outcome, erase_fingerprint) else None


def _attacked(outcome: dict, erase_fingerprint: str | None) -> bool:
    """The attack in ``outcome`` ran on this erase (files written before the fingerprint was
    recorded attacked the erase in their folder)."""
    return outcome.get("erase_fingerprint", erase_fingerprint) == erase_fingerprint


def _attack_context(config: RunConfig, lm, folder: Path, progress: bool) -> AttackContext:
    data = load_concept_data(config)
    return AttackContext(models={"erased": lm}, data=data, data_dir=data.data_dir, scoring=config.evaluation.scoring,
                         seed=config.seed, bootstrap=config.evaluation.bootstrap,
                         batching=Batching(config.evaluation.batch_tokens), out=folder, progress=progress)


def _times(folder: Path) -> dict:
    return read_json(folder / TIMES) if (folder / TIMES).is_file() else {}


def _record(folder: Path, times: dict, part: str, clock: float, earlier: float = 0.0) -> None:
    """The part's seconds since ``clock``, plus ``earlier``: what an interrupted run spent on
    work this one read back."""
    times[part] = time.perf_counter() - clock + earlier
    write_json(folder / TIMES, times)
