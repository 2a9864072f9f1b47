"""Optimizers for the trained methods and the relearning attack, and the precision of their
updates.

AdamW at the reference learning rates (1e-5 for relearning) makes per-step updates far
smaller than half a bfloat16 step of a typical weight (|w| ~ 0.02: a bf16 step is ~1.2e-4):
pure-bf16 AdamW rounds most of them away (measured: 16% of weights change in one step, the
rest keep their value for ever). Each choice below is a maintained library's optimizer;
what it costs per TRAINED parameter (bf16 model) and whether small updates survive:

| name | library | bytes/param (weights+grads+state) | small bf16 updates |
| --- | --- | --- | --- |
| ``adamw`` | torch (fused) | 2+2+4 = 8 | rounded away (fp32 models: exact, the CPU default) |
| ``adamw-fp32`` | torch + autocast | 4+4+8 = 16 | kept: fp32 master weights, bf16 compute |
| ``adamw-sr`` | torchao ``_AdamW`` | 2+2+4 = 8 | kept in expectation: stochastic rounding |
| ``adamw8bit`` | torchao ``AdamW8bit`` | 2+2+2 = 6 | kept in expectation: stochastic rounding |
| ``adamw8bit-bnb`` | bitsandbytes ``AdamW8bit`` | 2+2+2 = 6 | the reference's Llama choice; rounds to nearest |

``auto`` keeps today's behaviour for fp32 weights (``adamw``) and, for bf16/fp16 weights,
takes the first of ``adamw-fp32``, ``adamw-sr``, ``adamw8bit`` that the memory plan fits
(training/memory_plan.py, ``plan_training``).
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from obliviate.errors import ObliviateError

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    library: str  # the Python package that provides it
    master_fp32: bool  # trained weights held in fp32 during training, bf16 compute (autocast)
    state_bytes: float | None  # optimizer state per trained parameter (None: 2 x the weight's size)
    stochastic_rounding: bool
    summary: str
    transient_bytes: float = 0.0  # the step's temporaries per element of the largest trained tensor

    def available(self) -> bool:
        return importlib.util.find_spec(self.library) is not None

    def bytes_per_param(self, element: int) -> tuple[float, float, float]:
        """(weights, grads, optimizer state) bytes per trained parameter whose weights are
        stored with ``element`` bytes."""
        held = 4 if self.master_fp32 else element
        state = 2 * held if self.state_bytes is None else self.state_bytes
        return held, held, state


SPECS = {
    "adamw": OptimizerSpec("adamw", "torch", False, None, False,
                           "torch AdamW in the weights' dtype (bf16: small updates round away)"),
    "adamw-fp32": OptimizerSpec("adamw-fp32", "torch", True, None, False,
                                "fp32 master weights and AdamW state, bf16 compute under autocast"),
    "adamw-sr": OptimizerSpec("adamw-sr", "torchao", False, None, True,
                              "torchao AdamW, bf16 weights updated with stochastic rounding"),
    "adamw8bit": OptimizerSpec("adamw8bit", "torchao", False, 2.0, True,
                               "torchao AdamW8bit (8-bit moments), bf16 weights with stochastic rounding",
                               6.0),  # its moments dequantized to fp32 (measured on an H200)
    "adamw8bit-bnb": OptimizerSpec("adamw8bit-bnb", "bitsandbytes", False, 2.0, False,
                                   "bitsandbytes AdamW8bit (the reference's choice for Llama)", 2.0),
}
CHOICES = ("auto", *SPECS)
# ``auto`` for bf16 weights: best fidelity first, then less memory.
AUTO_ORDER = ("adamw-fp32", "adamw-sr", "adamw8bit")


def check_choice(name: str) -> None:
    if name not in CHOICES:
        raise ObliviateError(f"optimizer must be one of {', '.join(CHOICES)}, got {name!r}.")


def spec(name: str) -> OptimizerSpec:
    check_choice(name)
    if name == "auto":
        raise ObliviateError("resolve 'auto' first (resolve_optimizer).")
    return SPECS[name]


def weights_dtype(params: Iterable[torch.Tensor]) -> torch.dtype:
    dtypes = {p.dtype for p in params}
    return next(d for d in (torch.bfloat16, torch.float16) if d in dtypes) if dtypes & set(LOW_PRECISION) else torch.float32


def resolve_optimizer(name: str, dtype: torch.dtype, fits=None) -> str:
    """The optimizer ``name`` stands for with weights in ``dtype``; ``fits(spec_name) -> bool``
    is the memory plan's verdict (None: everything fits)."""
    check_choice(name)
    if name != "auto":
        if not SPECS[name].available():
            raise ObliviateError(f"optimizer {name} needs the {SPECS[name].library} package: "
                                 f"pip install {SPECS[name].library} (or pip install -e '.[gpu]').")
        return name
    if dtype not in LOW_PRECISION:
        return "adamw"  # fp32 weights: exact updates, the behaviour every CPU run has always had
    candidates = [n for n in AUTO_ORDER if SPECS[n].available()]
    for candidate in candidates:
        if fits is None or fits(candidate):
            return candidate
    return candidates[-1]  # nothing fits: the plan's refusal names the options


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float):
    """The optimizer ``name`` (resolved, not ``auto``) over ``params``."""
    params = list(params)
    chosen = spec(name)
    if name in ("adamw", "adamw-fp32"):
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        # Not fused for FSDP's sharded parameters (DTensor): the fused kernel takes plain tensors.
        if any(type(p.data).__name__ == "DTensor" for p in params):
            fused = False
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if not chosen.available():
        raise ObliviateError(f"optimizer {name} needs the {chosen.library} package: pip install {chosen.library}.")
    if name == "adamw-sr":
        from torchao.optim import _AdamW

        return _AdamW(params, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=True)
    if name == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=True)
    if name == "adamw8bit-bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise AssertionError(name)


@contextmanager
def training_precision(name: str, params: Iterable[torch.nn.Parameter], bf16_autocast: bool = False) -> Iterator:
    """For ``adamw-fp32``: hold the trained parameters in fp32 (the master weights) inside the
    block and yield an autocast context that runs the forward passes in their former dtype
    (bf16); afterwards they are rounded back. Other choices: the parameters stay as they are
    and the yielded context does nothing, or, with ``bf16_autocast`` on float32 weights,
    runs the forward passes' matrix products in bfloat16 (weights, gradients and optimizer
    stay float32: a CPU with AVX-512 BF16 or AMX multiplies about 4x faster in bf16)."""
    params = list(dict.fromkeys(params))  # tied weights once
    dtype = weights_dtype(params)
    device_type = params[0].device.type if params else "cpu"
    if not spec(name).master_fp32 or dtype not in LOW_PRECISION:
        if bf16_autocast and dtype == torch.float32:
            yield lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        else:
            yield nullcontext
        return
    for p in params:
        p.data = p.data.float()
    try:
        yield lambda: torch.autocast(device_type=device_type, dtype=dtype)
    finally:
        for p in params:
            p.data = p.data.to(dtype)
            if p.grad is not None:
                p.grad = None


def update_probe(name: str, steps: int = 1, size: int = 1024, lr: float = 1e-5, weight_decay: float = 0.01,
                 seed: int = 0, device: str = "cpu") -> dict:
    """How faithfully ``name`` applies small updates to bf16 weights (the bench's probe).

    A ``size`` x ``size`` bf16 weight (|w| ~ 0.02, the scale of a trained LLM's weights) takes
    ``steps`` AdamW steps at ``lr`` on seeded random gradients; the same steps in fp32 are
    the reference. Returns the share of weights that changed, the share of fp32's total
    update (w_N - w_0) that the bf16 weights carry (``update_kept``: the projection
    <bf16 update, fp32 update> / |fp32 update|^2; 1 = unbiased, 0 = nothing moved) and the
    relative L2 error of the total update (stochastic rounding is unbiased but noisy: its
    error is large at few steps and falls with more).
    """
    generator = torch.Generator().manual_seed(seed)
    start = (torch.randn(size, size, generator=generator) * 0.02).to(device)
    grads = [torch.randn(size, size, generator=generator).to(device) for _ in range(steps)]
    torch.manual_seed(seed)  # stochastic rounding draws from the global generator

    def run(choice: str, dtype: torch.dtype) -> torch.Tensor:
        weight = torch.nn.Parameter(start.to(dtype, copy=True))
        with training_precision(choice, [weight]):
            optimizer = make_optimizer(choice, [weight], lr, weight_decay)
            for grad in grads:
                weight.grad = grad.to(weight.dtype)
                optimizer.step()
        return weight.detach().float()

    reference = run("adamw", torch.float32) - start
    after = run(name, torch.bfloat16)
    moved = after - start.to(torch.bfloat16).float()
    return {"optimizer": name, "steps": steps, "device": str(device), "share_changed": float((moved != 0).float().mean()),
            "update_kept": float((moved * reference).sum() / reference.square().sum()),
            "update_error": float((moved - reference).norm() / reference.norm())}
