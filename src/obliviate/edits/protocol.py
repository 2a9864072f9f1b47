"""What every edit is, whatever made it: applied, reverted, verified and saved the same way.

An ``Edit`` (an embedding-row patch, a weight delta, a LoRA adapter, an inference hook)
says which parameters it changes (``expected_changes``), so ``apply_verified`` can check
that exactly those moved and nothing else did, and ``revert_verified`` that the original
bits came back. ``save_to(folder)`` writes it forward-only: the new values, never the
original ones (whoever holds an original could undo the erasure).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.models.loading import changed_rows, embeddings_are_tied, parameter_fingerprints

ALL_ROWS = None  # in ``expected_changes``: any row of that parameter may change


@runtime_checkable
class Edit(Protocol):
    # Beside a saved model/ the edit's file gives the original weights back (a LoRA adapter:
    # W = W_merged - s B A), so the output folder writes it only when model/ is not written.
    reveals_original_beside_model: bool

    def apply(self, model: torch.nn.Module) -> None: ...
    def revert(self, model: torch.nn.Module) -> None: ...
    def changed_token_ids(self) -> set[int] | None: ...  # input rows moved; None: any output may change
    def sets_output_rows(self) -> bool: ...  # it also sets its tokens' output-embedding rows
    # Per token sequence, whether the edit changes what the model computes on it; None when
    # it cannot tell (the Evaluator then runs every input that may change again).
    def affected(self, model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> np.ndarray | None: ...
    def expected_changes(self, model: torch.nn.Module) -> dict[str, list[int] | None]: ...
    def summary(self) -> dict: ...
    def save_to(self, folder: Path) -> list[Path]: ...


class EditDefaults:
    """What most edits answer to the Edit protocol's capability questions: no output rows
    set, no claim about which inputs they change, nothing revealed beside a saved model."""

    reveals_original_beside_model = False

    def sets_output_rows(self) -> bool:
        return False

    def affected(self, model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> np.ndarray | None:
        return None


class EditVerificationError(ObliviateError):
    pass


FORWARD_ONLY = (
    "This edit is forward-only: it was saved without the original values, so that whoever receives it cannot "
    "restore the erased concept, and it cannot revert. Reload the original model instead, or save a revertible "
    "patch (--revertible-patch PATH, kept outside the output folder)."
)


@dataclass(frozen=True)
class CompositeEdit(EditDefaults):
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

    def sets_output_rows(self) -> bool:
        return any(edit.sets_output_rows() for edit in self.edits)

    def expected_changes(self, model: torch.nn.Module) -> dict[str, list[int] | None]:
        merged: dict[str, list[int] | None] = {}
        for edit in self.edits:
            for name, rows in edit.expected_changes(model).items():
                known = merged.get(name, [])
                merged[name] = ALL_ROWS if rows is ALL_ROWS or known is ALL_ROWS else sorted(set(known) | set(rows))
        return merged

    def summary(self) -> dict:
        return {"kind": "composite", "parts": [edit.summary() for edit in self.edits]}

    def save_to(self, folder: Path) -> list[Path]:
        return [path for edit in self.edits for path in edit.save_to(folder)]

    def parts(self) -> list:
        return [part for edit in self.edits for part in (edit.parts() if isinstance(edit, CompositeEdit) else [edit])]


def parts_of(edit) -> list:
    """The simple edits inside ``edit`` (itself when it is not a composite; none for None)."""
    if edit is None:
        return []
    return edit.parts() if isinstance(edit, CompositeEdit) else [edit]


@contextmanager
def applied(edit: Edit | None, model: torch.nn.Module) -> Iterator[None]:
    """Hold an edit applied for a block (a base method trains on the EMBER-edited model; the
    evaluator reads an edited model), reverted after it whatever happens."""
    if edit is None:
        yield
        return
    edit.apply(model)
    try:
        yield
    finally:
        edit.revert(model)


def apply_verified(edit: Edit, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Apply ``edit`` and check that exactly the rows it names moved and nothing else did;
    returns the fingerprints from before, for ``revert_verified``."""
    before = parameter_fingerprints(model)
    edit.apply(model)
    _check(model, changed_rows(before, parameter_fingerprints(model)), edit.expected_changes(model), "applying")
    return before


def revert_verified(edit: Edit, model: torch.nn.Module, before: dict[str, torch.Tensor] | None = None) -> None:
    """Revert ``edit`` and check that the original bits are back: every parameter's
    fingerprint equals ``before`` (taken by ``apply_verified``), or, without it, that only
    the rows the edit names moved."""
    current = parameter_fingerprints(model)
    expected = edit.expected_changes(model)
    edit.revert(model)
    after = parameter_fingerprints(model)
    if before is not None:
        differs = changed_rows(before, after)
        if differs:
            raise EditVerificationError(f"Reverting the edit did not restore the original bits of {sorted(differs)[:5]}.")
        return
    _check(model, changed_rows(current, after), expected, "reverting")


def _check(model: torch.nn.Module, actual: dict[str, list[int]], expected: dict[str, list[int] | None], doing: str) -> None:
    unexpected = {name: rows[:5] for name, rows in actual.items() if name not in expected}
    wrong_rows = {name: rows[:5] for name, rows in actual.items()
                  if name in expected and expected[name] is not ALL_ROWS and rows != expected[name]}
    missing = [name for name, rows in expected.items() if rows and name not in actual]
    if unexpected or wrong_rows or missing:
        tied = " (the output layer is tied to the input embedding)" if embeddings_are_tied(model) else ""
        raise EditVerificationError(
            f"Edit verification failed while {doing}{tied}: expected changes in {sorted(expected)}; "
            f"unexpected changes {unexpected}, other rows than expected {wrong_rows}, unchanged {missing}."
        )
