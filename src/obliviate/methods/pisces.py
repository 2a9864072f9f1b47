"""PISCES: erase a concept from the MLP vectors through a sparse dictionary (no training
of the model).

Gur-Arieh, Suslik, Hong, Barez, Geva (arXiv 2505.22586): a disentangler decomposes MLP
(value) vectors into features; features whose vocabulary projection is about the concept
are found; every MLP vector that uses one of them strongly enough has that feature's
coefficient edited and is reconstructed (METHOD.md section 2). No pretrained disentangler
exists for our models, so we train one on the model's own MLP vectors (the columns of
every down-projection): a top-k sparse dictionary, each unit-norm vector coded by
``topk`` of ``dictionary_factor * d_model`` atoms. It depends only on the weights, so it
is cached per model (24 s on Gemma 3 270M at two CPU threads, then 3 s: bench_snmf_pisces.py).

Concept features, judge-free: each atom's vocabulary projection (cosine with the output
embedding rows of the concept and neutral sentences' tokens, the top 1% kept) is read by
EMBER's contrast statistics (methods/features.py: concept-only tokens vs every other
token, ratio >= 2, usage >= a quarter of the best); ``judge`` adds a local model's reading.

Edit, for the grid point (k, value): MLP vector v_i uses selected feature j when its
coefficient z_ij >= k x the largest z_.j; its coefficient becomes -value x z_ij, i.e.
v_i <- v_i - (1 + value) z_ij |v_i| d_j (the rest of v_i, including what the dictionary
does not reconstruct, stays). Per block that is a low-rank change of W_out.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from obliviate.data.concepts import ConceptData
from obliviate.edits.weights import LowRankDelta
from obliviate.errors import ObliviateError
from obliviate.methods.features import SELECTION_MODES, FeatureInfo, build_token_set, select_features
from obliviate.methods.mlp_features import down_vectors, mlp_projections, parse_layer_range
from obliviate.models.layers import MLP_DOWN, decoder_layers
from obliviate.models.loading import LoadedModel, load_model
from obliviate.io import fingerprint, load_tensors, save_tensors
from obliviate.methods import MethodContext

FITS_BEFORE_PLUG_IN = False  # fitted on the model with EMBER's edit applied (methods/__init__.py)


@dataclass(frozen=True)
class Config:
    # Grid axes. k: how strongly a vector must use a concept feature to be edited, as a share
    # of the feature's largest coefficient (reference grid 0.95 ... 0.1, smaller edits more
    # vectors). value: the edit magnitude (reference grid 4 ... 60; Gemma-2-2B Golf optimum
    # 0.8 x 24). The CPU default keeps 4 points, measured on Gemma 3 270M (Gambling, train
    # questions): k 0.8 and 0.5 edit the same 10 vectors (a feature's peak is one vector) and
    # no cell of {0.8, 0.5} x {4, 24} passed the gates; k 0.3 edits 34 vectors, 0.1 936;
    # 0.3 x 16 was the only passing cell of {0.3, 0.1} x {8, 16} (test QA 0.64 -> 0.50).
    ks: tuple[float, ...] = (0.3, 0.1)
    values: tuple[float, ...] = (8.0, 16.0)
    layers: str = "0.0-1.0"  # blocks whose MLP vectors are coded and edited (all)
    down_module: str = MLP_DOWN
    # The disentangler (a top-k sparse dictionary trained on the MLP vectors).
    dictionary_factor: int = 4  # atoms = factor x d_model
    topk: int = 8  # atoms per MLP vector
    train_steps: int = 300
    train_batch: int = 1024
    lr: float = 1e-3
    cache_dir: str = "~/.cache/obliviate/pisces"  # "" trains afresh every time
    # Feature selection (methods/features.py): contrast | reference | judge.
    selection: str = "contrast"
    ratio_threshold: float = 2.0
    usage_fraction: float = 0.25
    projection_fraction: float = 0.01  # an atom's vocabulary: its top 1% of the tokens by |cosine|
    judge_model: str | None = None
    judge_confidence: float = 0.85
    max_features: int = 50  # at most this many concept features (highest ratio first)

    def __post_init__(self) -> None:
        if not self.ks or any(not 0 < k <= 1 for k in self.ks):
            raise ObliviateError(f"ks must be in (0, 1], got {self.ks}.")
        if not self.values or any(v <= 0 for v in self.values):
            raise ObliviateError(f"values must be positive, got {self.values}.")
        for name in ("dictionary_factor", "topk", "train_steps", "train_batch", "max_features"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr <= 0 or not 0 < self.projection_fraction <= 1:
            raise ObliviateError(f"lr must be > 0 and projection_fraction in (0, 1], got {self.lr}, {self.projection_fraction}.")
        if self.selection not in SELECTION_MODES:
            raise ObliviateError(f"selection must be one of {', '.join(SELECTION_MODES)}, got {self.selection!r}.")
        if self.ratio_threshold <= 0 or not 0 <= self.usage_fraction <= 1:
            raise ObliviateError(f"ratio_threshold must be > 0 and usage_fraction in [0, 1], got {self.ratio_threshold}, {self.usage_fraction}.")


# ---- the disentangler ----

@dataclass
class Dictionary:
    """Top-k sparse dictionary: code(x) = topk(relu((x - bias) W_enc + b_enc)), x ~= code D + bias."""

    encoder: torch.Tensor  # (d, m)
    encoder_bias: torch.Tensor  # (m,)
    atoms: torch.Tensor  # (m, d) unit rows
    bias: torch.Tensor  # (d,)
    topk: int
    relative_error: float = float("nan")
    seconds: float = 0.0

    def code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (n, topk): the sparse code of each row of ``x``."""
        pre = torch.relu((x - self.bias) @ self.encoder + self.encoder_bias)
        return pre.topk(self.topk, dim=1)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nk,nkd->nd", values, self.atoms[indices]) + self.bias


def train_dictionary(x: torch.Tensor, atoms: int, topk: int, steps: int, batch: int, lr: float, seed: int) -> Dictionary:
    """Adam on the reconstruction error of a top-k dictionary (Gao et al. 2024's recipe:
    atoms start as data points, the encoder as their transpose, atoms renormalized to unit
    norm after every step). Seeded: the same vectors and seed give the same dictionary."""
    generator = torch.Generator().manual_seed(seed)
    start = x[torch.randperm(len(x), generator=generator)[:atoms]]
    if len(start) < atoms:  # fewer vectors than atoms (tiny models): random atoms for the rest
        start = torch.cat([start, torch.randn(atoms - len(start), x.shape[1], generator=generator)])
    empty = start.norm(dim=1) < 1e-6  # a zero vector has no direction to start from
    start[empty] = torch.randn(int(empty.sum()), x.shape[1], generator=generator)
    dec = torch.nn.Parameter(start / start.norm(dim=1, keepdim=True).clamp_min(1e-12))
    enc = torch.nn.Parameter(dec.detach().T.clone())
    enc_bias = torch.nn.Parameter(torch.zeros(atoms))
    bias = torch.nn.Parameter(x.mean(0).clone())
    optimizer = torch.optim.Adam([dec, enc, enc_bias, bias], lr=lr)
    clock = time.perf_counter()
    for _ in range(steps):
        rows = x[torch.randint(len(x), (min(batch, len(x)),), generator=generator)]
        values, indices = torch.relu((rows - bias) @ enc + enc_bias).topk(topk, dim=1)
        recon = torch.einsum("nk,nkd->nd", values, dec[indices]) + bias
        loss = ((recon - rows) ** 2).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            dec /= dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dictionary = Dictionary(enc.detach(), enc_bias.detach(), dec.detach(), bias.detach(), topk,
                            seconds=time.perf_counter() - clock)
    dictionary.relative_error = reconstruction_error(dictionary, x)
    return dictionary


def reconstruction_error(dictionary: Dictionary, x: torch.Tensor, chunk: int = 8192) -> float:
    """||x - decode(code(x))||^2 / ||x - mean||^2 over all rows."""
    error = sum(float(((dictionary.decode(*dictionary.code(part)) - part) ** 2).sum()) for part in x.split(chunk))
    return error / max(float(((x - x.mean(0)) ** 2).sum()), 1e-30)


def _cache_key(config: Config, seed: int, vectors: torch.Tensor) -> str:
    probe = torch.linspace(-1, 1, vectors.shape[1], dtype=torch.float64)
    weights = f"{float((vectors.double() @ probe).sum()):.12e}:{tuple(vectors.shape)}"
    settings = {k: getattr(config, k) for k in ("dictionary_factor", "topk", "train_steps", "train_batch", "lr", "layers")}
    return fingerprint({"settings": settings, "seed": seed, "weights": weights})[:16]


def load_or_train(x: torch.Tensor, config: Config, seed: int) -> tuple[Dictionary, bool]:
    """The dictionary for these vectors (from the cache when it holds one), and whether it was cached."""
    path = Path(config.cache_dir).expanduser() / f"dictionary-{_cache_key(config, seed, x)}.safetensors" if config.cache_dir else None
    if path is not None and path.is_file():
        tensors, meta = load_tensors(path, "PISCES dictionary")
        return Dictionary(tensors["encoder"], tensors["encoder_bias"], tensors["atoms"], tensors["bias"],
                          int(meta["topk"]), float(meta["relative_error"]), float(meta["seconds"])), True
    dictionary = train_dictionary(x, config.dictionary_factor * x.shape[1], config.topk, config.train_steps,
                                  config.train_batch, config.lr, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"encoder": dictionary.encoder, "encoder_bias": dictionary.encoder_bias,
                            "atoms": dictionary.atoms, "bias": dictionary.bias},
                     {"topk": str(dictionary.topk), "relative_error": str(dictionary.relative_error),
                      "seconds": str(dictionary.seconds)})
    return dictionary, False


# ---- concept features by vocabulary projection ----

def vocabulary_projection(atoms: torch.Tensor, rows: torch.Tensor, fraction: float) -> torch.Tensor:
    """(tokens x atoms) cosine of each atom with each token's output row, each atom's top
    ``fraction`` of tokens by |cosine| kept and the rest zeroed (the sparsity EMBER's
    statistics expect: a feature is the few tokens it is about)."""
    cos = torch.nn.functional.normalize(rows.float(), dim=1) @ atoms.T
    keep = max(1, math.ceil(fraction * rows.shape[0]))
    top = cos.abs().topk(keep, dim=0).indices
    return cos * torch.zeros_like(cos, dtype=torch.bool).scatter_(0, top, True)


def concept_features(lm: LoadedModel, data: ConceptData, dictionary: Dictionary, used: torch.Tensor,
                     config: Config, judge=None, vocabulary: torch.Tensor | None = None) -> tuple[list[FeatureInfo], int]:
    """Selected atoms (FeatureInfo.index is the atom) among the ``used`` ones, and how many
    were considered. ``vocabulary``: the output embedding to project on (default the model's)."""
    token_set = build_token_set(lm.tokenizer, data.concept_sentences, data.neutral_sentences, data.contrast_sentences)
    weight = vocabulary if vocabulary is not None else lm.model.get_output_embeddings().weight.detach()
    rows = weight[torch.as_tensor(token_set.ids, device=weight.device)].cpu()
    candidates = torch.nonzero(used).flatten()
    projection = vocabulary_projection(dictionary.atoms[candidates], rows, config.projection_fraction)
    if config.selection == "judge" and judge is None and config.judge_model:
        judge = lm if config.judge_model == "self" else load_model(config.judge_model, device=str(lm.device))
    selected, _ = select_features(projection, token_set, lm.tokenizer, config.selection, config.ratio_threshold,
                                  config.usage_fraction, judge=judge, concept=data.concept,
                                  judge_confidence=config.judge_confidence)
    if config.selection == "reference" and len(selected) == len(candidates):
        selected = []  # the reference's fall-back to every feature would edit every MLP vector
    selected = selected[:config.max_features]
    for feature in selected:
        feature.index = int(candidates[feature.index])
    return selected, len(candidates)


# ---- the fitted grid ----

@dataclass
class PiscesFit:
    config: Config
    layers: list[int]
    names: dict[int, str]  # block -> W_out parameter name
    norms: dict[int, torch.Tensor]  # block -> |v_i| (d_ff,)
    codes: dict[int, torch.Tensor]  # block -> (d_ff, s) coefficients of the selected features
    atoms: torch.Tensor  # (s, d) the selected features
    peaks: torch.Tensor  # (s,) each selected feature's largest coefficient over all vectors
    features: list[FeatureInfo]
    original: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def points(self) -> list[dict]:
        # Larger k (fewer vectors) and smaller values first: the weaker edits come first.
        return [{"k": k, "value": v} for k in sorted(self.config.ks, reverse=True) for v in sorted(self.config.values)]

    def candidates(self) -> Iterator[tuple[dict, LowRankDelta]]:
        for point in self.points():
            yield point, self.edit(point["k"], point["value"])

    def edit(self, k: float, value: float) -> LowRankDelta:
        """W_out[:, i] <- W_out[:, i] - (1 + value) |v_i| sum_j z_ij d_j over the vectors i
        whose z_ij >= k * peak_j (as a low-rank factor pair per block)."""
        factors = {}
        for layer in self.layers:
            if layer not in self.codes:
                continue
            z = self.codes[layer]
            chosen = torch.where((z >= k * self.peaks) & (z > 0), z, torch.zeros(()))
            if not chosen.any():
                continue
            right = (-(1 + value) * chosen * self.norms[layer][:, None]).T.double()  # (s, d_ff)
            factors[self.names[layer]] = (self.atoms.T.double(), right)
        return LowRankDelta(original=self.original, factors=factors,
                            metadata={"method": "pisces", "k": str(k), "value": str(value)})

    def vectors_edited(self, k: float) -> int:
        return int(sum(((z >= k * self.peaks) & (z > 0)).any(1).sum() for z in self.codes.values()))

    def report(self) -> dict:
        return {"method": "pisces", "grid": self.points(), **self.info,
                "features": [asdict(f) for f in self.features],
                "vectors_edited": {str(k): self.vectors_edited(k) for k in sorted(self.config.ks, reverse=True)}}


def fit(lm: LoadedModel, data: ConceptData, config: Config,
        seed: int = 42, context: MethodContext | None = None, judge=None) -> PiscesFit:
    context = context or MethodContext()
    judge = judge if judge is not None else context.judge
    depth = len(decoder_layers(lm.model)[1])
    layers = parse_layer_range(config.layers, depth)
    clock = time.perf_counter()
    vectors = down_vectors(lm.model, layers, config.down_module)  # block -> (d_ff, d)
    stacked = torch.cat([vectors[l] for l in layers])
    norms = stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dictionary, cached = load_or_train(stacked / norms, config, seed)
    train_seconds = time.perf_counter() - clock

    clock = time.perf_counter()
    values, indices = dictionary.code(stacked / norms)
    used = torch.zeros(dictionary.atoms.shape[0], dtype=torch.bool)
    used[indices[values > 0]] = True
    features, considered = concept_features(lm, data, dictionary, used, config, judge,
                                            context.vocabulary)
    selected = torch.tensor([f.index for f in features], dtype=torch.long)
    dense = _selected_codes(values, indices, selected)  # (all vectors, s)
    info = {"dictionary": {"atoms": int(dictionary.atoms.shape[0]), "topk": dictionary.topk,
                           "relative_error": round(dictionary.relative_error, 4),
                           "train_seconds": round(dictionary.seconds, 1), "cached": cached,
                           "vectors": int(len(stacked))},
            "atoms_considered": considered, "layers": layers,
            "timings": {"dictionary": round(train_seconds, 2), "features": round(time.perf_counter() - clock, 2)}}
    fitted = PiscesFit(config, layers, {}, {}, {}, dictionary.atoms[selected], dense.max(0).values if len(selected) else
                       torch.zeros(0), features, {}, info)
    offset = 0
    for layer in layers:
        count = len(vectors[layer])
        block_codes = dense[offset:offset + count]
        offset += count
        if len(selected) and (block_codes > 0).any():
            proj = mlp_projections(lm.model, layer, down_module=config.down_module)
            fitted.names[layer] = proj.down_name
            fitted.codes[layer] = block_codes
            fitted.norms[layer] = norms[offset - count:offset, 0]
            fitted.original[proj.down_name] = proj.down.weight.detach().cpu().clone()
    return fitted


def _selected_codes(values: torch.Tensor, indices: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(n, s): each vector's coefficient on each selected atom (0 where it does not use it)."""
    dense = torch.zeros(values.shape[0], len(selected))
    for column, atom in enumerate(selected.tolist()):
        hit = indices == atom
        dense[:, column] = (values * hit).sum(1)
    return dense
