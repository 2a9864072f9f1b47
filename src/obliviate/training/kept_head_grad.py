"""The output layer's weight gradient written into one buffer kept across steps.

A causal LM's output layer (Gemma 3: 262,144 x 640, 672 MB in float32) gets a dense
gradient every training step. Autograd allocates a fresh tensor for it each time; on a CPU
those are fresh pages, and faulting them in costs more than the product that fills them
(262,144 x 30 x 640 on 2 cores: 227 ms into a fresh tensor, 65 ms into a kept one).
Inside ``kept_head_gradient`` the output layer's backward writes the same product,
grad_logits^T @ hidden, into the buffer the previous step used (or adds it to a gradient
that is already there), so the weights are the plain loop's (tests/test_training_scale.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from obliviate.training import sharding


class _Buffer:
    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None


class _HeadProjection(torch.autograd.Function):
    """F.linear(hidden, weight) whose weight gradient lands in ``buffer`` (set as
    ``weight.grad``) instead of a fresh tensor handed to autograd."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, buffer: _Buffer) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.buffer = buffer
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        rows, features = grad.reshape(-1, grad.shape[-1]).t(), hidden.reshape(-1, hidden.shape[-1])
        if weight.grad is None:  # zero_grad(set_to_none=True) dropped it; the buffer is still ours
            if ctx.buffer.tensor is None:
                ctx.buffer.tensor = torch.empty_like(weight)
            torch.mm(rows, features, out=ctx.buffer.tensor)
            weight.grad = ctx.buffer.tensor
        else:  # accumulation, or a tied input embedding's gradient arrived first
            weight.grad.addmm_(rows, features)
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None


@contextmanager
def kept_head_gradient(model: nn.Module) -> Iterator[None]:
    """Train ``model``'s output layer with its weight gradient in a kept buffer: a bias-free
    nn.Linear on the CPU in one process, outside autocast (anything else is left as it is)."""
    head = model.get_output_embeddings()
    usable = (isinstance(head, nn.Linear) and head.bias is None and head.weight.device.type == "cpu"
              and sharding.world()[1] == 1)
    if not usable:
        yield
        return
    buffer = _Buffer()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not head.weight.requires_grad or torch.is_autocast_enabled("cpu"):
            return F.linear(hidden, head.weight)
        return _HeadProjection.apply(hidden, head.weight, buffer)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's forward again
        if head.weight.grad is buffer.tensor:
            head.weight.grad = None
