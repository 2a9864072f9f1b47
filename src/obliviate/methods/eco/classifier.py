"""The prompt classifier: logistic regression on pooled early-layer hidden states of the
target model itself (no extra download), with a threshold calibrated on held-out
negatives. Pooling is the mean over the prompt's tokens, or ("mean+max") the mean and each
dimension's maximum: text wrapped around a question dilutes the mean, not the maximum.

Features are computed with an early exit: a forward hook on decoder layer ``layer``
stores its output and stops the forward pass, so the classifier costs about
``layer / num_layers`` of one prefill. The pass runs under no_grad with use_cache=False
and changes nothing in the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from obliviate.errors import ObliviateError
from obliviate.models.layers import block_outputs, depth, left_pad, model_device


POOLINGS = ("mean", "mean+max")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ObliviateError(f"Classifier pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")


def pooled_width(hidden: int, pooling: str) -> int:
    """Features per prompt: the hidden size once per pooled statistic."""
    return hidden * len(pooling.split("+"))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, tokens, d) -> (batch, d) mean over real tokens, with "mean+max" (batch, 2d)."""
    real = mask.unsqueeze(-1).bool()
    mean = (hidden * real).sum(1) / real.sum(1)
    if pooling == "mean":
        return mean
    return torch.cat([mean, hidden.masked_fill(~real, float("-inf")).amax(1)], dim=1)


@torch.no_grad()
def pooled_hidden_layers(model: nn.Module, sequences: Sequence[Sequence[int]], layers: Sequence[int],
                         batch_size: int = 32, pooling: str = "mean") -> dict[int, torch.Tensor]:
    """Pooled real tokens of each hidden state ``layer`` (hidden-state numbering, see
    models/layers.py: layer L is block L-1's output), float32, (n, pooled_width).

    One pass per batch, stopped right after the deepest requested layer.
    """
    check_pooling(pooling)
    count = depth(model)
    for layer in layers:
        if not 1 <= layer <= count:
            raise ObliviateError(f"Classifier layer must be in [1, {count}], got {layer}.")
    device = model_device(model)
    blocks = {layer: layer - 1 for layer in layers}
    pooled: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(sequences), batch_size):
        ids, mask, positions = left_pad(sequences[start:start + batch_size], 0, device)
        outputs = block_outputs(model, sorted(set(blocks.values())), input_ids=ids, attention_mask=mask,
                                position_ids=positions)
        for layer, block in blocks.items():
            pooled[layer].append(pool(outputs[block].float(), mask, pooling).cpu())
    return {layer: torch.cat(chunks) for layer, chunks in pooled.items()}


def pooled_hidden(model: nn.Module, sequences: Sequence[Sequence[int]], layer: int, batch_size: int = 32,
                  pooling: str = "mean") -> torch.Tensor:
    """Pooled real tokens of decoder layer ``layer``'s output (1-based), float32, (n, pooled_width)."""
    return pooled_hidden_layers(model, sequences, [layer], batch_size, pooling)[layer]


def candidate_layers(model: nn.Module) -> list[int]:
    """Early layers to choose from: a sixth, a quarter and a third of the way up (on the
    embedded model the earliest separated held-out concept questions best; deeper layers
    cost more and did worse)."""
    count = depth(model)
    return sorted({max(1, round(count * f)) for f in (1 / 6, 1 / 4, 1 / 3)})


@dataclass
class PromptClassifier:
    """p(concept | prompt) = sigmoid(w . (x - mean) / std + b); flagged when p >= threshold."""

    weight: torch.Tensor  # (pooled_width,): the hidden size, twice it with mean+max
    bias: torch.Tensor  # (1,)
    mean: torch.Tensor  # (pooled_width,)
    std: torch.Tensor  # (pooled_width,)
    layer: int
    threshold: float = 0.5
    pooling: str = "mean"

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        check_pooling(self.pooling)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float().cpu() - self.mean) / self.std
        return torch.sigmoid(z @ self.weight + self.bias)

    def score(self, model: nn.Module, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        return self.probabilities(pooled_hidden(model, sequences, self.layer, pooling=self.pooling)).numpy()

    def flags(self, model: nn.Module, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        return self.score(model, sequences) >= self.threshold

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}


def check_threshold(threshold: float) -> None:
    if not 0.0 < float(threshold) < 1.0:
        raise ObliviateError(f"The classifier threshold must be strictly between 0 and 1, got {threshold}.")


def train_logistic(features: torch.Tensor, labels: np.ndarray, layer: int, c: float = 1.0, seed: int = 0,
                   sample_weight: np.ndarray | None = None, pooling: str = "mean") -> PromptClassifier:
    """Class-weighted logistic regression (the reference weights classes too); explicit
    ``sample_weight`` replaces the class weights."""
    from sklearn.linear_model import LogisticRegression

    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = ((x - mean) / std).numpy()
    balanced = "balanced" if sample_weight is None else None
    model = LogisticRegression(C=c, class_weight=balanced, max_iter=2000, random_state=seed)
    model.fit(z, labels.astype(int), sample_weight=sample_weight)
    return PromptClassifier(
        weight=torch.tensor(model.coef_[0], dtype=torch.float32),
        bias=torch.tensor(model.intercept_, dtype=torch.float32),
        mean=mean.float(), std=std.float(), layer=layer, pooling=pooling,
    )


def calibrate_threshold(negative_scores: np.ndarray, target_fpr: float | None = None, alpha: float | None = None) -> float:
    """Threshold from held-out negatives' scores.

    target_fpr: the empirical (1 - fpr) quantile, so at most that share of the
      calibration negatives is flagged.
    alpha: split-conformal: the ceil((n+1)(1-alpha))-th smallest negative score, which
      bounds the false-positive rate on new negatives by alpha (marginally).
    The threshold is kept inside (0.5, 1) so a confident negative is never flagged.
    """
    scores = np.sort(np.asarray(negative_scores, dtype=float))
    n = len(scores)
    if n == 0:
        raise ObliviateError("No held-out negatives to calibrate the threshold on.")
    if alpha is not None:
        if not 0 < alpha < 1:
            raise ObliviateError(f"conformal alpha must be in (0, 1), got {alpha}.")
        rank = int(np.ceil((n + 1) * (1 - alpha)))
        cut = scores[min(rank, n) - 1] if rank <= n else 1.0
    else:
        if not 0 < target_fpr < 1:
            raise ObliviateError(f"target false-positive rate must be in (0, 1), got {target_fpr}.")
        allowed = int(np.floor(target_fpr * n))  # negatives that may score at or above the threshold
        cut = scores[n - allowed - 1] if allowed < n else scores[0]
    # Strictly above the cut: flagged means score >= threshold.
    threshold = float(np.nextafter(cut, 1.0))
    return float(min(max(threshold, 0.5), 1.0 - 1e-12))


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    flagged = np.asarray(scores) >= threshold
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    return {
        "fpr": float((flagged & ~labels).sum() / max(negatives, 1)),
        "fnr": float((~flagged & labels).sum() / max(positives, 1)),
        "positives": int(positives),
        "negatives": int(negatives),
    }
