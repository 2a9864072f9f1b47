"""Quantization: the erased model's linear layers at 8-bit and 4-bit, weight-only.

Zhang et al. (ICLR 2025, "Does your LLM truly unlearn? An embarrassingly simple approach")
found that 4-bit quantization brings back most of what gradient-based unlearning removed:
the small weight changes of the erasure fall inside one quantization step, so rounding
returns the original's weights. Here: round-to-nearest, symmetric, per output channel at
8 bits and per group of ``group_size`` input weights at 4 bits (torchao's weight-only
integer configs, on the CPU and on GPUs alike). The decoder's linear layers are quantized;
the input embedding and the output layer stay in floating point, as in the usual
weight-only deployment. The model is quantized in place and its float weights come back
bit for bit afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import nn

from obliviate.attacks.common import AttackContext, accuracy_interval, correct_on, each_role
from obliviate.errors import ObliviateError

NAME = "quantize"
BITS = (8, 4)


@dataclass(frozen=True)
class Config:
    bits: tuple[int, ...] = BITS  # each is one attack variant; the attacker keeps the one that brings back most
    group_size: int = 32  # input weights sharing one scale at 4 bits (8 bits: one scale an output channel)

    def __post_init__(self) -> None:
        bits = (self.bits,) if isinstance(self.bits, int) else tuple(int(b) for b in self.bits)
        if not bits or any(b not in BITS for b in bits):
            raise ObliviateError(f"quantize bits must be among {BITS}, got {self.bits}.")
        object.__setattr__(self, "bits", bits)
        if self.group_size < 1:
            raise ObliviateError(f"quantize group_size must be >= 1, got {self.group_size}.")


def quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers a weight-only deployment quantizes: all but the output layer."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def torchao_config(bits: int, group_size: int):
    try:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as err:
        raise ObliviateError("The quantize attack needs torchao: pip install 'torchao>=0.13'.") from err
    granularity = PerAxis(0) if bits == 8 else PerGroup(group_size)
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=granularity)


@contextmanager
def quantized(model: nn.Module, bits: int, group_size: int) -> Iterator[dict[str, nn.Linear]]:
    """``model`` with its linear layers quantized for a block; float weights restored after."""
    from torchao.quantization import quantize_

    layers = quantizable(model)
    too_narrow = [n for n, m in layers.items() if bits == 4 and m.in_features % group_size]
    if too_narrow:
        raise ObliviateError(f"quantize group_size {group_size} does not divide the input width of {too_narrow[0]} "
                             f"({layers[too_narrow[0]].in_features}): --set quantize.group_size=...")
    saved = {name: (m.weight.detach().clone(), m.weight.requires_grad) for name, m in layers.items()}
    try:
        quantize_(model, torchao_config(bits, group_size), filter_fn=lambda module, fqn: fqn in layers)
        yield layers
    finally:
        for name, module in layers.items():
            weight, requires_grad = saved[name]
            module.weight = nn.Parameter(weight, requires_grad=requires_grad)


def run(ctx: AttackContext, config: Config) -> dict:
    """Each bit width on both models; the erased model's best is the attack's "after"."""
    torchao_config(config.bits[0], config.group_size)  # a missing torchao fails before any scoring

    def measure(role, lm, prepared, before):
        per_bits = {}
        for bits in config.bits:
            with quantized(lm.model, bits, config.group_size):
                per_bits[bits] = correct_on(lm, prepared, ctx.batching)
        best = max(per_bits, key=lambda b: per_bits[b].mean())
        return per_bits[best], {
            "best_bits": best,
            "per_bits": {str(b): accuracy_interval(c, ctx.bootstrap, ctx.seed) for b, c in per_bits.items()},
            "per_bits_correct": {str(b): c.astype(int).tolist() for b, c in per_bits.items()},
            "quantized_layers": len(quantizable(lm.model)),
        }

    return each_role(ctx, {"settings": asdict(config)}, measure)
