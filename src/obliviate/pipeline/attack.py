"""`obliviate attack`: the attack battery on the original and the erased model, each attack
resumable, into results.json."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from obliviate.attacks import AttackContext, get, make_config
from obliviate.attacks.common import worst_case_recovered
from obliviate.errors import ObliviateError
from obliviate.evaluation.results import RunResults
from obliviate.evaluation.scoring import Batching
from obliviate.io import fingerprint, write_json
from obliviate.pipeline.inputs import load_concept_data
from obliviate.pipeline.outputs import CHECKPOINT, finish
from obliviate.pipeline.pair import edited_token_ids, erase_run_info, load_pair, open_out


def run_attacks(config, names: list[str], settings: dict[str, dict], base: str | None = None,
                progress: bool = True) -> dict:
    """The attack battery on the original and the erased model; results.json in config.out."""
    attack_configs = {name: make_config(name, settings.get(name)) for name in names}  # fail before loading
    concept = config.concept or erase_run_info(config.model.name)[1].get("concept")
    if not concept:
        raise ObliviateError("Name the concept with --concept (e.g. --concept 'Harry Potter').")
    config = replace(config, concept=concept)
    data = load_concept_data(config)  # before the models: a missing concept fails fast
    out = Path(config.out)
    print_ = fingerprint({"kind": "attack", "model": config.model.name, "base": base, "concept": concept,
                          "data": asdict(config.data), "seed": config.seed, "scoring": config.evaluation.scoring,
                          "attacks": {n: asdict(c) for n, c in attack_configs.items()}})
    state, pair = open_out(out, print_, config.overwrite, lambda: load_pair(config, base))
    ctx = AttackContext(
        models={"original": pair.original, "erased": pair.erased}, data=data,
        data_dir=config.data.data_dir(), scoring=config.evaluation.scoring,
        seed=config.seed, bootstrap=config.evaluation.bootstrap, batching=Batching(config.evaluation.batch_tokens),
        out=out, progress=progress,
        options={"edited_token_ids": edited_token_ids(config.model.name), "cache": config.evaluation.cache},
    )
    for name in names:
        if name in state["done"]:
            continue
        clock = time.perf_counter()
        result = get(name).run(ctx, attack_configs[name])
        result["seconds"] = time.perf_counter() - clock
        state["done"][name] = result
        write_json(out / CHECKPOINT, state)
    parts = {
        "model_source": pair.erased.source, "base": pair.original.name, "base_source": pair.original.source,
        "config_fingerprint": print_, "attacks": names, **{name: state["done"][name] for name in names},
        "timings": {name: state["done"][name]["seconds"] for name in names},
        "chance": ctx.chance,
        "worst_case_recovered": worst_case_recovered({name: state["done"][name] for name in names}),
        "device": str(pair.erased.device), "torch_threads": torch.get_num_threads(),
        "erase_results": {k: pair.recorded[k] for k in ("qa_test", "delta", "features", "delta_sweep", "leak_check",
                                                         "leak_warning") if k in pair.recorded},
    }
    results = RunResults("attack", concept, pair.recorded.get("method", "external"), config.model.name, config.seed,
                         parts=parts).to_dict()
    finish(out, results)
    return results
