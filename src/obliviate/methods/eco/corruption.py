"""Embedding corruptions of ECO (METHOD.md section 3; Liu et al., arXiv 2406.07933).

Each corruption maps the embeddings of the prompt tokens to be corrupted, shape (n, d),
to corrupted ones of the same shape. They act on the embedding module's OUTPUT, i.e. in
the space the model actually uses (after Gemma's sqrt(d_model) scale).

Noise is drawn from a generator seeded afresh on every call, so the same prompt gets the
same corruption every time: evaluation is reproducible and the zeroth-order estimate of
d accuracy / d sigma compares S(s+eps) and S(s-eps) under common random numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from obliviate.errors import ObliviateError

KINDS = ("gaussian", "zero_out", "sign_flip")


@dataclass(frozen=True)
class Corruption:
    """What to do to a flagged prompt's token embeddings.

    kind: gaussian (noise of std ``strength`` on the first ``dims`` dimensions; the
      reference's multiple-choice setting is dims=1, sigma=1e6), zero_out (zero the
      ``dims`` largest-magnitude dimensions of each token), sign_flip (negate the first
      ``dims`` dimensions). dims=0 means every dimension.
    strength: sigma of the Gaussian (learned by sigma.py); unused by the other kinds.
    """

    kind: str = "gaussian"
    dims: int = 0
    strength: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ObliviateError(f"Unknown corruption {self.kind!r}: choose one of {', '.join(KINDS)}.")
        if self.dims < 0:
            raise ObliviateError(f"corruption dims must be >= 0 (0 = all dimensions), got {self.dims}.")
        if not self.strength >= 0:
            raise ObliviateError(f"corruption strength (sigma) must be >= 0, got {self.strength}.")

    def with_strength(self, strength: float) -> "Corruption":
        return Corruption(self.kind, self.dims, float(strength), self.seed)

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        return corrupt(embeds, self)


def _span(dims: int, width: int) -> int:
    return width if dims in (0, None) else min(dims, width)


def gaussian_noise(embeds: torch.Tensor, sigma: float, dims: int, seed: int) -> torch.Tensor:
    n = _span(dims, embeds.shape[-1])
    generator = torch.Generator(device=embeds.device).manual_seed(seed)
    noise = torch.randn(embeds.shape[:-1] + (n,), generator=generator, device=embeds.device, dtype=torch.float32)
    out = embeds.clone()
    out[..., :n] = (out[..., :n].float() + sigma * noise).to(embeds.dtype)
    return out


def zero_out_top(embeds: torch.Tensor, k: int) -> torch.Tensor:
    k = _span(k, embeds.shape[-1])
    top = embeds.abs().topk(k, dim=-1).indices
    return embeds.scatter(-1, top, torch.zeros_like(top, dtype=embeds.dtype))


def sign_flip(embeds: torch.Tensor, dims: int) -> torch.Tensor:
    n = _span(dims, embeds.shape[-1])
    out = embeds.clone()
    out[..., :n] = -out[..., :n]
    return out


def corrupt(embeds: torch.Tensor, corruption: Corruption) -> torch.Tensor:
    if corruption.kind == "gaussian":
        return gaussian_noise(embeds, corruption.strength, corruption.dims, corruption.seed)
    if corruption.kind == "zero_out":
        return zero_out_top(embeds, corruption.dims)
    return sign_flip(embeds, corruption.dims)
