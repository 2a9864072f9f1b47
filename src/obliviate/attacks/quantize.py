"""Quantization: the erased model's linear layers at 8-bit and 4-bit, weight-only.

Zhang et al. (ICLR 2025, "Does your LLM truly unlearn? An embarrassingly simple approach")
found that 4-bit quantization brings back most of what gradient-based unlearning removed:
the small weight changes of the erasure fall inside one quantization step, so rounding
returns the original's weights. Three schemes, each an attack variant:

- ``int8``: round-to-nearest, symmetric, one scale per output channel;
- ``int4``: the same per group of ``group_size`` input weights (torchao's weight-only
  integer configs, on the CPU and on GPUs alike);
- ``nf4``: the 4-bit NormalFloat code of QLoRA (bitsandbytes' ``load_in_4bit``, the
  scheme Zhang et al. measured): one absmax per block of ``nf4_block`` weights, the absmax
  values themselves quantized to 8 bits per block of 256 (double quantization). Computed
  with torchao's NF4 tensor, which runs on the CPU; bitsandbytes stores the scales' own
  8-bit code differently, so its weights can differ from these in the last scale step.

The decoder's linear layers are quantized; the input embedding and the output layer stay
in floating point, as in the usual weight-only deployment. The model is quantized in place
and its float weights come back bit for bit afterwards.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, get_args

import torch
from torch import nn

from obliviate.attacks.common import AttackContext, accuracy_interval, correct_on, each_role
from obliviate.errors import ObliviateError

NAME = "quantize"
Scheme = Literal["int8", "int4", "nf4"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
NF4_SCALE_BLOCK = 256  # absmax values sharing one 8-bit scale (bitsandbytes' double quantization)


@dataclass(frozen=True)
class Config:
    schemes: tuple[Scheme, ...] = SCHEMES  # each is one attack variant; the attacker keeps the one that brings back most
    group_size: int = 32  # int4: input weights sharing one scale (int8: one scale an output channel)
    nf4_block: int = 64  # nf4: weights sharing one absmax (bitsandbytes' blocksize for 4-bit weights)

    def __post_init__(self) -> None:
        schemes = (self.schemes,) if isinstance(self.schemes, str) else tuple(self.schemes)
        unknown = [s for s in schemes if s not in SCHEMES]
        if unknown or not schemes:
            raise ObliviateError(f"quantize schemes {unknown or '()'} are not valid: choose from {', '.join(SCHEMES)}.")
        object.__setattr__(self, "schemes", schemes)
        for name in ("group_size", "nf4_block"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"quantize {name} must be >= 1, got {getattr(self, name)}.")


def quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers a weight-only deployment quantizes: all but the output layer."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def torchao_config(scheme: Scheme, group_size: int):
    """torchao's weight-only integer config of an integer scheme."""
    try:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as err:
        raise ObliviateError("The quantize attack needs torchao: pip install 'torchao>=0.13'.") from err
    granularity = PerAxis(0) if scheme == "int8" else PerGroup(group_size)
    return IntxWeightOnlyConfig(weight_dtype=torch.int8 if scheme == "int8" else torch.int4, granularity=granularity)


def nf4_round_trip(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``weight`` through the NF4 code and back (the values a 4-bit NormalFloat linear
    multiplies with). The absmax values are double-quantized in blocks of 256, or of the
    largest count that divides their number when a small layer has fewer."""
    from torchao.quantization import to_nf4

    scales = weight.numel() // block
    return to_nf4(weight.detach(), block, math.gcd(scales, NF4_SCALE_BLOCK)).get_original_weight().to(weight.dtype)


def check_divides(layers: dict[str, nn.Linear], scheme: Scheme, config: Config) -> None:
    """An int4 group must tile every layer's input width, an nf4 block its weight count."""
    if scheme == "int8":
        return
    size, setting, what = ((config.group_size, "group_size", "input width") if scheme == "int4"
                           else (config.nf4_block, "nf4_block", "weight count"))
    for name, module in layers.items():
        count = module.in_features if scheme == "int4" else module.weight.numel()
        if count % size:
            raise ObliviateError(f"quantize {setting} {size} does not divide the {what} of {name} ({count}): "
                                 f"--set quantize.{setting}=...")


@contextmanager
def quantized(model: nn.Module, scheme: Scheme, config: Config) -> Iterator[dict[str, nn.Linear]]:
    """``model`` with its linear layers quantized for a block; float weights restored after."""
    layers = quantizable(model)
    check_divides(layers, scheme, config)
    saved = {name: (m.weight.detach().clone(), m.weight.requires_grad) for name, m in layers.items()}
    try:
        if scheme == "nf4":
            for module in layers.values():
                module.weight = nn.Parameter(nf4_round_trip(module.weight, config.nf4_block), requires_grad=False)
        else:
            from torchao.quantization import quantize_

            quantize_(model, torchao_config(scheme, config.group_size), filter_fn=lambda module, fqn: fqn in layers)
        yield layers
    finally:
        for name, module in layers.items():
            weight, requires_grad = saved[name]
            module.weight = nn.Parameter(weight, requires_grad=requires_grad)


def run(ctx: AttackContext, config: Config) -> dict:
    """Each scheme on both models; the erased model's best is the attack's "after"."""
    torchao_config("int8", config.group_size)  # a missing torchao fails before any scoring

    def measure(role, lm, prepared, before):
        per_scheme = {}
        for scheme in config.schemes:
            with quantized(lm.model, scheme, config):
                per_scheme[scheme] = correct_on(lm, prepared, ctx.batching)
        best = max(per_scheme, key=lambda s: per_scheme[s].mean())
        return per_scheme[best], {
            "best_scheme": best,
            "per_scheme": {s: accuracy_interval(c, ctx.bootstrap, ctx.seed) for s, c in per_scheme.items()},
            "per_scheme_correct": {s: c.astype(int).tolist() for s, c in per_scheme.items()},
            "quantized_layers": len(quantizable(lm.model)),
        }

    return each_role(ctx, {"settings": asdict(config)}, measure)
