"""ECO: inference-time erasure behind a prompt classifier (METHOD.md section 3).

A method like the others (``obliviate erase --method eco``): ``fit`` trains the classifier,
calibrates its threshold and learns sigma; its one candidate is an ``EcoEdit`` (the hook),
saved as the artifact folder ``eco/``. Used directly:

    import obliviate.methods.eco as eco
    fitted = eco.fit(lm, data, eco.Config(), seed=42)
    fitted.artifact.save("runs/eco-hp")        # or `obliviate eco fit ... --out runs/eco-hp`
    wrapped = eco.wrap(lm, "runs/eco-hp")      # same LoadedModel, hook installed
    wrapped.model.generate(...)                # flagged prompts corrupted at prefill
    eco.unwrap(wrapped)                        # hook removed; the model is as before

No weight changes: ``wrap`` installs hooks on the model in place (it does not copy it),
so the returned LoadedModel shares its model with the one passed in. Apply an EMBER
patch first (obliviate.api.apply_patch) to get EMBER+ECO: the edited embedding table
sits under the hook.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from obliviate.errors import ObliviateError
from obliviate.models.loading import LoadedModel
from obliviate.methods.eco.artifact import EcoArtifact
from obliviate.data.concepts import ConceptData
from obliviate.methods import MethodContext
from obliviate.methods.eco.config import EcoConfig
from obliviate.methods.eco.fitting import FittedEco, fit as fit_eco
from obliviate.methods.eco.hook import ECO_DIR, EcoEdit, EcoHook, installed_hook

FITS_BEFORE_PLUG_IN = False  # fitted on the model with EMBER's edit applied (methods/__init__.py)

Config = EcoConfig  # the Method protocol's name for the settings


def load(eco_dir: str | Path) -> EcoArtifact:
    return EcoArtifact.load(eco_dir)


def _model_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def wrap(model_or_lm: LoadedModel | nn.Module, eco_dir: str | Path | EcoArtifact, tokenizer=None) -> LoadedModel:
    """Install the ECO hook of ``eco_dir`` on the model and return it as a LoadedModel.

    Refuses (ObliviateError) an artifact made for another model, naming both. The hook is
    reachable as ``hook_of(wrapped)``; ``unwrap(wrapped)`` removes it.
    """
    artifact = eco_dir if isinstance(eco_dir, EcoArtifact) else load(eco_dir)
    if isinstance(model_or_lm, LoadedModel):
        lm = model_or_lm
    elif isinstance(model_or_lm, nn.Module):
        name = _model_name(model_or_lm)
        lm = LoadedModel(model=model_or_lm, tokenizer=tokenizer, name=name, source=name)
    else:
        raise ObliviateError(f"eco.wrap needs a LoadedModel or a torch model, got {type(model_or_lm).__name__}.")
    if installed_hook(lm.model) is not None:
        raise ObliviateError("This model already has an ECO hook: call obliviate.methods.eco.unwrap first.")
    artifact.check_model(lm.model, f"{lm.name} ({lm.source})")
    artifact.hook().install(lm.model)
    return lm


def unwrap(model_or_lm: LoadedModel | nn.Module) -> None:
    """Remove the ECO hook (a no-op when none is installed)."""
    model = model_or_lm.model if isinstance(model_or_lm, LoadedModel) else model_or_lm
    hook = installed_hook(model)
    if hook is not None:
        hook.remove()


def hook_of(model_or_lm: LoadedModel | nn.Module) -> EcoHook | None:
    model = model_or_lm.model if isinstance(model_or_lm, LoadedModel) else model_or_lm
    return installed_hook(model)


def fit(lm: LoadedModel, data: ConceptData, config: Config = Config(), seed: int = 42,
        context: MethodContext = MethodContext()) -> FittedEco:
    """The Method protocol's fit: the run's seed seeds the classifier split and the corruption."""
    return fit_eco(lm, data, replace(config, seed=seed), context.log)


__all__ = ["ECO_DIR", "Config", "fit", "wrap", "unwrap", "load", "hook_of", "EcoConfig", "EcoArtifact", "EcoHook", "EcoEdit",
           "FittedEco"]
