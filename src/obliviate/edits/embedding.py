"""Edit objects: what a method's fit returns, and what can be applied, reverted, verified
and saved independently of the method that made it.

Every edit answers ``changed_token_ids``: the token ids whose input embeddings change
(an evaluation shortcut: questions that use none of them score exactly as before), or
None when the edit may change any output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from obliviate.errors import ObliviateError
from obliviate.edits.protocol import FORWARD_ONLY, EditDefaults, EditVerificationError, apply_verified
from obliviate.io import load_tensors, save_tensors, tensor_sha256
from obliviate.models.loading import input_embedding_name, output_embedding_name, untie_output_embeddings


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """What a patch records about the model it was made for (string safetensors metadata)."""
    vocab, hidden = model.get_input_embeddings().weight.shape
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return {"vocab_size": str(vocab), "hidden_size": str(hidden), "model_path": name}

PATCH_FILE = "embedding_patch.safetensors"  # the forward-only patch in an output folder


@dataclass(frozen=True)
class EmbeddingPatch(EditDefaults):
    """New values for some rows of the input embedding matrix (stored unscaled); immutable:
    applying it changes the model, never the patch.

    In memory the patch holds the original rows too (revert restores the original bits).
    A saved patch is forward-only by default: token ids, the NEW rows and a sha256 of the
    original rows (to check the model it is applied to); the original rows are written only
    with ``save(path, revertible=True)``, because whoever holds them can undo the erasure.
    ``output_rows`` (optional) are new values for the same tokens' rows of a separate output
    matrix: an untied model's edited tokens get rows that carry nothing of the original;
    a patch that holds the original input rows holds the original output rows as well.
    """

    token_ids: torch.Tensor  # (m,) long
    original_rows: torch.Tensor | None  # (m, d); None for a forward-only patch read from a file
    edited_rows: torch.Tensor  # (m, d)
    metadata: dict[str, str]
    output_rows: torch.Tensor | None = None  # (m, d) new output-matrix rows, or None: untouched
    original_output_rows: torch.Tensor | None = None  # in memory (revert), or in a revertible file

    def __post_init__(self) -> None:
        rows = self.edited_rows
        if rows.dim() != 2 or rows.shape[0] != len(self.token_ids) or (
                self.original_rows is not None and self.original_rows.shape != rows.shape):
            raise ValueError("token_ids, original_rows and edited_rows must describe the same rows")
        for name in ("output_rows", "original_output_rows"):
            if getattr(self, name) is not None and getattr(self, name).shape != rows.shape:
                raise ValueError(f"{name} must have the shape of edited_rows")
        if self.output_rows is not None and (self.original_rows is None) != (self.original_output_rows is None):
            raise ValueError("a patch that sets output rows holds the original output rows exactly when it holds "
                             "the original input rows (both or neither: revert needs both)")

    @property
    def revertible(self) -> bool:
        return self.original_rows is not None

    def _moved(self) -> torch.Tensor:
        if self.original_rows is None:  # a saved patch keeps only the rows that change
            return torch.ones(len(self.token_ids), dtype=torch.bool)
        return (self.original_rows != self.edited_rows).any(dim=1)

    def sets_output_rows(self) -> bool:
        return self.output_rows is not None

    def changed_token_ids(self) -> set[int]:
        return set(self.token_ids[self._moved()].tolist())

    def original_sha256(self) -> str:
        """The hash of the original rows of the tokens that change."""
        if self.original_rows is None:
            return self.metadata["original_sha256"]
        return tensor_sha256(self.original_rows[self._moved()])

    def expected_changes(self, model: torch.nn.Module) -> dict[str, list[int] | None]:
        """The edited tokens' rows of the input embedding (and of the output layer when the
        patch sets output rows); a tied matrix is one parameter."""
        rows = sorted(self.changed_token_ids())
        if not rows:
            return {}
        expected = {input_embedding_name(model): rows}
        if self.output_rows is not None:
            expected[output_embedding_name(model)] = rows
        return expected

    def restricted_to(self, token_ids: set[int]) -> "EmbeddingPatch":
        """The same patch on ``token_ids`` only (the other rows untouched)."""
        keep = torch.tensor([t in token_ids for t in self.token_ids.tolist()], dtype=torch.bool)
        pick = lambda rows: None if rows is None else rows[keep].clone()  # noqa: E731
        return EmbeddingPatch(self.token_ids[keep].clone(), pick(self.original_rows), pick(self.edited_rows),
                              dict(self.metadata), pick(self.output_rows), pick(self.original_output_rows))

    def save_to(self, folder: Path) -> list[Path]:
        path = Path(folder) / PATCH_FILE
        self.save(path)
        return [path]

    def summary(self) -> dict:
        return {"kind": "embedding_patch", "rows": len(self.token_ids), "changed_rows": len(self.changed_token_ids())}

    def _write_rows(self, model: torch.nn.Module, rows: torch.Tensor, output: torch.Tensor | None = None) -> None:
        weights = [(model.get_input_embeddings().weight, rows)]
        if output is not None:
            head = model.get_output_embeddings().weight
            if head is weights[0][0]:
                raise ObliviateError("This patch sets output rows, but the model's output layer is tied to its input "
                                     "embedding: untie it first (obliviate.models.loading.untie_output_embeddings).")
            weights.append((head, output))
        with torch.no_grad():
            for weight, values in weights:
                weight[self.token_ids.to(weight.device)] = values.to(device=weight.device, dtype=weight.dtype)

    def _current_output_rows(self, model: torch.nn.Module) -> torch.Tensor:
        weight = model.get_output_embeddings().weight
        return weight[self.token_ids.to(weight.device)].detach().to("cpu", self.edited_rows.dtype)

    def _current_rows(self, model: torch.nn.Module) -> torch.Tensor:
        weight = model.get_input_embeddings().weight
        return weight[self.token_ids.to(weight.device)].detach().to("cpu", self.edited_rows.dtype)

    def apply(self, model: torch.nn.Module) -> None:
        self._check_matches(model)
        self._write_rows(model, self.edited_rows, self.output_rows)
        if not torch.equal(self._current_rows(model), self.edited_rows) or (
                self.output_rows is not None and not torch.equal(self._current_output_rows(model), self.output_rows)):
            raise EditVerificationError("After applying the patch the embedding rows differ from the patch's rows.")

    def bound_to(self, model: torch.nn.Module) -> "EmbeddingPatch":
        """This patch with the original rows read from ``model`` (which must be the original:
        checked against the stored sha256), so it can be applied and reverted in memory, e.g.
        by an evaluation; the file itself still carries no original row."""
        self._check_identity(model)
        current = self._current_rows(model)
        if self.original_rows is None and tensor_sha256(current) != self.metadata.get("original_sha256"):
            raise ObliviateError(f"The model's embedding rows are not this patch's original: it was made for "
                                 f"{self._made_for()}, not {_describe(model)} (or the model is already edited).")
        original = current if self.original_rows is None else self.original_rows
        original_output = None if self.output_rows is None else self._current_output_rows(model)
        return EmbeddingPatch(self.token_ids, original, self.edited_rows, dict(self.metadata), self.output_rows,
                              original_output)

    def revert(self, model: torch.nn.Module) -> None:
        if self.original_rows is None:
            raise ObliviateError(FORWARD_ONLY)
        self._write_rows(model, self.original_rows, self.original_output_rows)

    def _check_matches(self, model: torch.nn.Module) -> None:
        self._check_identity(model)
        current = self._current_rows(model)
        if torch.equal(current, self.edited_rows):
            return  # applied already
        if self.original_rows is not None:
            matches = torch.equal(current, self.original_rows)
        else:
            matches = tensor_sha256(current) == self.metadata.get("original_sha256")
        if not matches:
            raise ObliviateError(
                "The model's embedding rows match neither this patch's original (by its sha256) nor its edited "
                f"rows: the patch was made for another model ({self._made_for()}), not {_describe(model)}."
            )

    def _check_identity(self, model: torch.nn.Module) -> None:
        """Refuse, before touching any row, a patch whose vocabulary, width or ids do not fit."""
        vocab, hidden = model.get_input_embeddings().weight.shape
        want_vocab, want_hidden = self.metadata.get("vocab_size"), self.metadata.get("hidden_size")
        if (want_vocab and int(want_vocab) != vocab) or (want_hidden and int(want_hidden) != hidden) \
                or self.edited_rows.shape[1] != hidden:
            raise ObliviateError(
                f"This patch was made for another model ({self._made_for()}); it cannot be applied to "
                f"{_describe(model)}."
            )
        ids = self.token_ids
        if ids.dim() != 1 or ids.dtype != torch.long or (len(ids) and (ids.min() < 0 or ids.max() >= vocab)):
            raise ObliviateError(f"The patch's token ids are not valid ids of a {vocab}-token vocabulary.")
        if not self.edited_rows.is_floating_point():
            raise ObliviateError(f"The patch's rows are {self.edited_rows.dtype}, not floating point.")

    def _made_for(self) -> str:
        m = self.metadata
        shape = f"vocabulary {m.get('vocab_size', '?')}, hidden size {m.get('hidden_size', self.edited_rows.shape[1])}"
        return f"{m.get('model', '?')}, {shape}"

    def save(self, path: str | Path, revertible: bool = False) -> None:
        """Forward-only unless ``revertible`` (then the original rows are in the file too)."""
        moved = self._moved()
        tensors = {"token_ids": self.token_ids[moved], "edited_rows": self.edited_rows[moved]}
        if self.output_rows is not None:
            tensors["output_rows"] = self.output_rows[moved]
        if revertible:
            if self.original_rows is None:
                raise ObliviateError(FORWARD_ONLY)
            tensors["original_rows"] = self.original_rows[moved]
            if self.original_output_rows is not None:
                tensors["original_output_rows"] = self.original_output_rows[moved]
        metadata = {**self.metadata, "original_sha256": self.original_sha256(), "revertible": str(revertible)}
        save_tensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingPatch":
        tensors, metadata = load_tensors(path, "Patch")
        if "original_rows" not in tensors and "original_sha256" not in metadata:
            raise ObliviateError(f"Patch file {path} has neither original rows nor their sha256: it is not a patch.")
        return cls(tensors["token_ids"], tensors.get("original_rows"), tensors["edited_rows"], metadata,
                   tensors.get("output_rows"), tensors.get("original_output_rows"))


def _describe(model: torch.nn.Module) -> str:
    identity = model_identity(model)
    return f"{identity['model_path'] or 'this model'}, vocabulary {identity['vocab_size']}, hidden size {identity['hidden_size']}"


def check_revertible_path(path: str | Path, out: str | Path | None) -> Path:
    """A revertible patch undoes the erasure: refuse to write it inside the output folder,
    which is what gets shared (model/ and everything next to it)."""
    target = Path(path).resolve()
    if out is not None:
        folder = Path(out).resolve()
        if target == folder or folder in target.parents:
            raise ObliviateError(
                f"--revertible-patch {path} is inside the output folder {out}: that file restores the original "
                "model, so keep it somewhere that is not shared with model/ (outside --out)."
            )
    return target


def apply_patch_file(model: torch.nn.Module, path: str | Path) -> EmbeddingPatch:
    """Apply a saved patch to ``model``, verified (a patch for another model, by shape or by
    the sha256 of its original rows, is refused); the output layer is untied first when the
    run that made it untied it."""
    patch = EmbeddingPatch.load(path)
    if patch.metadata.get("embeddings_untied") == "True":
        untie_output_embeddings(model)
    apply_verified(patch, model)
    return patch


@torch.no_grad()
def patch_between(original: torch.nn.Module, edited: torch.nn.Module) -> EmbeddingPatch | None:
    """The patch that turns ``original`` into ``edited`` when they differ only in some rows of
    the input embedding (and, where ``edited`` has its own output layer, in the same tokens'
    output rows); None when anything else differs. Its metadata says "embeddings_untied"
    when ``original`` is tied and ``edited`` is not: the original must be untied first."""
    def matrices(model):
        return model.get_input_embeddings().weight, model.get_output_embeddings().weight

    def others(model):
        skip = {id(w) for w in matrices(model)}
        return {n: p for n, p in model.named_parameters() if id(p) not in skip}

    (o_in, o_out), (e_in, e_out) = matrices(original), matrices(edited)
    o_rest, e_rest = others(original), others(edited)
    if o_in.shape != e_in.shape or o_out.shape != e_out.shape or o_rest.keys() != e_rest.keys() or any(
            o_rest[n].shape != e_rest[n].shape or not torch.equal(o_rest[n], e_rest[n].to(o_rest[n].device))
            for n in o_rest):
        return None
    original_tied, edited_tied = o_out is o_in, e_out is e_in
    if edited_tied and not original_tied:
        return None
    rows = torch.nonzero((o_in != e_in.to(o_in.device)).any(dim=1)).flatten()
    sets_output = False
    if not edited_tied:  # its own output layer: rows may move only where the input rows did
        moved = set(torch.nonzero((o_out != e_out.to(o_out.device)).any(dim=1)).flatten().tolist())
        if not moved <= set(rows.tolist()):
            return None
        sets_output = bool(moved)
    pick = lambda weight: weight[rows.to(weight.device)].detach().to("cpu").clone()  # noqa: E731
    untie = original_tied and not edited_tied
    return EmbeddingPatch(rows.cpu(), pick(o_in), pick(e_in), {**model_identity(original), "embeddings_untied": str(untie)},
                          pick(e_out) if sets_output else None, pick(o_out) if sets_output else None)


def merge_patches(patches: list[EmbeddingPatch]) -> EmbeddingPatch:
    """One patch equal to applying ``patches`` in order (each made on the model the previous
    ones had edited): a token's original row is from the first patch that edits it, its new
    rows from the last. Rows edited by several patches are listed in metadata["shared_token_ids"]."""
    first_seen: dict[int, tuple[EmbeddingPatch, int]] = {}
    last_seen: dict[int, tuple[EmbeddingPatch, int]] = {}
    counts: dict[int, int] = {}
    for patch in patches:
        for row, token in enumerate(patch.token_ids.tolist()):
            first_seen.setdefault(token, (patch, row))
            last_seen[token] = (patch, row)
            counts[token] = counts.get(token, 0) + 1
    tokens = sorted(first_seen)

    def rows(source: dict, attribute: str) -> torch.Tensor | None:
        picked = [getattr(source[t][0], attribute) for t in tokens]
        if any(p is None for p in picked):
            return None
        return torch.stack([picked[i][source[t][1]] for i, t in enumerate(tokens)])

    shared = [t for t in tokens if counts[t] > 1]
    metadata = {**patches[-1].metadata, "merged_patches": str(len(patches)),
                "shared_token_ids": ",".join(map(str, shared))}
    return EmbeddingPatch(torch.tensor(tokens, dtype=torch.long), rows(first_seen, "original_rows"),
                          rows(last_seen, "edited_rows"), metadata, rows(last_seen, "output_rows"),
                          rows(first_seen, "original_output_rows"))
