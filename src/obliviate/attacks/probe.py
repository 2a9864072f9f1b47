"""Linear probe: is the concept still linearly readable from the hidden states?

Per layer, a logistic-regression probe on mean-pooled hidden states learns to tell the
concept's sentences from neutral ones (a split fixed by the seed: train half, test half).
Erasure that only hides the answers leaves probe accuracy near the original's; chance is
0.5. The reported "after" number is the best layer's held-out accuracy (the attacker's
choice of layer). The original's features come from the results cache when the same
sentences ran before; an erased model that is the original with some tokens' embedding
rows changed runs only the sentences holding one of those tokens (the others' hidden
states are the original's).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from obliviate.edits.embedding import patch_between
from obliviate.errors import ObliviateError
from obliviate.methods import eco
from obliviate.models.layers import left_pad
from obliviate.models.loading import LoadedModel
from obliviate.attacks.common import AttackContext, accuracy_interval, cached_tensor_for_original

NAME = "probe"


@dataclass(frozen=True)
class Config:
    sentences: int = 150  # per class (concept, neutral); half train, half test
    max_length: int = 64
    batch_size: int = 16
    c: float = 1.0  # inverse L2 strength of the logistic regression

    def __post_init__(self) -> None:
        if self.sentences < 4 or self.max_length < 4 or self.batch_size < 1 or self.c <= 0:
            raise ObliviateError("probe needs sentences >= 4, max_length >= 4, batch_size >= 1 and c > 0.")


@torch.no_grad()
def layer_features(lm: LoadedModel, sentences: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """Mean-pooled hidden states: (n_layers + 1, n_sentences, hidden), padding excluded. Positions
    count each sentence's own tokens, so its features do not depend on the batch it is in."""
    per_batch = []
    for start in range(0, len(sentences), batch_size):
        encoded = lm.tokenizer(sentences[start:start + batch_size], truncation=True, max_length=max_length).input_ids
        ids, mask, positions = left_pad(encoded, lm.tokenizer.pad_token_id, lm.device)
        # logits_to_keep=1: the probe needs hidden states, not the vocabulary projection
        states = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                          use_cache=False, logits_to_keep=1).hidden_states
        mask = mask.unsqueeze(-1).float()
        pooled = [(h.float() * mask).sum(1) / mask.sum(1) for h in states]
        per_batch.append(torch.stack(pooled).cpu().numpy())
    return np.concatenate(per_batch, axis=1)


def probe_accuracies(features: np.ndarray, labels: np.ndarray, train: np.ndarray, c: float, seed: int) -> tuple[list[float], list[np.ndarray]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accuracies, corrects = [], []
    test = ~train
    for layer in features:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        probe.fit(layer[train], labels[train])
        correct = probe.predict(layer[test]) == labels[test]
        accuracies.append(float(correct.mean()))
        corrects.append(correct.astype(float))
    return accuracies, corrects


def sentence_split(ctx: AttackContext, config: Config) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = random.Random(ctx.seed)
    n = min(config.sentences, len(ctx.data.concept_sentences), len(ctx.data.neutral_sentences))
    concept = rng.sample(ctx.data.concept_sentences, n)
    neutral = rng.sample(ctx.data.neutral_sentences, n)
    labels = np.array([1] * n + [0] * n)
    train = np.zeros(2 * n, dtype=bool)
    for offset in (0, n):  # half of each class for training, stratified
        train[offset + np.array(rng.sample(range(n), n // 2))] = True
    return concept + neutral, labels, train


def run(ctx: AttackContext, config: Config) -> dict:
    sentences, labels, train = sentence_split(ctx, config)
    out: dict = {"settings": {**config.__dict__, "train": int(train.sum()), "test": int((~train).sum()), "chance": 0.5}}
    original = None
    for role, lm in ctx.models.items():
        if role == "original":
            features = original = original_features(ctx, lm, sentences, config)
        else:
            features = erased_features(ctx, lm, sentences, config, original)
        accuracies, corrects = probe_accuracies(features, labels, train, config.c, ctx.seed)
        best = int(np.argmax(accuracies))
        out[role] = {"per_layer": accuracies, "best_layer": best,
                     "after": accuracy_interval(corrects[best], ctx.bootstrap, ctx.seed)}
    return out


def original_features(ctx: AttackContext, lm: LoadedModel, sentences: list[str], config: Config) -> np.ndarray:
    """The original's features, through the results cache (they depend on nothing erased)."""
    payload = {"sentences": sentences, "max_length": config.max_length, "batch_size": config.batch_size}
    return cached_tensor_for_original(ctx, lm, "probe_features", payload, lambda: torch.from_numpy(
        layer_features(lm, sentences, config.max_length, config.batch_size))).numpy()


def erased_features(ctx: AttackContext, lm: LoadedModel, sentences: list[str], config: Config,
                    original: np.ndarray | None) -> np.ndarray:
    """The erased model's features: only the sentences it can change run, when it is the
    original with some tokens' embedding rows changed; every sentence otherwise."""
    changed = sentences_changed(ctx, lm, sentences, config.max_length) if original is not None else None
    if changed is None:
        return layer_features(lm, sentences, config.max_length, config.batch_size)
    features = original.copy()
    if len(changed):
        features[:, changed] = layer_features(lm, [sentences[i] for i in changed], config.max_length, config.batch_size)
    return features


def sentences_changed(ctx: AttackContext, erased: LoadedModel, sentences: list[str], max_length: int) -> np.ndarray | None:
    """The sentences (as read, truncated) holding a token whose input row the erased model
    changed, when that is all it changed: no other weight, no inference-time hook. None
    when the models differ otherwise (every sentence may change)."""
    original = ctx.models["original"]
    if eco.hook_of(erased.model) is not None:
        return None
    patch = patch_between(original.model, erased.model)
    if patch is None:
        return None
    tokens = set(patch.token_ids.tolist())
    ids = erased.tokenizer(sentences, truncation=True, max_length=max_length).input_ids
    return np.array([i for i, sentence in enumerate(ids) if tokens & set(sentence)], dtype=int)
