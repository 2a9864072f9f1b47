"""Which factorization features are the concept (EMBER step 4).

The reference rule: ratio_k = mean |G[:,k]| over concept-only tokens / mean over
neutral-only tokens (``both`` tokens excluded), keep ratio >= 2.0, and ask an external LLM
judge. Without the judge, the plain ratio picks up the GENRE of the concept sentences:
on Gemma 3 270M / Harry Potter it selects style features (" however/though/but",
" delivers/describes") because encyclopedic prose about anything is "concept-only"
relative to the neutral Wikipedia sentences.

Our default, ``contrast``, needs no judge and combines two statistics:
- contrast ratio: a token is concept-only only when it occurs in none of the neutral
  sentences and none of the OTHER concepts' sentences, and the ratio divides a feature's
  mean |G| on concept-only tokens by its mean |G| on every other token, so features that
  live on genre words shared with other concepts rank low;
- usage: how much of the concept TEXT the feature carries, sum over token occurrences in
  the concept sentences of |G| on concept-only tokens, per sentence. Script or spelling
  features (Greek letters for "Culture of Greece") are concept-only but rare in the text.
A feature is kept when ratio >= threshold (2.0) and its usage is at least
``usage_fraction`` (0.25) of the largest usage among the features that pass the ratio.
Measured on Gemma 3 270M (usage of the kept feature vs the next): Harry Potter " Wizard,
wizards, Magic, Hermione" 0.159 vs 0.021; Golf " basketball, baseball, golf" 0.142 vs
0.020; Gambling " gambling, betting, casino" 0.178 vs 0.027; COVID-19 " coronavirus,
COVID, pandemic" 0.111 and " infection, antibody" 0.044. ``reference`` keeps the paper's labels and rule; ``judge`` adds a local
model's yes/no reading of each candidate's top tokens on top of ``contrast``. Which
tokens are EDITED always follows the paper's labels (concept-only vs neutral sentences):
the contrast only decides which features are the concept.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
import torch

from obliviate.data.concepts import MCQuestion
from obliviate.errors import ObliviateError
from obliviate.evaluation.multiple_choice import option_scores, prepare

Selection = Literal["contrast", "reference", "judge"]
SELECTION_MODES: tuple[str, ...] = get_args(Selection)
CONCEPT, NEUTRAL, BOTH = "concept", "neutral", "both"


@dataclass(frozen=True)
class TokenSet:
    """V' (token ids of concept and neutral sentences) and each token's label."""

    ids: np.ndarray  # (n,) sorted token ids
    labels: np.ndarray  # (n,) CONCEPT / NEUTRAL / BOTH with other concepts as negatives too
    reference_labels: np.ndarray  # (n,) labels from neutral sentences alone (the paper's)
    concept_occurrences: np.ndarray  # (n,) how often each token occurs in the concept sentences
    n_concept_sentences: int

    def mask(self, label: str, reference: bool = False) -> np.ndarray:
        return (self.reference_labels if reference else self.labels) == label

    def counts(self) -> dict[str, int]:
        return {label: int(self.mask(label).sum()) for label in (CONCEPT, NEUTRAL, BOTH)}


def _token_counts(tokenizer, sentences: list[str]) -> Counter:
    special = set(tokenizer.all_special_ids)
    encoded = tokenizer(sentences, add_special_tokens=False).input_ids
    return Counter(t for ids in encoded for t in ids if t not in special)


def build_token_set(tokenizer, concept: list[str], neutral: list[str], contrast: list[str]) -> TokenSet:
    concept_counts = _token_counts(tokenizer, concept)
    concept_ids, neutral_ids = set(concept_counts), set(_token_counts(tokenizer, neutral))
    contrast_ids = set(_token_counts(tokenizer, contrast)) if contrast else set()
    ids = np.array(sorted(concept_ids | neutral_ids), dtype=np.int64)

    def label(token: int, negatives: set[int]) -> str:
        if token in concept_ids and token not in negatives:
            return CONCEPT
        return NEUTRAL if token not in concept_ids else BOTH

    reference = np.array([label(t, neutral_ids) for t in ids])
    contrasted = np.array([label(t, neutral_ids | contrast_ids) for t in ids])
    occurrences = np.array([concept_counts.get(int(t), 0) for t in ids], dtype=np.float64)
    return TokenSet(ids=ids, labels=contrasted, reference_labels=reference,
                    concept_occurrences=occurrences, n_concept_sentences=max(len(concept), 1))


def key_token_ids(tokenizer, data, min_occurrences: int = 3) -> frozenset[int]:
    """The concept's key tokens: concept-only (in none of the neutral or other concepts'
    sentences) and seen at least ``min_occurrences`` times in its sentences."""
    tokens = build_token_set(tokenizer, data.concept_sentences, data.neutral_sentences, data.contrast_sentences)
    keep = tokens.mask(CONCEPT) & (tokens.concept_occurrences >= min_occurrences)
    if not keep.any():
        raise ObliviateError(f"No key tokens for {data.concept!r}: no concept-only token occurs "
                             f"{min_occurrences} times in its sentences (lower min_occurrences, "
                             "e.g. --set respell.min_occurrences=1).")
    return frozenset(int(t) for t in tokens.ids[keep])


def feature_ratios(G: torch.Tensor, concept_mask: np.ndarray, neutral_mask: np.ndarray) -> np.ndarray:
    """mean |G| over concept tokens / (mean |G| over neutral tokens + 1e-8), per feature."""
    magnitude = G.abs().double().cpu().numpy()
    concept_mean = magnitude[concept_mask].mean(axis=0) if concept_mask.any() else np.zeros(G.shape[1])
    neutral_mean = magnitude[neutral_mask].mean(axis=0) if neutral_mask.any() else np.zeros(G.shape[1])
    return concept_mean / (neutral_mean + 1e-8)


@dataclass
class FeatureInfo:
    index: int
    ratio: float
    top_tokens: list[str]  # by |G|, decoded
    concept_share: float  # fraction of the feature's |G| mass on concept-only tokens
    usage: float  # |G| on concept-only tokens, weighted by occurrences, per concept sentence
    judge_confidence: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def describe_features(G: torch.Tensor, token_set: TokenSet, tokenizer, ratios: np.ndarray, top: int = 20) -> list[FeatureInfo]:
    magnitude = G.abs().double().cpu().numpy()
    concept_mask = token_set.mask(CONCEPT)
    infos = []
    for k in range(G.shape[1]):
        column = magnitude[:, k]
        order = np.argsort(-column)[:top]
        order = order[column[order] > 0]
        tokens = [tokenizer.decode([int(token_set.ids[i])]) for i in order]
        share = float(column[concept_mask].sum() / max(column.sum(), 1e-30))
        usage = float((column * token_set.concept_occurrences)[concept_mask].sum() / token_set.n_concept_sentences)
        infos.append(FeatureInfo(index=k, ratio=float(ratios[k]), top_tokens=tokens, concept_share=share, usage=usage))
    return infos


def select_features(
    G: torch.Tensor,
    token_set: TokenSet,
    tokenizer,
    mode: str = "contrast",
    ratio_threshold: float = 2.0,
    usage_fraction: float = 0.25,
    judge=None,
    concept: str = "",
    judge_confidence: float = 0.85,
) -> tuple[list[FeatureInfo], list[FeatureInfo]]:
    """Return (selected, all features described), selected ranked by ratio."""
    if mode not in SELECTION_MODES:
        raise ObliviateError(f"Unknown feature selection {mode!r}: choose one of {', '.join(SELECTION_MODES)}.")
    reference = mode == "reference"
    concept_mask = token_set.mask(CONCEPT, reference)
    # Reference: concept-only vs neutral-only. Contrast: concept-only vs every other token,
    # so features living on words shared with other concepts (genre words) rank low.
    negatives = token_set.mask(NEUTRAL, reference) if reference else ~concept_mask
    ratios = feature_ratios(G, concept_mask, negatives)
    described = describe_features(G, token_set, tokenizer, ratios)
    selected = [f for f in described if f.ratio >= ratio_threshold]
    if not reference and selected:
        floor = usage_fraction * max(f.usage for f in selected)
        selected = [f for f in selected if f.usage >= floor]
    if reference and not selected:
        selected = list(described)  # the reference falls back to every candidate
    if mode == "judge":
        if judge is None:
            raise ObliviateError("Feature selection 'judge' needs a judge model: pass --judge-model PATH_OR_ID.")
        for feature, confidence in zip(selected, judge_confidences(judge, concept, selected)):
            feature.judge_confidence = confidence
        selected = [f for f in selected if f.judge_confidence >= judge_confidence]
    return sorted(selected, key=lambda f: -f.ratio), described


def judge_confidences(judge, concept: str, features: list[FeatureInfo]) -> list[float]:
    """A local model's P(" Yes") that a feature's top tokens are about the concept.

    Scored like any multiple-choice item (option log-likelihood), so any local causal LM
    can serve as the judge; no external API.
    """
    questions = [
        MCQuestion(
            f"Here are words that a feature of a language model responds to: {', '.join(f.top_tokens[:20])}. "
            f"Are these words specifically about {concept}? Yes or No",
            ("Yes", "No"),
            0,
        )
        for f in features
    ]
    if not questions:
        return []
    prepared = prepare(judge, questions, mode="loglik")
    scores = option_scores(judge, prepared)
    # Undo the shuffle: column of "Yes" is where answer index points.
    yes = scores[np.arange(len(questions)), prepared.answers]
    no = scores[np.arange(len(questions)), 1 - prepared.answers]
    return list(1.0 / (1.0 + np.exp(no - yes)))
