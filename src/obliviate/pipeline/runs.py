"""Runs behind `obliviate attack` and `obliviate eval`: resolve the two models, guard the
output folder, run the pieces (resuming finished ones) and write results.json.

``--model`` may be any model folder, hub id or .gguf, or a folder written by `erase`
(its model/ is used, and its results name the original model and the concept).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from obliviate.errors import ObliviateError
from obliviate.io import fingerprint, read_json, write_json
from obliviate.api import apply_patch
from obliviate.models.loading import EMBEDDED_MODEL, LoadedModel, load_model

CHECKPOINT = ".checkpoint.json"


@dataclass
class ModelPair:
    original: LoadedModel
    erased: LoadedModel
    recorded: dict  # what the erase run recorded (concept, method), empty for other folders


PATCH_FILE = "embedding_patch.safetensors"


def erase_run_info(spec: str | None) -> tuple[str | None, dict]:
    """(model spec to load, the erase run's results) for a folder written by `erase`.

    A folder with model/ loads that model; one saved with --no-save-model (results.json
    and the embedding patch only) loads the original it records and applies the patch.
    """
    folder = Path(spec) if spec else None
    if folder is None or not (folder / "results.json").is_file():
        return spec, {}
    if (folder / "model" / "config.json").is_file():
        return str(folder / "model"), read_json(folder / "results.json")
    if (folder / PATCH_FILE).is_file():
        return spec, read_json(folder / "results.json")
    return spec, {}


def edited_token_ids(spec: str | None) -> list[int] | None:
    """The token ids an erase run edited (its patch's ids), so white-box attacks can say how
    many of the rows they flag were really edited; None for other model folders."""
    patch_file = Path(spec) / PATCH_FILE if spec else None
    if patch_file is None or not patch_file.is_file():
        return None
    from obliviate.edits.embedding import EmbeddingPatch

    return sorted(EmbeddingPatch.load(patch_file).changed_token_ids())


def resolve_base(spec: str | None, base: str | None) -> tuple[str, str, dict]:
    """(model to load, original to load, recorded results); the original defaults to the
    one the erase run recorded, else the embedded model."""
    if not spec or spec == EMBEDDED_MODEL:
        raise ObliviateError("Pass the model to evaluate with --model (an `erase` output folder, a model folder or hub id).")
    model_spec, recorded = erase_run_info(spec)
    return model_spec, base or recorded.get("model") or EMBEDDED_MODEL, recorded


def load_erased(model_spec: str, recorded: dict, device=None, dtype=None, device_map=None,
                allow_pickle: bool = False) -> LoadedModel:
    """The model to evaluate: a model folder / hub id, or the recorded original with the
    erase run's embedding patch applied (folders written with --no-save-model)."""
    patch_file = Path(model_spec) / PATCH_FILE
    if not recorded or not patch_file.is_file() or (Path(model_spec) / "config.json").is_file():
        return load_model(model_spec, device, dtype, device_map, allow_pickle)
    erased = load_model(recorded["model"], device, dtype, device_map, allow_pickle)
    apply_patch(erased, patch_file)
    erased.name = f"{recorded['model']}+{patch_file}"
    return erased


def load_pair(config, base: str | None) -> ModelPair:
    model_spec, base_spec, recorded = resolve_base(config.model.name, base)
    m = config.model
    erased = load_erased(model_spec, recorded, m.device, m.dtype, m.device_map, m.allow_pickle)  # a bad folder fails fast
    original = load_model(base_spec, m.device, m.dtype, m.device_map, m.allow_pickle)
    if original.model.get_input_embeddings().weight.shape[0] != erased.model.get_input_embeddings().weight.shape[0]:
        raise ObliviateError(
            f"--model {config.model.name} and --base {base_spec} have different vocabularies: compare a model "
            "with the original it was made from (pass --base)."
        )
    return ModelPair(original, erased, recorded)


def open_out(out: Path, print_: str, overwrite: bool) -> dict:
    """Refuse a folder holding a different run (unless overwrite); our checkpoint otherwise."""
    from obliviate.pipeline.erase import mark_out_dir, prepare_out_dir

    state = prepare_out_dir(out, print_, overwrite)
    state.setdefault("done", {})
    mark_out_dir(out, state)
    return state


def run_attacks(config, names: list[str], settings: dict[str, dict], base: str | None = None,
                progress: bool = True) -> dict:
    """The attack battery on the original and the erased model; results.json in config.out."""
    from obliviate.attacks import AttackContext, get, make_config
    from obliviate.evaluation.scoring import Batching
    from obliviate.pipeline.erase import load_concept_data

    attack_configs = {name: make_config(name, settings.get(name)) for name in names}  # fail before loading
    concept = config.concept or erase_run_info(config.model.name)[1].get("concept")
    if not concept:
        raise ObliviateError("Name the concept with --concept (e.g. --concept 'Harry Potter').")
    from dataclasses import asdict, replace

    config = replace(config, concept=concept)
    data = load_concept_data(config)  # before the models: a missing concept fails fast
    out = Path(config.out)
    print_ = fingerprint({"kind": "attack", "model": config.model.name, "base": base, "concept": concept,
                          "data": asdict(config.data), "seed": config.seed, "scoring": config.evaluation.scoring,
                          "attacks": {n: asdict(c) for n, c in attack_configs.items()}})
    state = open_out(out, print_, config.overwrite)
    pair = load_pair(config, base)
    ctx = AttackContext(
        models={"original": pair.original, "erased": pair.erased}, data=data,
        data_dir=Path(config.data.data) if config.data.data else None, scoring=config.evaluation.scoring,
        seed=config.seed, bootstrap=config.evaluation.bootstrap, batching=Batching(config.evaluation.batch_tokens),
        out=out, progress=progress, options={"edited_token_ids": edited_token_ids(config.model.name)},
    )
    for name in names:
        if name in state["done"]:
            continue
        clock = time.perf_counter()
        result = get(name).run(ctx, attack_configs[name])
        result["seconds"] = time.perf_counter() - clock
        state["done"][name] = result
        write_json(out / CHECKPOINT, state)
    results = {
        "kind": "attack", "concept": concept, "model": config.model.name, "model_source": pair.erased.source,
        "base": pair.original.name, "base_source": pair.original.source, "seed": config.seed,
        "method": pair.recorded.get("method", "external"), "config_fingerprint": print_,
        "attacks": names, **{name: state["done"][name] for name in names},
        "timings": {name: state["done"][name]["seconds"] for name in names},
        "device": str(pair.erased.device), "torch_threads": torch.get_num_threads(),
        "erase_results": {k: pair.recorded[k] for k in ("qa_test", "delta", "features", "delta_sweep", "leak_check",
                                                         "leak_warning") if k in pair.recorded},
    }
    write_json(out / "results.json", results)
    (out / CHECKPOINT).unlink(missing_ok=True)
    return results


def run_eval(config, base: str | None = None, eco: str | None = None, judge: str | None = None,
             judge_model: str = "default", open_new_tokens: int = 24,
             progress: bool = True) -> dict:
    """Full evaluation of any model against the original; results.json in config.out."""
    from dataclasses import asdict, replace

    from obliviate.data.concepts import load_open_questions
    from obliviate.evaluation import open_ended
    from obliviate.evaluation.scoring import Batching
    from obliviate.pipeline.erase import load_concept_data
    from obliviate.attacks.common import accuracy_interval, compare_models

    concept = config.concept or erase_run_info(config.model.name)[1].get("concept")
    if not concept:
        raise ObliviateError("Name the concept with --concept (e.g. --concept 'Harry Potter').")
    config = replace(config, concept=concept)
    data = load_concept_data(config)
    wrap = _eco_wrapper(eco)
    out = Path(config.out)
    print_ = fingerprint({"kind": "eval", "model": config.model.name, "base": base, "eco": eco, "concept": concept,
                          "data": asdict(config.data), "evaluation": asdict(config.evaluation), "seed": config.seed,
                          "judge": judge, "open_new_tokens": open_new_tokens})
    open_out(out, print_, config.overwrite)
    timings, clock = {}, time.perf_counter()
    pair = load_pair(config, base)
    candidate = wrap(pair.erased, eco) if wrap else pair.erased
    timings["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    splits = compare_models(pair.original, candidate, data, config.evaluation, config.seed)
    timings["multiple_choice_and_coherence"] = time.perf_counter() - clock
    results = {
        "kind": "eval", "concept": concept, "model": config.model.name, "model_source": pair.erased.source,
        "base": pair.original.name, "base_source": pair.original.source, "eco": eco, "seed": config.seed,
        "method": pair.recorded.get("method", "external") + ("+eco" if eco else ""), "config_fingerprint": print_,
        "scoring": config.evaluation.scoring, "general_knowledge_source": data.general_source,
        "train": splits["train"], "test": {"metrics": splits["test"]},
    }
    metrics = splits["test"]
    for name in ("qa", "simdom", "general"):
        if f"{name}_base" in metrics:
            results[f"{name}_test"] = {"base": metrics[f"{name}_base"], "edited": metrics[f"{name}_edited"]}
    for name in ("efficacy", "specificity", "coherence", "harmonic", "score"):
        if name in metrics:
            results[name] = metrics[name]
    if config.data.data:
        clock = time.perf_counter()
        judge_obj = open_ended.make_judge(judge, judge_model, config.model.device)
        open_questions = load_open_questions(config.data.data, concept)
        results["open_ended"] = {"judge": judge_obj.name if judge_obj else None, "matcher": "normalised answer match"}
        batching = Batching(config.evaluation.batch_tokens)
        for split in ("qa_test", "simdom_test"):
            if split not in open_questions:
                continue
            entry = {}
            for role, lm in (("base", pair.original), ("edited", candidate)):
                judged = open_ended.evaluate_open(lm, open_questions[split], judge_obj, open_new_tokens, batching)
                entry[role] = {"match": accuracy_interval(judged["match"], config.evaluation.bootstrap, config.seed),
                               "examples": [{"q": q.question, "gold": q.answer, "answer": a}
                                            for q, a in zip(open_questions[split][:5], judged["answers"][:5])]}
                if "judged" in judged:
                    entry[role]["judged"] = accuracy_interval(judged["judged"], config.evaluation.bootstrap, config.seed)
            results["open_ended"][split] = entry
        timings["open_ended"] = time.perf_counter() - clock
    results["timings"] = timings
    write_json(out / "results.json", results)
    return results


def _eco_wrapper(eco: str | None):
    if not eco:
        return None
    try:
        from obliviate.methods.eco import wrap
    except ImportError as err:
        raise ObliviateError(f"--eco needs obliviate.methods.eco.wrap, which is not available in this install ({err}).") from err
    if not Path(eco).is_dir():
        raise ObliviateError(f"--eco {eco}: no such folder (pass a folder written by `obliviate eco`).")
    return wrap
