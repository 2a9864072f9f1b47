"""Edits made by the trained methods: new values for whole weight tensors.

``ParameterDelta`` holds the original and trained values of the parameters a method
trained (RMU's down-projections, gradient difference's and NPO's block weights), so
``revert`` restores the original bits exactly. ``LoraAdapter`` holds a trained peft LoRA
adapter (ELM): it is saved as a normal peft adapter folder, and applying it merges
``W + (alpha / r) B A`` into the base weights (what peft's ``merge_and_unload`` does).
Both may change any output, so ``changed_token_ids`` is None.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from obliviate.errors import ObliviateError
from obliviate.edits.protocol import ALL_ROWS, EditDefaults
from obliviate.io import load_tensors, save_tensors, tensor_sha256

WEIGHT_DELTA_FILE = "weight_delta.safetensors"  # a forward-only ParameterDelta: new values, originals' sha256


def _write(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in _parameters(model, values).items():
            param.copy_(values[name].to(device=param.device, dtype=param.dtype))


def _parameters(model: torch.nn.Module, names) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise ObliviateError(f"This edit changes parameters the model does not have: {missing[:5]}; apply it to the model it was made for.")
    return {name: params[name] for name in names}


@dataclass(frozen=True)
class ParameterDelta(EditDefaults):
    """Trained values of some parameters, with their originals (kept on the CPU)."""

    original: dict[str, torch.Tensor]
    new: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.original) != set(self.new):
            raise ValueError("original and new must name the same parameters")
        for name, tensor in self.new.items():
            if tensor.shape != self.original[name].shape:
                raise ValueError(f"shape mismatch for {name}: {tuple(tensor.shape)} vs {tuple(self.original[name].shape)}")

    @classmethod
    def capture(cls, model: torch.nn.Module, original: dict[str, torch.Tensor], metadata: dict | None = None) -> "ParameterDelta":
        """The model's current values of the parameters in ``original`` as the new values."""
        current = _parameters(model, original)
        new = {name: param.detach().to("cpu", copy=True) for name, param in current.items()}
        return cls(original=original, new=new, metadata={k: str(v) for k, v in (metadata or {}).items()})

    def apply(self, model: torch.nn.Module) -> None:
        _write(model, self.new)

    def revert(self, model: torch.nn.Module) -> None:
        _write(model, self.original)

    def changed_token_ids(self) -> None:
        return None  # transformer weights: any prediction may move

    def changed_parameters(self) -> list[str]:
        return sorted(name for name in self.new if not torch.equal(self.new[name], self.original[name]))

    def expected_changes(self, model: torch.nn.Module) -> dict[str, None]:
        return {name: ALL_ROWS for name in self.changed_parameters()}

    def save_to(self, folder: Path) -> list[Path]:
        """Forward-only: the new values and a sha256 of the originals (never the originals)."""
        path = Path(folder) / WEIGHT_DELTA_FILE
        names = self.changed_parameters()
        save_tensors(path, {n: self.new[n].contiguous() for n in names},
                     {**self.metadata, "original_sha256": tensor_sha256({n: self.original[n] for n in names})})
        return [path]

    def summary(self) -> dict:
        moved = sum(float((self.new[n].double() - self.original[n].double()).norm() ** 2) for n in self.new) ** 0.5
        return {
            "kind": "parameter_delta", "parameters": len(self.new), "changed_parameters": len(self.changed_parameters()),
            "elements": int(sum(t.numel() for t in self.new.values())), "delta_norm": moved,
        }

    def save(self, path: str | Path) -> None:
        tensors = {f"original.{n}": t for n, t in self.original.items()}
        tensors.update({f"new.{n}": t for n, t in self.new.items()})
        save_tensors(path, tensors, self.metadata)

    @classmethod
    def load(cls, path: str | Path) -> "ParameterDelta":
        tensors, metadata = load_tensors(path, "Parameter delta")
        original = {k[len("original."):]: v for k, v in tensors.items() if k.startswith("original.")}
        new = {k[len("new."):]: v for k, v in tensors.items() if k.startswith("new.")}
        return cls(original=original, new=new, metadata=metadata)


def base_weights(model: torch.nn.Module, names, known: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the named parameters, added to ``known`` (and returned) so that every
    edit of a grid refers to one copy of each original."""
    known = {} if known is None else known
    for name, param in _parameters(model, [n for n in names if n not in known]).items():
        known[name] = param.detach().to("cpu", copy=True)
    return known


def apply_weight_delta_file(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Write a forward-only ``weight_delta.safetensors`` (ParameterDelta.save_to) into
    ``model``: its new values, after checking that the model's current values are the
    originals it was made from (their sha256). Returns the parameter names written."""
    tensors, metadata = load_tensors(path, "Weight delta")
    params = _parameters(model, tensors)
    expected = metadata.get("original_sha256")
    current = tensor_sha256({name: param.detach() for name, param in params.items()})
    if expected is not None and current != expected:
        raise ObliviateError(f"{path} was made for another model: the weights it replaces differ from the ones it "
                             "was made from. Apply it to the original model its erase run recorded.")
    _write(model, tensors)
    return sorted(tensors)


@dataclass(frozen=True)
class LoraAdapter(EditDefaults):
    """A trained LoRA adapter (peft format), applied by merging into the base weights.

    ``weights`` maps a base Linear weight name (e.g. ``model.layers.2.mlp.up_proj.weight``)
    to its (A, B) pair; ``scaling`` is lora_alpha / r; ``original`` holds the base weights
    it merges into (``base_weights``: one dict a grid's adapters share), so revert writes
    the original bits back. ``folder`` is where the adapter was saved with peft's
    ``save_pretrained`` (load it with ``PeftModel.from_pretrained``).
    """

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    original: dict[str, torch.Tensor]
    folder: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = sorted(set(self.weights) - set(self.original))
        if missing:
            raise ValueError(f"the adapter's base weights are not all given: {missing[:5]}")

    def merged_delta(self) -> ParameterDelta:
        original = {name: self.original[name] for name in self.weights}
        new = {name: (original[name].double() + self.scaling * (b.double() @ a.double())).to(original[name].dtype)
               for name, (a, b) in self.weights.items()}
        return ParameterDelta(original=original, new=new, metadata=self.metadata)

    def apply(self, model: torch.nn.Module) -> None:
        self.merged_delta().apply(model)

    def revert(self, model: torch.nn.Module) -> None:
        _write(model, {name: self.original[name] for name in self.weights})

    def changed_token_ids(self) -> None:
        return None

    def expected_changes(self, model: torch.nn.Module) -> dict[str, None]:
        return {name: ALL_ROWS for name in self.weights}

    # Beside a merged model/ the adapter gives the original weights back (W = W_merged - s B A):
    # the output folder writes it only when model/ is not written (it is then the erasure).
    reveals_original_beside_model = True

    def save_to(self, folder: Path) -> list[Path]:
        """The adapter's A and B matrices (a peft folder when training wrote one: copied)."""
        target = Path(folder) / "adapter"
        if self.folder is not None and Path(self.folder).is_dir():
            staging = Path(folder) / "adapter.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(self.folder, staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            return [target]
        path = Path(folder) / "lora.safetensors"
        tensors = {f"{kind}.{n}": t.contiguous() for n, pair in self.weights.items() for kind, t in zip(("A", "B"), pair)}
        save_tensors(path, tensors, {**self.metadata, "scaling": str(self.scaling)})
        return [path]

    def summary(self) -> dict:
        rank = next(iter(self.weights.values()))[0].shape[0] if self.weights else 0
        return {"kind": "lora_adapter", "modules": len(self.weights), "rank": int(rank), "scaling": self.scaling,
                "folder": str(self.folder) if self.folder else None}


@dataclass(frozen=True)
class LowRankDelta(EditDefaults):
    """New values W + L R for some weight matrices, stored as the low-rank factors.

    The training-free MLP methods (SNMF, PISCES) change a few directions of many large
    matrices: storing ``L`` (out x r) and ``R`` (r x in) instead of every new tensor keeps a
    grid of candidates in memory (the pipeline holds them all) at a few kilobytes each.
    ``original`` may be one dict shared by every candidate of a grid; ``revert`` writes it
    back, so the original bits return exactly (W + LR - LR would not). The new values are
    computed in float64 and cast once, so applying twice gives the same bits.
    """

    original: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (left, right) in self.factors.items():
            if name not in self.original:
                raise ValueError(f"factors name a parameter without an original value: {name}")
            rows, cols = self.original[name].shape
            if left.shape[0] != rows or right.shape[1] != cols or left.shape[1] != right.shape[0]:
                raise ValueError(f"factor shapes {tuple(left.shape)} x {tuple(right.shape)} do not fit {name} {(rows, cols)}")

    def new_value(self, name: str) -> torch.Tensor:
        left, right = self.factors[name]
        base = self.original[name]
        return (base.double() + left.double() @ right.double()).to(base.dtype)

    def apply(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in _parameters(model, self.factors).items():
                param.copy_(self.new_value(name).to(param.device))

    def revert(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in _parameters(model, self.factors).items():
                param.copy_(self.original[name].to(device=param.device, dtype=param.dtype))

    def changed_token_ids(self) -> None:
        return None  # transformer weights: any prediction may move

    def changed_parameters(self) -> list[str]:
        return sorted(name for name in self.factors if not torch.equal(self.new_value(name), self.original[name]))

    def expected_changes(self, model: torch.nn.Module) -> dict[str, None]:
        return {name: ALL_ROWS for name in self.changed_parameters()}

    def save_to(self, folder: Path) -> list[Path]:
        """Forward-only: the new values (as ``ParameterDelta``). Not the factors: beside the
        edited model/ they give the original weights back (W = W_new - L R)."""
        return self.as_parameter_delta().save_to(folder)

    def as_parameter_delta(self) -> ParameterDelta:
        """The same edit with every new tensor materialized (to save or to compare)."""
        return ParameterDelta(original={n: self.original[n] for n in self.factors},
                              new={n: self.new_value(n) for n in self.factors}, metadata=dict(self.metadata))

    def summary(self) -> dict:
        moved = sum(float((self.new_value(n).double() - self.original[n].double()).norm() ** 2) for n in self.factors) ** 0.5
        return {
            "kind": "low_rank_delta", "parameters": len(self.factors),
            "rank": int(sum(left.shape[1] for left, _ in self.factors.values())), "delta_norm": moved,
        }

    def save(self, path: str | Path) -> None:
        self.as_parameter_delta().save(path)
