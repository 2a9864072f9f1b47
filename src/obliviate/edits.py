"""Edit objects: what a method's fit returns, and what can be applied, reverted, verified
and saved independently of the method that made it.

Every edit answers ``changed_token_ids``: the token ids whose input embeddings change
(an evaluation shortcut: questions that use none of them score exactly as before), or
None when the edit may change any output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .errors import ObliviateError
from .io import load_tensors, save_tensors
from .models import changed_rows, embeddings_are_tied, input_embedding_name, parameter_fingerprints


@runtime_checkable
class Edit(Protocol):
    def apply(self, model: torch.nn.Module) -> None: ...
    def revert(self, model: torch.nn.Module) -> None: ...
    def changed_token_ids(self) -> set[int] | None: ...
    def summary(self) -> dict: ...


class EditVerificationError(ObliviateError):
    pass


@dataclass
class EmbeddingPatch:
    """New values for some rows of the input embedding matrix (stored unscaled).

    The patch holds the original rows too, so revert restores the original bits exactly,
    and a saved patch is a few kilobytes instead of a model of gigabytes.
    """

    token_ids: torch.Tensor  # (m,) long
    original_rows: torch.Tensor  # (m, d)
    edited_rows: torch.Tensor  # (m, d)
    metadata: dict[str, str]

    def __post_init__(self) -> None:
        if self.original_rows.shape != self.edited_rows.shape or self.original_rows.shape[0] != len(self.token_ids):
            raise ValueError("token_ids, original_rows and edited_rows must describe the same rows")

    def changed_token_ids(self) -> set[int]:
        moved = (self.original_rows != self.edited_rows).any(dim=1)
        return set(self.token_ids[moved].tolist())

    def summary(self) -> dict:
        return {"kind": "embedding_patch", "rows": len(self.token_ids), "changed_rows": len(self.changed_token_ids())}

    def _write_rows(self, model: torch.nn.Module, rows: torch.Tensor) -> None:
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.token_ids.to(weight.device)] = rows.to(device=weight.device, dtype=weight.dtype)

    def apply(self, model: torch.nn.Module) -> None:
        self._check_matches(model)
        self._write_rows(model, self.edited_rows)

    def revert(self, model: torch.nn.Module) -> None:
        self._write_rows(model, self.original_rows)

    def _check_matches(self, model: torch.nn.Module) -> None:
        weight = model.get_input_embeddings().weight
        current = weight[self.token_ids.to(weight.device)].detach().to("cpu", self.original_rows.dtype)
        if current.shape[1] != self.original_rows.shape[1]:
            raise ObliviateError(
                f"This patch is for a model with hidden size {self.original_rows.shape[1]}, but the model has "
                f"{current.shape[1]}: apply it to the model it was made for ({self.metadata.get('model', '?')})."
            )
        if not (torch.equal(current, self.original_rows) or torch.equal(current, self.edited_rows)):
            raise ObliviateError(
                "The model's embedding rows match neither this patch's original nor its edited rows: the patch "
                f"was made for another model ({self.metadata.get('model', '?')})."
            )

    def save(self, path: str | Path) -> None:
        tensors = {"token_ids": self.token_ids, "original_rows": self.original_rows, "edited_rows": self.edited_rows}
        save_tensors(path, tensors, self.metadata)

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingPatch":
        tensors, metadata = load_tensors(path, "Patch")
        return cls(tensors["token_ids"], tensors["original_rows"], tensors["edited_rows"], metadata)


@dataclass
class CompositeEdit:
    """Edits applied in order and reverted in reverse order (EMBER under a base method)."""

    edits: list

    def apply(self, model: torch.nn.Module) -> None:
        for edit in self.edits:
            edit.apply(model)

    def revert(self, model: torch.nn.Module) -> None:
        for edit in reversed(self.edits):
            edit.revert(model)

    def changed_token_ids(self) -> set[int] | None:
        changed: set[int] = set()
        for edit in self.edits:
            ids = edit.changed_token_ids()
            if ids is None:
                return None
            changed |= ids
        return changed

    def summary(self) -> dict:
        return {"kind": "composite", "parts": [edit.summary() for edit in self.edits]}


def apply_verified(edit: EmbeddingPatch, model: torch.nn.Module) -> None:
    """Apply a patch and check that exactly its changed rows moved and nothing else did."""
    before = parameter_fingerprints(model)
    edit.apply(model)
    _expect_changes(model, before, parameter_fingerprints(model), edit.changed_token_ids())


def revert_verified(edit: EmbeddingPatch, model: torch.nn.Module) -> None:
    """Revert a patch and check that the original bits are back."""
    before = parameter_fingerprints(model)
    edit.revert(model)
    _expect_changes(model, before, parameter_fingerprints(model), edit.changed_token_ids())
    weight = model.get_input_embeddings().weight
    restored = weight[edit.token_ids.to(weight.device)].detach().to("cpu", edit.original_rows.dtype)
    if not torch.equal(restored, edit.original_rows):
        raise EditVerificationError("Reverting the patch did not restore the original embedding rows bit for bit.")


def _expect_changes(model: torch.nn.Module, before: dict, after: dict, token_ids: set[int]) -> None:
    expected = {input_embedding_name(model): sorted(token_ids)} if token_ids else {}
    actual = changed_rows(before, after)
    if actual != expected:
        tied = " (the output layer is tied to the input embedding)" if embeddings_are_tied(model) else ""
        unexpected = {name: rows[:5] for name, rows in actual.items() if name not in expected}
        raise EditVerificationError(
            f"Edit verification failed{tied}: expected only rows {sorted(token_ids)[:5]}... of "
            f"{input_embedding_name(model)} to change, got changes in {sorted(actual)}; unexpected: {unexpected}."
        )
