"""The Python API. The CLI only parses arguments and calls these functions.

    import obliviate
    result = obliviate.erase("Harry Potter", data="../shared/data/ember-benchmark", out="runs/hp")
    result["efficacy"], result.lm.model          # metrics, and the edited model in memory
"""
from __future__ import annotations

from pathlib import Path

from obliviate.config import RunConfig, load_yaml, merge, run_config_from_dict
from obliviate.edits.embedding import EmbeddingPatch, apply_patch_file
from obliviate.edits.protocol import revert_verified
from obliviate.models.loading import LoadedModel, load_model
from obliviate.pipeline.erase import ErasureResult, erase as run_erase


def make_config(config_file: str | Path | None = None, **overrides) -> RunConfig:
    """A RunConfig from an optional YAML file plus overrides.

    Overrides are top-level fields (concept, out, method, seed, ...) or sections given as
    dicts (ember={"k": 200}, model={"device": "cuda"}).
    """
    base = run_config_from_dict(load_yaml(config_file), str(config_file)) if config_file else RunConfig()
    return merge(base, overrides)


def erase(concept: str, data: str | Path | None = None, out: str | Path | None = None,
          config_file: str | Path | None = None, progress: bool = True, **overrides) -> ErasureResult:
    """Erase ``concept`` (EMBER by default) and return the results and the edited model.

    ``out=None`` keeps everything in memory; otherwise the folder gets results.json,
    model/, embedding_patch.safetensors and report.md.
    """
    data_section = dict(overrides.pop("data_options", {}))
    if data is not None:
        data_section["data"] = str(data)
    config = make_config(config_file, concept=concept, out=str(out) if out else "", data=data_section, **overrides)
    return run_erase(config, progress=progress)


def apply_patch(model_or_lm, patch_path: str | Path) -> EmbeddingPatch:
    """Apply a saved embedding patch to a model, verified (a patch for another model, by
    shape or by the sha256 of its original rows, is refused); returns it for ``revert_patch``."""
    model = model_or_lm.model if isinstance(model_or_lm, LoadedModel) else model_or_lm
    return apply_patch_file(model, patch_path)


def revert_patch(model_or_lm, patch: EmbeddingPatch) -> None:
    """Undo ``apply_patch``; the original bits come back (verified). A forward-only patch
    (the default file: no original rows) cannot revert and raises ObliviateError."""
    model = model_or_lm.model if isinstance(model_or_lm, LoadedModel) else model_or_lm
    revert_verified(patch, model)


__all__ = ["erase", "make_config", "apply_patch", "revert_patch", "load_model", "RunConfig"]
