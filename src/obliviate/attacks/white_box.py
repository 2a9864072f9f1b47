"""White-box attacks: the adversary holds the erased model's weights, not the concept.

- ``tied-restore``: a matrix of the checkpoint with the input embedding's shape whose rows
  mostly equal the input rows (an output layer untied only to edit the input side) holds
  the original rows where they differ: copy those back.
- ``embedding-repair``: rows moved far by an edit stand outside the embedding
  distribution. Flag input rows whose norm (large side) or direction (cosine to the mean
  row, either side) is a robust outlier (median/MAD z beyond 6) and rebuild them from the rest of the model: the
  mean row, and where an untied output embedding exists, a least-squares map from output
  to input rows fitted on the unflagged rows.
- ``repair-relearn``: the relearning attack on top of the repair.
- ``weights-only``: the erased model run without its inference-time hooks (ECO's
  classifier): what whoever holds the checkpoint runs. An erasure that lives only in a
  hook is gone; one in the weights is untouched (the erased model's own answers).

Each runs on the original and the erased model side by side; the caller's models are
restored bit for bit afterwards. When the erase run's patch is known (``attack`` on an
erase folder), the repair reports how many flagged rows were really edited.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.attacks.common import (AttackContext, accuracy_interval, attack_text, cached_for_original, correct_on,
                                      each_role)
from obliviate.attacks.relearning import Config as RelearnConfig
from obliviate.attacks.relearning import relearn, tokenized
from obliviate.methods import eco

MAD_TO_SD = 1.4826  # median absolute deviation -> standard deviation for normal data
SAME_ROW_COSINE = 0.999  # a mirrored row (bf16-rounded copies included)
RECONSTRUCTIONS = ("mean", "lstsq")


# ---- tied-restore -------------------------------------------------------------------

@dataclass(frozen=True)
class TiedRestoreConfig:
    min_same_fraction: float = 0.5  # a matrix "maps back" when at least this share of its rows are the input rows

    def __post_init__(self) -> None:
        if not 0 < self.min_same_fraction <= 1:
            raise ObliviateError(f"tied-restore min_same_fraction must be in (0, 1], got {self.min_same_fraction}.")


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.detach().float(), b.detach().to(a.device).float()
    cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return torch.all(a == b, dim=1) | (cosine > SAME_ROW_COSINE)


def mirror_rows(model: torch.nn.Module, min_same_fraction: float = 0.5) -> dict | None:
    """The matrix that mirrors the input embedding and the rows where it differs:
    {tensor, same_fraction, token_ids, rows}; None when no matrix maps back."""
    weight = model.get_input_embeddings().weight
    best = None
    for name, param in model.named_parameters():
        if param is weight or param.shape != weight.shape:
            continue
        same = _same_rows(weight, param)
        if best is None or same.float().mean() > best[1].float().mean():
            best = (name, same, param)
    if best is None or best[1].float().mean() < min_same_fraction:
        return None
    name, same, param = best
    ids = torch.nonzero(~same).flatten().cpu()
    return {"tensor": name, "same_fraction": float(same.float().mean()), "token_ids": ids,
            "rows": param.detach()[ids.to(param.device)].cpu().clone()}


def run_tied_restore(ctx: AttackContext, config: TiedRestoreConfig) -> dict:
    def measure(role, lm, prepared, before):
        mirror = mirror_rows(lm.model, config.min_same_fraction)
        after = before
        if mirror is not None and len(mirror["token_ids"]):
            with rows_replaced(lm.model, mirror["token_ids"], mirror["rows"]):
                after = correct_on(lm, prepared, ctx.batching)
        return after, {
            "mirror_tensor": mirror["tensor"] if mirror else None,
            "mirror_same_fraction": mirror["same_fraction"] if mirror else None,
            "rows_restored": len(mirror["token_ids"]) if mirror else 0,
            **_against_edits(ctx, role, mirror["token_ids"] if mirror else torch.empty(0, dtype=torch.long)),
        }

    return each_role(ctx, {"settings": asdict(config)}, measure)


# ---- embedding-repair ---------------------------------------------------------------

@dataclass(frozen=True)
class RepairConfig:
    z_threshold: float = 6.0  # robust z of a row's norm or direction beyond which it is flagged
    reconstructions: tuple[str, ...] = RECONSTRUCTIONS  # lstsq only where an untied output embedding exists
    ridge: float = 1e-4  # of the least-squares map, relative to the mean squared output entry

    def __post_init__(self) -> None:
        if self.z_threshold <= 0 or self.ridge < 0:
            raise ObliviateError(f"embedding-repair z_threshold must be > 0 and ridge >= 0, got {self.z_threshold}, {self.ridge}.")
        unknown = [r for r in self.reconstructions if r not in RECONSTRUCTIONS]
        if unknown or not self.reconstructions:
            raise ObliviateError(f"Unknown reconstruction(s) {unknown}. Valid: {', '.join(RECONSTRUCTIONS)}.")


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD): a z-score that a few outliers cannot inflate."""
    median = values.median()
    mad = (values - median).abs().median()
    return (values - median) / (MAD_TO_SD * mad).clamp_min(1e-12)


def flag_outliers(weight: torch.Tensor, z_threshold: float) -> dict[str, torch.Tensor]:
    """Boolean masks over rows: norm outliers, direction outliers (cosine to the mean row), either."""
    rows = weight.detach().float().cpu()
    norms = rows.norm(dim=1)
    mean = rows.mean(dim=0)
    cosine = rows @ mean / (norms * mean.norm()).clamp_min(1e-12)
    by_norm = robust_z(norms) > z_threshold  # large edits grow rows; small norms are padding and unused tokens
    by_direction = robust_z(cosine).abs() > z_threshold
    return {"norm": by_norm, "direction": by_direction, "any": by_norm | by_direction}


def separate_output(model: torch.nn.Module) -> torch.Tensor | None:
    """The output embedding when it is its own matrix with a row per token (untied)."""
    output, weight = model.get_output_embeddings(), model.get_input_embeddings().weight
    if output is None or output.weight is weight or output.weight.shape[0] != weight.shape[0]:
        return None
    return output.weight.detach()


def reconstruct(model: torch.nn.Module, flagged: torch.Tensor, how: str, ridge: float = 1e-4) -> torch.Tensor | None:
    """New rows for the flagged tokens from the unflagged ones (None: not possible here)."""
    weight = model.get_input_embeddings().weight.detach().float().cpu()
    keep = ~flagged
    if how == "mean":
        return weight[keep].mean(dim=0, keepdim=True).expand(int(flagged.sum()), -1).clone()
    output = separate_output(model)
    if output is None:
        return None
    source = output.double().cpu()
    X, Y = source[keep], weight[keep].double()
    gram = X.T @ X
    gram += ridge * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    mapping = torch.linalg.solve(gram, X.T @ Y)  # min ||X W - Y||^2 + ridge, on untouched rows
    return (source[flagged] @ mapping).float()


def repaired_variants(model: torch.nn.Module, config: RepairConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(flags, {reconstruction: new rows of the flagged tokens})."""
    flags = flag_outliers(model.get_input_embeddings().weight, config.z_threshold)
    variants = {}
    if flags["any"].any():
        for how in config.reconstructions:
            rows = reconstruct(model, flags["any"], how, config.ridge)
            if rows is not None:
                variants[how] = rows
    return flags, variants


def run_embedding_repair(ctx: AttackContext, config: RepairConfig) -> dict:
    """The attacker keeps the reconstruction that brings back the most (reported per variant)."""
    def measure(role, lm, prepared, before):
        flags, variants = repaired_variants(lm.model, config)
        ids = torch.nonzero(flags["any"]).flatten()
        per_variant = {}
        for how, rows in variants.items():
            with rows_replaced(lm.model, ids, rows):
                per_variant[how] = correct_on(lm, prepared, ctx.batching)
        best = max(per_variant, key=lambda h: per_variant[h].mean(), default=None)
        return (per_variant[best] if best else before), {
            "best_reconstruction": best,
            "per_reconstruction": {h: accuracy_interval(c, ctx.bootstrap, ctx.seed) for h, c in per_variant.items()},
            "flagged": int(flags["any"].sum()), "flagged_by_norm": int(flags["norm"].sum()),
            "flagged_by_direction": int(flags["direction"].sum()),
            **_against_edits(ctx, role, ids),
        }

    return each_role(ctx, {"settings": asdict(config)}, measure)


# ---- repair-relearn -----------------------------------------------------------------

@dataclass(frozen=True)
class RepairRelearnConfig:
    z_threshold: float = 6.0
    reconstruction: str = "lstsq"  # falls back to mean where the model has no untied output embedding
    ridge: float = 1e-4
    # Relearning on the repaired model: the reference protocol (relearning.py); raise lr and
    # epochs for the strong preset (--set repair-relearn.lr=1e-4 --set repair-relearn.epochs=3).
    paragraphs: int = 100
    epochs: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.01
    batch_size: int = 1
    max_length: int = 256
    gradient_checkpointing: str = "auto"  # auto | on | off (relearning.py)
    optimizer: str = "auto"  # training/optim.py: the plain AdamW on float32 weights
    bf16_autocast: bool = False  # relearning.py

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ObliviateError(f"repair-relearn reconstruction must be one of {', '.join(RECONSTRUCTIONS)}.")
        RepairConfig(self.z_threshold, (self.reconstruction,), self.ridge)
        self.relearn()  # validates the relearning settings

    def relearn(self) -> RelearnConfig:
        names = {f.name for f in fields(RelearnConfig)}
        return RelearnConfig(**{k: v for k, v in asdict(self).items() if k in names})


def run_repair_relearn(ctx: AttackContext, config: RepairRelearnConfig) -> dict:

    paragraphs, source = attack_text(ctx, "concept", config.paragraphs)
    repair = RepairConfig(config.z_threshold, tuple(dict.fromkeys((config.reconstruction, "mean"))), config.ridge)

    def repair_and_relearn(role, lm, prepared) -> dict:
        flags, variants = repaired_variants(lm.model, repair)
        how = next(iter(variants), None)  # the asked reconstruction when possible, else the mean
        ids = torch.nonzero(flags["any"]).flatten()
        rows = variants[how] if how else lm.model.get_input_embeddings().weight.detach()[ids].cpu()
        with rows_replaced(lm.model, ids, rows):
            repaired = correct_on(lm, prepared, ctx.batching)
            epochs = relearn(lm, paragraphs, config.relearn(), lambda m: correct_on(m, prepared, ctx.batching),
                             ctx.seed, ctx.checkpoint_dir("repair-relearn", role), ctx.progress, role)
        return {"repaired": repaired.tolist(), "epochs": epochs, "reconstruction": how, "flagged": len(ids)}

    def measure(role, lm, prepared, before):
        if role == "original":  # the same for every erasure of the concept: from the results cache
            settings = {"paragraphs": tokenized(lm, paragraphs, config.max_length), "config": asdict(config)}
            found = cached_for_original(ctx, lm, prepared, "repair_relearn_curve", settings,
                                        lambda: repair_and_relearn(role, lm, prepared))
        else:
            found = repair_and_relearn(role, lm, prepared)
        repaired = np.asarray(found["repaired"], dtype=float)
        curve = [before, repaired] + [np.asarray(e["correct"]) for e in found["epochs"]]
        return curve[-1], {
            "repaired": accuracy_interval(repaired, ctx.bootstrap, ctx.seed),
            "curve": [accuracy_interval(c, ctx.bootstrap, ctx.seed) for c in curve],  # before, repaired, epochs
            "curve_correct": [np.asarray(c).astype(int).tolist() for c in curve],  # per question, for pooled statistics
            "losses": [e["loss"] for e in found["epochs"]],
            "reconstruction": found["reconstruction"], "flagged": found["flagged"],
        }

    return each_role(ctx, {"settings": {**asdict(config), "paragraphs_used": len(paragraphs), "text_source": source}},
                     measure)


# ---- weights-only --------------------------------------------------------------------

@dataclass(frozen=True)
class WeightsOnlyConfig:
    """No settings: the hooks are removed, nothing else changes."""


@contextmanager
def hooks_removed(model: torch.nn.Module) -> Iterator[bool]:
    """The model without its ECO hook for a block (True when there was one to remove); the
    same hook is installed again afterwards."""
    hook = eco.hook_of(model)
    if hook is None:
        yield False
        return
    hook.remove()
    try:
        yield True
    finally:
        hook.install(model)


def run_weights_only(ctx: AttackContext, config: WeightsOnlyConfig) -> dict:
    def measure(role, lm, prepared, before):
        with hooks_removed(lm.model) as removed:
            after = correct_on(lm, prepared, ctx.batching) if removed else before
        return after, {"hooks_removed": removed}

    return each_role(ctx, {"settings": asdict(config)}, measure)


# ---- shared -------------------------------------------------------------------------

@contextmanager
def rows_replaced(model: torch.nn.Module, token_ids: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
    """Hold new input-embedding rows for a block; the old bits come back afterwards."""
    weight = model.get_input_embeddings().weight
    index = token_ids.to(weight.device)
    saved = weight.detach()[index].clone()
    with torch.no_grad():
        weight[index] = rows.to(device=weight.device, dtype=weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            weight[index] = saved


def _against_edits(ctx: AttackContext, role: str, ids: torch.Tensor) -> dict:
    """Precision and recall of the rows an attack touched against the rows the erase
    edited (only for the erased model, and only when the erase run's patch is known)."""
    edited = ctx.options.get("edited_token_ids")
    if role != "erased" or edited is None:
        return {}
    touched, edited = set(ids.tolist()), set(edited)
    hits = len(touched & edited)
    return {"edited_rows": len(edited), "touched_and_edited": hits,
            "precision": hits / len(touched) if touched else None, "recall": hits / len(edited) if edited else None}


ATTACKS = {  # what attacks.get hands out for each name registered to this module
    "tied-restore": SimpleNamespace(Config=TiedRestoreConfig, run=run_tied_restore),
    "embedding-repair": SimpleNamespace(Config=RepairConfig, run=run_embedding_repair),
    "repair-relearn": SimpleNamespace(Config=RepairRelearnConfig, run=run_repair_relearn),
    "weights-only": SimpleNamespace(Config=WeightsOnlyConfig, run=run_weights_only),
}
