"""The two models `eval` and `attack` compare: the erased one (any model folder, hub id or
.gguf, or a folder written by `erase`: its model/, or the original it records with its
edit files applied when it was saved with --no-save-model or its edit changes no weight,
as ECO's hook) and the original it was made from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from obliviate.edits.embedding import PATCH_FILE, EmbeddingPatch, apply_patch_file, patch_between
from obliviate.edits.weights import WEIGHT_DELTA_FILE, apply_weight_delta_file
from obliviate.errors import ObliviateError
from obliviate.evaluation.results import nothing_applied
from obliviate.io import read_json
from obliviate.methods import eco
from obliviate.methods.eco import EcoEdit
from obliviate.models.loading import EMBEDDED_MODEL, LoadedModel, load_model, untie_output_embeddings
from obliviate.pipeline.outputs import mark_out_dir, prepare_out_dir


@dataclass
class ModelPair:
    original: LoadedModel
    erased: LoadedModel
    recorded: dict  # what the erase run recorded (concept, method), empty for other folders


def erase_run_info(spec: str | None) -> tuple[str | None, dict]:
    """(model spec to load, the erase run's results) for a folder written by `erase`.

    A folder with model/ loads that model; one saved with --no-save-model (results.json
    and the edit files only) loads the original it records and applies them.
    """
    folder = Path(spec) if spec else None
    if folder is None or not (folder / "results.json").is_file():
        return spec, {}
    if (folder / "model" / "config.json").is_file():
        return str(folder / "model"), read_json(folder / "results.json")
    if saved_edits(folder):
        return spec, read_json(folder / "results.json")
    recorded = read_json(folder / "results.json")
    if recorded.get("kind") == "erase" and nothing_applied(recorded):
        raise ObliviateError(
            f"{folder} is an erase run that applied no edit (no candidate passed the grid's gates, or the concept's "
            "questions were at chance): its model is the original, so there is nothing to evaluate or attack. Rerun "
            "`erase` (another method, a wider grid) or name a run that saved a model or an edit."
        )
    return spec, {}


def edited_token_ids(spec: str | None) -> list[int] | None:
    """The token ids an erase run edited (its patch's ids), so white-box attacks can say how
    many of the rows they flag were really edited; None for other model folders."""
    patch_file = Path(spec) / PATCH_FILE if spec else None
    if patch_file is None or not patch_file.is_file():
        return None
    return sorted(EmbeddingPatch.load(patch_file).changed_token_ids())


def resolve_base(spec: str | None, base: str | None, hooked_model: str | None = None) -> tuple[str, str, dict]:
    """(model to load, original to load, recorded results); the original defaults to the
    one the erase run recorded, else the embedded model. ``hooked_model``: the model an
    ECO artifact was fitted on, evaluated (with its hook) when no other model is named."""
    if (not spec or spec == EMBEDDED_MODEL) and hooked_model:
        return hooked_model, base or hooked_model, {}
    if not spec or spec == EMBEDDED_MODEL:
        raise ObliviateError("Pass the model to evaluate with --model (an `erase` output folder, a model folder or hub id).")
    model_spec, recorded = erase_run_info(spec)
    return model_spec, base or recorded.get("model") or EMBEDDED_MODEL, recorded


def load_erased(model_spec: str, recorded: dict, device=None, dtype=None, device_map=None,
                allow_pickle: bool = False) -> LoadedModel:
    """The model to evaluate: a model folder / hub id, or the recorded original with the
    erase run's edit files applied (folders written with --no-save-model): its embedding
    patch and its base method's weight delta, whichever it has."""
    edits = saved_edits(Path(model_spec))
    if not recorded or not edits or (Path(model_spec) / "config.json").is_file():
        return load_model(model_spec, device, dtype, device_map, allow_pickle)
    erased = load_model(recorded["model"], device, dtype, device_map, allow_pickle)
    for path in edits:
        if path.name == eco.ECO_DIR:
            eco.wrap(erased, path)  # the hook, last: it reads the inputs of the edited model
        else:
            (apply_patch_file if path.name == PATCH_FILE else apply_weight_delta_file)(erased.model, path)
    erased.name = "+".join([recorded["model"], *(str(path) for path in edits)])
    return erased


def saved_edits(folder: Path) -> list[Path]:
    """The forward-only edit files of a patch-only erase run (and an ECO hook's artifact), in
    the order they apply."""
    return [path for path in (folder / PATCH_FILE, folder / WEIGHT_DELTA_FILE, folder / eco.ECO_DIR) if path.exists()]


def load_pair(config, base: str | None, hooked_model: str | None = None) -> ModelPair:
    model_spec, base_spec, recorded = resolve_base(config.model.name, base, hooked_model)
    m = config.model
    erased = load_erased(model_spec, recorded, m.device, m.dtype, m.device_map, m.allow_pickle)  # a bad folder fails fast
    original = load_model(base_spec, m.device, m.dtype, m.device_map, m.allow_pickle)
    if original.model.get_input_embeddings().weight.shape[0] != erased.model.get_input_embeddings().weight.shape[0]:
        raise ObliviateError(
            f"--model {config.model.name} and --base {base_spec} have different vocabularies: compare a model "
            "with the original it was made from (pass --base)."
        )
    return ModelPair(original, erased, recorded)


def erased_as_edit(pair: ModelPair) -> EmbeddingPatch | EcoEdit | None:
    """The erased model as an edit of the original, so an evaluation runs again only the
    inputs the edit changes: rows of the embedding (EMBER's runs, model/ saved or not; the
    original is untied first where the patch needs it, as the erase run did), or an ECO
    hook on the original's own weights (an ECO erase folder, `--eco`; a copy of the hook
    goes on the original and decides itself which inputs it changes). None for anything else
    (trained weights, another model, a patch and a hook together): then every input runs
    on both models."""
    patch = patch_between(pair.original.model, pair.erased.model)
    hook = eco.installed_hook(pair.erased.model)
    if patch is None or (hook is not None and len(patch.token_ids)):
        return None
    if hook is not None:
        return EcoEdit(hook.detached_copy())
    if patch.metadata["embeddings_untied"] == "True":
        untie_output_embeddings(pair.original.model)
    return patch


def open_out(out: Path, print_: str, overwrite: bool, load: Callable[[], ModelPair]) -> tuple[dict, ModelPair]:
    """(our checkpoint, the models): a folder holding a different run is refused before any
    model loads; the folder is marked as ours only once ``load`` succeeded, so a run that
    fails to load its models leaves nothing that blocks the corrected rerun."""
    state = prepare_out_dir(out, print_, overwrite)
    state.setdefault("done", {})
    pair = load()
    mark_out_dir(out, state)
    return state, pair
