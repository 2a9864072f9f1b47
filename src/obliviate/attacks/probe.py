"""Linear probe: is the concept still linearly readable from the hidden states?

Per layer, a logistic-regression probe on mean-pooled hidden states learns to tell the
concept's sentences from neutral ones (a split fixed by the seed: train half, test half).
Erasure that only hides the answers leaves probe accuracy near the original's; chance is
0.5. The reported "after" number is the best layer's held-out accuracy (the attacker's
choice of layer).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.models.loading import LoadedModel
from obliviate.attacks.common import AttackContext, accuracy_interval

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
    """Mean-pooled hidden states: (n_layers + 1, n_sentences, hidden), padding excluded."""
    per_batch = []
    for start in range(0, len(sentences), batch_size):
        enc = lm.tokenizer(sentences[start:start + batch_size], return_tensors="pt", padding=True,
                           truncation=True, max_length=max_length).to(lm.device)
        # logits_to_keep=1: the probe needs hidden states, not the vocabulary projection
        states = lm.model(**enc, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).float()
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
    for role, lm in ctx.models.items():
        features = layer_features(lm, sentences, config.max_length, config.batch_size)
        accuracies, corrects = probe_accuracies(features, labels, train, config.c, ctx.seed)
        best = int(np.argmax(accuracies))
        out[role] = {"per_layer": accuracies, "best_layer": best,
                     "after": accuracy_interval(corrects[best], ctx.bootstrap, ctx.seed)}
    return out
