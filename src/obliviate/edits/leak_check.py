"""Do the files an erase run writes still hold the ORIGINAL embedding rows it erased?

The threat is an adversary who holds the saved weights: any stored copy of an edited
token's original row (an untied output layer, a stale tensor, a revertible patch) lets
them copy it back and undo the erasure. For every edited token, every row of every 2-D
tensor of the same width in the saved safetensors files is compared with the token's
original row; a row that equals it or nearly does (cosine > 0.99) is a leak. A row that
is bit for bit the token's NEW row is the edit itself, not a copy: how far the edit moved
it is the efficacy's business.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

LEAK_COSINE = 0.99  # "nearly equals": a rescaled or re-rounded copy still restores the row
CHUNK_ROWS = 65536  # rows compared at a time: bounded memory on a 262k-token vocabulary
MAX_LISTED = 100  # leaks listed in results.json (all are counted)

UNTIED_WARNING = (
    "Embeddings were untied (--untie-embeddings, the reference behaviour): the saved output layer (lm_head in "
    "most models) keeps the ORIGINAL row of every edited token, so whoever holds model/ can copy it into the "
    "input embedding and restore the original model. Do not share these weights with anyone the concept must "
    "be kept from; the default (tied) output edits both and keeps no original row."
)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.float()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def find_leaks(token_ids: torch.Tensor, original: torch.Tensor, edited: torch.Tensor,
               tensors: Iterable[tuple[str, torch.Tensor]], threshold: float = LEAK_COSINE) -> dict:
    """{passed, tensors_checked, leak_count, leaks: [{tensor, token_id, row, cosine}]} for
    2-D tensors whose row width is the embedding width."""
    width = original.shape[1]
    targets, new_rows = _unit(original), edited.float()
    leaks, checked = [], 0
    for name, tensor in tensors:
        if tensor.dim() != 2 or tensor.shape[1] != width or not tensor.is_floating_point():
            continue
        checked += 1
        for start in range(0, tensor.shape[0], CHUNK_ROWS):
            rows = tensor[start:start + CHUNK_ROWS].float()
            hits = torch.nonzero(_unit(rows) @ targets.T > threshold)
            for row, j in hits.tolist():
                if torch.equal(rows[row], new_rows[j]):
                    continue  # the edited row itself
                cosine = float(_unit(rows[row:row + 1]) @ targets[j])
                leaks.append({"tensor": name, "token_id": int(token_ids[j]), "row": start + row, "cosine": cosine})
    return {"passed": not leaks, "tensors_checked": checked, "leak_count": len(leaks), "leaks": leaks[:MAX_LISTED]}


def safetensors_in(paths: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(file:tensor, tensor) for every tensor of the given files, one tensor in memory at a time."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                yield f"{path.parent.name}/{path.name}:{key}", handle.get_tensor(key)


def check_outputs(out: Path, patches: list, patch_is_revertible: bool = False) -> dict:
    """The leak check of an erase folder: model/*.safetensors, and the patch unless it is
    meant to revert (then it holds the original rows by design)."""
    files = sorted((out / "model").glob("*.safetensors"))
    patch_file = out / "embedding_patch.safetensors"
    if patch_file.is_file() and not patch_is_revertible:
        files.append(patch_file)
    report = {"passed": True, "tensors_checked": 0, "leak_count": 0, "leaks": []}
    for patch in patches:
        changed = patch.changed_token_ids()
        moved = torch.tensor([i in changed for i in patch.token_ids.tolist()], dtype=torch.bool)
        if not moved.any():
            continue
        found = find_leaks(patch.token_ids[moved], patch.original_rows[moved], patch.edited_rows[moved],
                           safetensors_in(files))
        report = {"passed": report["passed"] and found["passed"],
                  "tensors_checked": report["tensors_checked"] + found["tensors_checked"],
                  "leak_count": report["leak_count"] + found["leak_count"],
                  "leaks": (report["leaks"] + found["leaks"])[:MAX_LISTED]}
    report["files"] = [str(f.relative_to(out)) for f in files]
    return report
