"""EMBER: erase concept features from the token embeddings (METHOD.md section 1).

fit: token set V' -> A = (scale * E[V'])^T -> sparse factorization -> feature selection
-> per-token contributions c_i = F[:, S] G[i, S]^T for eligible concept-only tokens.
The fit does not depend on delta, so a grid over delta costs one factorization; each
delta gives an ``EmbeddingPatch`` with rows e_i - delta * c_i / scale (edited in the
space the model uses, written back unscaled).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Literal, get_args

import numpy as np
import torch

from obliviate.data.concepts import ConceptData
from obliviate.edits.embedding import EmbeddingPatch, model_identity
from obliviate.errors import ObliviateError
from obliviate.settings import setting
from obliviate.methods.factorization import Factorization, FactorizationConfig, factorize
from obliviate.methods.features import (CONCEPT, SELECTION_MODES, FeatureInfo, Selection, TokenSet, build_token_set,
                                       select_features)
from obliviate.methods import MethodContext
from obliviate.models.loading import LoadedModel, embedding_scale, embeddings_are_tied, load_model, untie_output_embeddings

FITS_BEFORE_PLUG_IN = False  # EMBER is the plug-in: it is fitted first whatever follows

TiedOutput = Literal["neutral", "shared"]
FactorizeOn = Literal["cpu", "model"]
DELTA_GRID = (0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 200.0)  # reference grid


@dataclass(frozen=True)
class Config:
    k: int = 100  # number of features K (paper: 100 for Gemma-2-2B, 200 for Llama-3.1-8B)
    sparsity: float = 0.01  # fraction of the tokens each feature keeps in G (winner-take-all; reference g_sparsity)
    max_iterations: int = setting(20000, "factorization iterations at most")
    patience: int = setting(500, "stop the factorization after this many iterations without improvement")
    reg: float = setting(1e-4, "ridge regularization of the factorization's updates")
    selection: Selection = "contrast"  # contrast | reference | judge (see features.py)
    ratio_threshold: float = 2.0  # reference threshold (see features.py for ``contrast``)
    usage_fraction: float = 0.25  # contrast/judge: usage >= this x the strongest candidate's
    judge_model: str | None = None  # selection "judge": a local model path/hub id, or "self"
    judge_confidence: float = 0.85  # reference judge cut-off
    max_tokens_per_feature: int = 200  # reference cap on each feature's token list
    delta_grid: tuple[float, ...] = setting(DELTA_GRID, "the deltas to try on TRAIN questions, smallest first")
    delta: float | None = None  # fixed delta: skip the grid
    # Tied input/output embeddings (Gemma). True is the reference: untie, edit only the input
    # rows; but then lm_head keeps every edited token's ORIGINAL row, and whoever holds the
    # weights copies it back (leaks: results.json warns). False (ours): ``tied_output`` says
    # what the edited tokens' output rows become, so that no original row survives:
    untie_embeddings: bool = setting(
        False, "tied models: edit only the input rows and keep the ORIGINAL output rows (the reference; leaks, warned)")
    # "neutral": untie, and give the edited tokens the MEAN output row (it carries nothing of
    #   the original; the model just stops favouring them). Measured on Gambling (train, 45
    #   general prompts): delta 10 keeps coherence 0.91, where "shared" drops to 0.11 at delta 5.
    # "shared": edit the tied matrix, so output rows get the same edit as the input rows
    #   (large deltas then make the edited tokens win in unrelated text).
    tied_output: TiedOutput = setting(
        "neutral", "tied models: the edited tokens' output rows become the mean row (neutral) or get the same edit (shared)")
    # Where the factorization runs: "cpu" (the reference's default) or "model" (the
    # device of the input embedding, e.g. a GPU; same seed, results equal up to float order).
    factorize_on: FactorizeOn = setting(
        "cpu", "where the factorization runs: cpu, or model (the input embedding's device, e.g. a GPU)")

    def __post_init__(self) -> None:
        if self.ratio_threshold <= 0 or not 0 <= self.usage_fraction <= 1:
            raise ObliviateError(f"ratio_threshold must be > 0 and usage_fraction in [0, 1], got {self.ratio_threshold}, {self.usage_fraction}.")
        if not self.delta_grid or any(d <= 0 for d in self.delta_grid):
            raise ObliviateError(f"delta_grid must be positive numbers, got {self.delta_grid}.")
        if self.delta is not None and self.delta < 0:
            raise ObliviateError(f"delta must be >= 0, got {self.delta}.")
        if self.max_tokens_per_feature < 1:
            raise ObliviateError("max_tokens_per_feature must be >= 1.")
        for name, allowed in (("selection", SELECTION_MODES), ("tied_output", get_args(TiedOutput)),
                              ("factorize_on", get_args(FactorizeOn))):
            if getattr(self, name) not in allowed:
                raise ObliviateError(f"ember {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")
        if self.selection == "judge" and not self.judge_model:
            raise ObliviateError("ember selection 'judge' needs a judge: --judge-model PATH_OR_ID (a local model) "
                                 "or 'self' (the model being erased).")

    def factorization(self, seed: int) -> FactorizationConfig:
        return FactorizationConfig(
            k=self.k, sparsity=self.sparsity, max_iterations=self.max_iterations,
            patience=self.patience, reg=self.reg, seed=seed,
        )


@dataclass
class EmberFit:
    token_set: TokenSet
    factorization: Factorization
    features: list[FeatureInfo]  # selected
    all_features: list[FeatureInfo]
    token_ids: torch.Tensor  # eligible tokens (m,)
    contributions: torch.Tensor  # (m, d) c_i in the model's scaled space
    scale: float
    original_rows: torch.Tensor  # (m, d) unscaled, as stored in the model
    config: Config = field(default_factory=lambda: Config())
    timings: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    tokenizer: object = None
    output_rows: str = "separate"  # the output-row policy applied (see output_rows_mode)
    embeddings_untied: bool = False
    neutral_row: torch.Tensor | None = None  # "neutral": every edited token's new output row
    original_output_rows: torch.Tensor | None = None  # "neutral": the rows it replaces (for revert)
    identity: dict[str, str] = field(default_factory=dict)  # the model it was fitted on (model_identity)

    def candidates(self) -> Iterator[tuple[dict, EmbeddingPatch]]:
        """The grid the pipeline evaluates, smallest delta first (the stop rule relies on it)."""
        deltas = (self.config.delta,) if self.config.delta is not None else tuple(sorted(self.config.delta_grid))
        for delta in deltas:
            yield {"delta": delta}, self.patch(delta)

    def report(self) -> dict:
        return {
            "output_rows": self.output_rows,
            "embeddings_untied": self.embeddings_untied,
            "timings": self.timings,
            "token_counts": self.token_set.counts(),
            "labels": "contrast (other concepts are negatives)" if self.config.selection != "reference" else "reference",
            "selection": self.config.selection,
            "ratio_threshold": self.config.ratio_threshold,
            "usage_fraction": self.config.usage_fraction if self.config.selection != "reference" else None,
            "features": [f.as_dict() for f in self.features],
            "edited_token_count": int(len(self.token_ids)),
            "edited_tokens": self.token_report(self.tokenizer) if self.tokenizer is not None else [],
            "factorization": {
                "k": self.config.k, "loss": self.factorization.loss,
                "relative_loss": self.factorization.relative_loss,
                "iterations": self.factorization.iterations,
                "best_iteration": self.factorization.best_iteration, "reg": self.factorization.reg,
                "polish": self.factorization.polish,
            },
        }

    def patch(self, delta: float) -> EmbeddingPatch:
        # e_i <- e_i - delta * c_i in the scaled space == rows - delta * c_i / scale unscaled.
        edited = (self.original_rows.double() - delta * self.contributions.double() / self.scale)
        output = None
        if self.neutral_row is not None:  # an untied output layer that carries nothing of the original rows
            output = self.neutral_row.to(self.original_rows.dtype).expand_as(self.original_rows).clone()
        return EmbeddingPatch(
            token_ids=self.token_ids.clone(),
            original_rows=self.original_rows.clone(),
            edited_rows=edited.to(self.original_rows.dtype),
            metadata={"method": "ember", "delta": str(delta), "model": self.model_name,
                      "embeddings_untied": str(self.embeddings_untied), **self.identity},
            output_rows=output,
            original_output_rows=None if output is None else self.original_output_rows.clone(),
        )

    def token_report(self, tokenizer, limit: int = 60) -> list[str]:
        """The tokens that will be edited, most-changed first."""
        order = torch.argsort(self.contributions.norm(dim=1), descending=True)[:limit]
        return [tokenizer.decode([int(self.token_ids[i])]) for i in order]


def embedding_matrix(lm: LoadedModel, token_ids: np.ndarray) -> torch.Tensor:
    """A = E[V']^T in the space the model uses (embedding rows times the module's scale)."""
    weight = lm.model.get_input_embeddings().weight.detach()
    rows = weight[torch.as_tensor(token_ids, device=weight.device)].float()
    return (rows * embedding_scale(lm.model)).T.contiguous()


def eligible_contributions(
    fit_F: torch.Tensor, fit_G: torch.Tensor, token_set: TokenSet, features: list[FeatureInfo], cap: int
) -> tuple[np.ndarray, torch.Tensor]:
    """Rows of V' to edit and their c_i: concept-only tokens (the paper's labels: not in the
    neutral sentences) with nonzero G on a selected feature, at most ``cap`` tokens per
    feature (largest |G| first)."""
    concept = torch.as_tensor(token_set.mask(CONCEPT, reference=True))
    weights = torch.zeros_like(fit_G)
    for feature in features:
        column = fit_G[:, feature.index]
        candidates = torch.nonzero((column != 0) & concept).flatten()
        keep = candidates[torch.argsort(column[candidates].abs(), descending=True)[:cap]]
        weights[keep, feature.index] = column[keep]
    rows = torch.nonzero(weights.abs().sum(dim=1) > 0).flatten()
    return rows.numpy(), weights[rows] @ fit_F.T


def output_rows_mode(lm: LoadedModel, config: Config) -> str:
    """What the edited tokens get as OUTPUT rows: "separate" (an untied model: untouched),
    "original" (the reference's untying: they keep the original rows, which leaks),
    "neutral" (the mean output row) or "shared" (the tied matrix gets the edit)."""
    if not (embeddings_are_tied(lm.model) or lm.untied_here):
        return "separate"
    return "original" if config.untie_embeddings else config.tied_output


def fit(lm: LoadedModel, data: ConceptData, config: Config, seed: int = 42,
        context: MethodContext = MethodContext()) -> EmberFit:
    """Factorize the concept's token embeddings and select its features; the model's output
    layer is untied first when the output-row policy asks for it (see ``Config``)."""
    output_rows = output_rows_mode(lm, config)
    untied = output_rows in ("original", "neutral")
    if untied and untie_output_embeddings(lm.model):
        lm.untied_here = True  # a later EMBER fit (another concept) keeps the same policy
    timings = {}
    start = time.perf_counter()
    token_set = build_token_set(lm.tokenizer, data.concept_sentences, data.neutral_sentences, data.contrast_sentences)
    A = embedding_matrix(lm, token_set.ids)
    timings["token_set"] = time.perf_counter() - start

    start = time.perf_counter()
    result = factorize(A.cpu() if config.factorize_on == "cpu" else A, config.factorization(seed))
    # Feature selection and the edit work on CPU tensors (token masks are NumPy/CPU).
    result.F, result.G = result.F.cpu(), result.G.cpu()
    timings["factorization"] = time.perf_counter() - start

    judge = context.judge
    if config.selection == "judge" and judge is None and config.judge_model:
        judge = lm if config.judge_model == "self" else load_model(config.judge_model, device=str(lm.device))
    selected, described = select_features(
        result.G, token_set, lm.tokenizer, config.selection, config.ratio_threshold, config.usage_fraction,
        judge=judge, concept=data.concept, judge_confidence=config.judge_confidence,
    )
    rows, contributions = eligible_contributions(result.F, result.G, token_set, selected, config.max_tokens_per_feature)
    token_ids = torch.as_tensor(token_set.ids[rows], dtype=torch.long)
    original = rows_of(lm.model.get_input_embeddings().weight, token_ids)
    neutral = output_rows == "neutral"
    return EmberFit(
        token_set=token_set, factorization=result, features=selected, all_features=described,
        token_ids=token_ids, contributions=contributions.to(torch.float64), scale=embedding_scale(lm.model),
        original_rows=original, config=config, timings=timings, model_name=lm.name, tokenizer=lm.tokenizer,
        output_rows=output_rows, embeddings_untied=untied,
        neutral_row=mean_output_row(lm.model) if neutral else None,
        original_output_rows=rows_of(lm.model.get_output_embeddings().weight, token_ids) if neutral else None,
        identity=model_identity(lm.model),
    )


def rows_of(weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return weight[token_ids.to(weight.device)].detach().cpu().clone()


def mean_output_row(model: torch.nn.Module) -> torch.Tensor:
    return model.get_output_embeddings().weight.detach().float().mean(dim=0).cpu()
