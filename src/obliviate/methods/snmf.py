"""SNMF: erase a concept along semi-nonnegative factors of MLP activations (no training).

Shafran, Geiger, Geva (arXiv 2506.10920) factorize a block's MLP hidden activations H^T
(d_ff x n tokens) ~= F G^T with F (d_ff x K) signed and sparse (each feature a small set
of co-active neurons, winner-take-all) and G (n x K) >= 0 (how strongly each token
expresses each feature). The EMBER paper uses it as a base method (METHOD.md section 2):
features whose mean code on concept tokens is >= 2x that on other tokens are the concept;
the edit removes them from the up-projections (W_in, what makes the neurons fire on
concept inputs) and/or the down-projections (W_out, what the neurons write) of a range of
blocks, scaled by delta (1 removes, > 1 reverses).

fit: one forward pass collects the activations of every block any grid point edits; one
factorization per block; the candidates are low-rank edits (``LowRankDelta``), so a grid
of them costs kilobytes. The fit does not depend on the grid.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from obliviate.data.concepts import ConceptData
from obliviate.edits.weights import LowRankDelta
from obliviate.errors import ObliviateError
from obliviate.methods.mlp_features import (
    MlpActivations, collect_mlp_activations, mlp_projections, orthonormal_basis, parse_layer_range, sample_texts,
)
from obliviate.models.layers import MLP_DOWN, MLP_UP, decoder_layers
from obliviate.models.loading import LoadedModel
from obliviate.methods import MethodContext

W_MODES = ("in", "out", "both")
SELECTIONS = ("contrast", "reference")
CONCEPT, NEUTRAL, CONTRAST = 0, 1, 2  # activation sources


# Under a plug-in edit (``--ember``) the features are read on the model as it was. Read on
# the EMBER-edited model, the contrast rule took the edit's own traces for the concept
# (Gambling: 724 features selected instead of 3, and every grid cell then failed the
# general-knowledge gate, general fraction 0.10-0.67). The edits act on MLP weights, which
# EMBER leaves alone, and stack on EMBER's.
FITS_BEFORE_PLUG_IN = True


@dataclass(frozen=True)
class Config:
    rank: int = 100  # K features per block (the reference's rank)
    sparsity: float = 0.01  # share of neurons each feature keeps (winner-take-all; SNMF paper 0.01)
    max_iterations: int = 200  # alternating updates; stops earlier once the loss settles
    patience: int = 20  # iterations without a relative improvement of ``tolerance``
    tolerance: float = 1e-4
    reg: float = 1e-6  # ridge on the least-squares F step (relative to the mean diagonal of G^T G)
    # Feature selection. "reference": concept-sentence tokens vs neutral-sentence tokens.
    # "contrast" (default, judge-free, as EMBER's): the negatives are the neutral sentences AND
    # other concepts' sentences, so features of encyclopedic prose in general rank low.
    selection: str = "contrast"
    ratio_threshold: float = 2.0  # reference: mean code on concept tokens >= 2x the negatives'
    # Reference coverage 0.95; our reading: of the features that pass the ratio, keep the
    # fewest (largest concept mass first) that carry 95% of their summed code on concept tokens.
    coverage: float = 0.95
    # Grid axes. w_mode: which projections change. deltas: edit strength (reference in/out
    # deltas {1, 4, 7, 10}); with "both", in and out take the same delta unless pair_deltas is
    # False (then every in x out pair, the reference's 16). The CPU default keeps the ends of
    # the reference range that can pass the gates: on Gemma 3 270M (Gambling, train
    # questions) every delta-1 cell left QA above 0.6 of the original's (0.83-0.91).
    w_modes: tuple[str, ...] = ("out", "in", "both")
    deltas: tuple[float, ...] = (4.0, 10.0)
    pair_deltas: bool = True
    # Layer ranges, paired by position (in_layers[i] with out_layers[i]). The reference's
    # Gemma-2-2B optimum (Golf) edits W_in of blocks 0-12 and W_out of 9-17 of its 26; written
    # as fractions they scale to any depth: on Gemma 3 270M (18 blocks) W_in 0-8, W_out 6-12.
    in_layers: tuple[str, ...] = ("0/26-12/26",)
    out_layers: tuple[str, ...] = ("9/26-17/26",)
    up_module: str = MLP_UP  # W_in, inside each decoder block
    down_module: str = MLP_DOWN  # W_out
    # Content tokens per text group (concept, neutral, contrast): the fit's cost is linear in
    # them (about 0.15 s an iteration at 4,500 tokens, d_ff 2048, on one core).
    max_tokens: int = 1500
    max_sentences: int = 150  # per group, a seeded sample (150 sentences hold ~4,000 tokens: enough for max_tokens)
    max_length: int = 64
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.rank < 1 or not 0 < self.sparsity <= 1:
            raise ObliviateError(f"rank must be >= 1 and sparsity in (0, 1], got {self.rank}, {self.sparsity}.")
        if self.max_iterations < 1 or self.patience < 1 or self.tolerance < 0 or self.reg < 0:
            raise ObliviateError("max_iterations and patience must be >= 1, tolerance and reg >= 0.")
        if self.selection not in SELECTIONS:
            raise ObliviateError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}.")
        if self.ratio_threshold <= 0 or not 0 < self.coverage <= 1:
            raise ObliviateError(f"ratio_threshold must be > 0 and coverage in (0, 1], got {self.ratio_threshold}, {self.coverage}.")
        if not self.w_modes or any(m not in W_MODES for m in self.w_modes):
            raise ObliviateError(f"w_modes must be among {', '.join(W_MODES)}, got {self.w_modes}.")
        if not self.deltas or any(d <= 0 for d in self.deltas):
            raise ObliviateError(f"deltas must be positive numbers, got {self.deltas}.")
        if not self.in_layers or len(self.in_layers) != len(self.out_layers):
            raise ObliviateError(f"in_layers and out_layers are paired: give as many of each, got {self.in_layers} and {self.out_layers}.")
        for name in ("max_tokens", "max_sentences", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"{name} must be >= 1, got {getattr(self, name)}.")


# ---- the factorization: pure functions (tested in closed form) ----

def sq_loss(A: torch.Tensor, F: torch.Tensor, G: torch.Tensor) -> float:
    """||A - F G^T||_F^2."""
    return float(((A - F @ G.T) ** 2).sum())


def update_features(AG: torch.Tensor, G: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    """The least-squares F for fixed G: F = A G (G^T G + reg I)^-1 (``AG`` = A @ G). reg is
    relative to the mean diagonal of G^T G, so one value fits any activation scale."""
    gram = G.T @ G
    ridge = reg * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, AG.T).T


def update_codes(G: torch.Tensor, AtF: torch.Tensor, FtF: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Semi-NMF's multiplicative G step (Ding, Li & Jordan 2010, Theorem 1): with M+ / M-
    the positive / negative parts, G <- G * sqrt((AtF+ + G FtF-) / (AtF- + G FtF+)).
    It keeps G >= 0 and never raises ||A - F G^T||^2 for fixed F."""
    numerator = _positive(AtF) + G @ _negative(FtF)
    denominator = _negative(AtF) + G @ _positive(FtF)
    return G * torch.sqrt(numerator / (denominator + eps))


def _positive(M: torch.Tensor) -> torch.Tensor:
    return (M.abs() + M) / 2


def _negative(M: torch.Tensor) -> torch.Tensor:
    return (M.abs() - M) / 2


def winner_take_all(F: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each column's ``keep`` largest |entries| (its neurons), zero the rest; also
    returns the kept rows per column (keep x K) for the sparse product below."""
    keep = min(keep, F.shape[0])
    top = F.abs().topk(keep, dim=0).indices
    mask = torch.zeros_like(F, dtype=torch.bool).scatter_(0, top, True)
    return F * mask, top


def sparse_transpose_product(A: torch.Tensor, F: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A^T F (n x K) when column k of F is nonzero only on ``rows[:, k]``: K x keep x n
    multiply-adds instead of d x n x K (1% of the neurons: a 100x smaller product)."""
    values = torch.gather(F, 0, rows)  # (keep, K)
    return torch.einsum("jk,jkn->nk", values, A[rows])  # A[rows]: (keep, K, n)


@dataclass
class SemiNmf:
    F: torch.Tensor  # (d_ff, K) unit-norm columns, sparse
    G: torch.Tensor  # (n, K) >= 0
    loss: float
    relative_loss: float
    iterations: int
    best_iteration: int


def semi_nmf(A: torch.Tensor, k: int, sparsity: float = 0.01, max_iterations: int = 200, patience: int = 20,
             tolerance: float = 1e-4, reg: float = 1e-6, seed: int = 42) -> SemiNmf:
    """A (d x n) ~= F G^T, F sparse by winner-take-all, G >= 0. The winner-take-all step
    can raise the loss (it is a projection, not a minimization), so the best iterate is
    kept; the loss is computed from K x K products, never from a d x n residual."""
    generator = torch.Generator().manual_seed(seed)
    k = min(k, A.shape[1])
    keep = max(1, math.ceil(sparsity * A.shape[0]))
    G = torch.rand(A.shape[1], k, generator=generator, dtype=A.dtype) + 0.1
    norm_a = float((A * A).sum())
    AG = A @ G
    best = (math.inf, None, None, 0)
    stale, iteration = 0, 0
    for iteration in range(1, max_iterations + 1):
        F, rows = winner_take_all(update_features(AG, G, reg), keep)
        G = update_codes(G, sparse_transpose_product(A, F, rows), F.T @ F)
        AG = A @ G
        loss = norm_a - 2 * float((F * AG).sum()) + float(((F.T @ F) * (G.T @ G)).sum())
        if loss < best[0] * (1 - tolerance):
            best, stale = (loss, F, G, iteration), 0
        else:
            stale += 1
            if loss < best[0]:
                best = (loss, F, G, best[3])
            if stale >= patience:
                break
    loss, F, G, best_iteration = best
    scale = F.norm(dim=0).clamp_min(1e-12)  # unit features, the scale moved into the codes
    return SemiNmf(F / scale, G * scale, max(loss, 0.0), max(loss, 0.0) / max(norm_a, 1e-30), iteration, best_iteration)


# ---- which features are the concept ----

@dataclass
class LayerFeatures:
    layer: int
    selected: list[int]
    ratios: list[float]  # of the selected
    concept_mass: list[float]
    top_tokens: list[list[str]]
    passing: int  # features with ratio >= threshold, before coverage
    relative_loss: float
    iterations: int


def select_layer_features(G: torch.Tensor, source: torch.Tensor, config: Config) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
    """(selected features, ratios, concept means, how many passed the ratio)."""
    negatives = (source == NEUTRAL) if config.selection == "reference" else (source != CONCEPT)
    concept = source == CONCEPT
    if not concept.any() or not negatives.any():
        raise ObliviateError("SNMF needs activations on both concept and neutral sentences.")
    concept_mean = G[concept].double().mean(0)
    ratios = concept_mean / (G[negatives].double().mean(0) + 1e-8)
    passing = torch.nonzero(ratios >= config.ratio_threshold).flatten()
    order = passing[torch.argsort(concept_mean[passing], descending=True)]
    mass = concept_mean[order]
    cumulative = torch.cumsum(mass, 0) / mass.sum().clamp_min(1e-30)
    count = int(torch.searchsorted(cumulative, torch.tensor(config.coverage, dtype=cumulative.dtype)).item()) + 1
    return order[:min(count, len(order))].tolist(), ratios, concept_mean, len(passing)


def top_tokens(G: torch.Tensor, source: torch.Tensor, token_ids: torch.Tensor, feature: int, tokenizer, top: int = 12) -> list[str]:
    """The concept-sentence tokens that express ``feature`` most (distinct, decoded)."""
    codes = torch.where(source == CONCEPT, G[:, feature], torch.zeros(()))
    seen, words = set(), []
    for row in torch.argsort(codes, descending=True).tolist():
        token = int(token_ids[row])
        if codes[row] <= 0 or len(words) >= top:
            break
        if token not in seen:
            seen.add(token)
            words.append(tokenizer.decode([token]))
    return words


# ---- the fitted grid ----

@dataclass
class SnmfFit:
    config: Config
    depth: int
    features: dict[int, LayerFeatures]
    out_left: dict[int, torch.Tensor]  # per block: W_out Q (d_model x r) for the out edit
    out_right: dict[int, torch.Tensor]  # Q^T (r x d_ff)
    in_left: dict[int, torch.Tensor]  # per block: Q (Q^T W_in R) (d_ff x r')
    in_right: dict[int, torch.Tensor]  # R^T (r' x d_model)
    names: dict[int, tuple[str, str]]  # per block: (W_in name, W_out name)
    original: dict[str, torch.Tensor]  # shared by every candidate
    timings: dict[str, float] = field(default_factory=dict)

    def points(self) -> list[dict]:
        points = []
        for in_spec, out_spec in zip(self.config.in_layers, self.config.out_layers):
            ranges = {"in_layers": in_spec, "out_layers": out_spec}
            for mode in self.config.w_modes:
                for in_delta, out_delta in self._deltas(mode):
                    points.append({"w_mode": mode, "in_delta": in_delta, "out_delta": out_delta, **ranges})
        return points

    def _deltas(self, mode: str) -> list[tuple[float, float]]:
        deltas = sorted(self.config.deltas)
        if mode == "in":
            return [(d, 0.0) for d in deltas]
        if mode == "out":
            return [(0.0, d) for d in deltas]
        if self.config.pair_deltas:
            return [(d, d) for d in deltas]
        return [(i, o) for i in deltas for o in deltas]

    def candidates(self) -> Iterator[tuple[dict, LowRankDelta]]:
        for point in self.points():
            yield point, self.edit(point)

    def edit(self, point: dict) -> LowRankDelta:
        """W_out <- W_out (I - d Q Q^T) on the out blocks; W_in <- W_in - d Q Q^T W_in R R^T on
        the in blocks (Q: the selected features' neuron directions, R: the MLP inputs that
        express them on concept tokens). delta 1 removes the features, > 1 reverses them."""
        factors = {}
        if point["in_delta"]:
            for layer in parse_layer_range(point["in_layers"], self.depth):
                if layer in self.in_left:
                    factors[self.names[layer][0]] = (-point["in_delta"] * self.in_left[layer], self.in_right[layer])
        if point["out_delta"]:
            for layer in parse_layer_range(point["out_layers"], self.depth):
                if layer in self.out_left:
                    factors[self.names[layer][1]] = (-point["out_delta"] * self.out_left[layer], self.out_right[layer])
        return LowRankDelta(original=self.original, factors=factors,
                            metadata={"method": "snmf", **{k: str(v) for k, v in point.items()}})

    def report(self) -> dict:
        return {
            "method": "snmf", "depth": self.depth, "grid": self.points(), "selection": self.config.selection,
            "ratio_threshold": self.config.ratio_threshold, "coverage": self.config.coverage,
            "layers": {str(layer): f.__dict__ for layer, f in sorted(self.features.items())},
            "selected_feature_count": sum(len(f.selected) for f in self.features.values()),
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }


def fit(lm: LoadedModel, data: ConceptData, config: Config,
        seed: int = 42, context: MethodContext | None = None) -> SnmfFit:
    context = context or MethodContext()
    depth = len(decoder_layers(lm.model)[1])
    in_blocks = sorted({l for spec in config.in_layers for l in parse_layer_range(spec, depth)}) if any(
        m in ("in", "both") for m in config.w_modes) else []
    out_blocks = sorted({l for spec in config.out_layers for l in parse_layer_range(spec, depth)}) if any(
        m in ("out", "both") for m in config.w_modes) else []
    blocks = sorted(set(in_blocks) | set(out_blocks))
    timings = {}
    clock = time.perf_counter()
    groups = [sample_texts(data.concept_sentences, config.max_sentences, seed),
              sample_texts(data.neutral_sentences, config.max_sentences, seed)]
    if config.selection == "contrast" and data.contrast_sentences:
        groups.append(sample_texts(data.contrast_sentences, config.max_sentences, seed))
    acts = collect_mlp_activations(lm.model, lm.tokenizer, groups, blocks, config.up_module, config.down_module,
                                   config.max_length, config.batch_size, config.max_tokens, seed)
    timings["activations"] = time.perf_counter() - clock
    fitted = SnmfFit(config, depth, {}, {}, {}, {}, {}, {}, {}, timings)
    clock = time.perf_counter()
    log = context.log
    for layer in blocks:
        _fit_layer(fitted, lm, acts, layer, seed, edit_in=layer in in_blocks, edit_out=layer in out_blocks)
        found = fitted.features[layer]
        log(f"snmf block {layer}: {len(found.selected)} concept features of {config.rank} "
            f"(relative loss {found.relative_loss}, {found.iterations} iterations)")
    timings["factorization"] = time.perf_counter() - clock
    return fitted


def _fit_layer(fitted: SnmfFit, lm: LoadedModel, acts: MlpActivations, layer: int, seed: int,
               edit_in: bool, edit_out: bool) -> None:
    config = fitted.config
    result = semi_nmf(acts.hidden[layer].T.contiguous(), config.rank, config.sparsity, config.max_iterations,
                      config.patience, config.tolerance, config.reg, seed)
    selected, ratios, mass, passing = select_layer_features(result.G, acts.source, config)
    fitted.features[layer] = LayerFeatures(
        layer, selected, [round(float(ratios[k]), 3) for k in selected], [round(float(mass[k]), 4) for k in selected],
        [top_tokens(result.G, acts.source, acts.token_ids, k, lm.tokenizer) for k in selected], passing,
        round(result.relative_loss, 4), result.iterations)
    if not selected:
        return  # nothing of the concept here: the block is left as it is
    proj = mlp_projections(lm.model, layer, config.up_module, config.down_module)
    fitted.names[layer] = (proj.up_name, proj.down_name)
    Q = orthonormal_basis(result.F[:, selected])  # (d_ff, r) neuron directions of the features
    if edit_out:
        w_out = proj.down.weight.detach().cpu()
        fitted.original[proj.down_name] = w_out.clone()
        fitted.out_left[layer] = w_out.double() @ Q
        fitted.out_right[layer] = Q.T.contiguous()
    if edit_in:
        w_in = proj.up.weight.detach().cpu()
        fitted.original[proj.up_name] = w_in.clone()
        R = orthonormal_basis(_input_directions(acts, layer, result.G, selected))  # (d_model, r')
        fitted.in_left[layer] = Q @ (Q.T @ w_in.double() @ R)
        fitted.in_right[layer] = R.T.contiguous()


def _input_directions(acts: MlpActivations, layer: int, G: torch.Tensor, selected: list[int]) -> torch.Tensor:
    """Per selected feature, the mean MLP input over concept tokens weighted by the feature's
    code (d_model x s): the inputs that make the feature fire, which the W_in edit targets."""
    concept = acts.source == CONCEPT
    weights = G[concept][:, selected].double()
    inputs = acts.inputs[layer][concept].double()
    return (inputs.T @ weights) / weights.sum(0).clamp_min(1e-30)
