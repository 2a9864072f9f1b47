"""AdamW for an embedding table whose rows mostly get no gradient, with the same result as
the dense step.

An untied input embedding (every EMBER-erased tied model: its edited tokens' output rows
differ from their input rows) gets a gradient only on the rows of the tokens in the batch:
a few hundred of Gemma 3's 262,144 a step. Dense AdamW still allocates, zeroes and walks
the whole 168M-value table every step. Here the embedding returns a sparse gradient and:

- a row that has never had a gradient has zero moments, so AdamW only decays it:
  p <- p (1 - lr wd) a step. That is applied in closed form, (1 - lr wd)^k, when a forward
  pass is about to read the row (a pre-hook on the embedding) or when the whole table is
  read (``settle``: before evaluation and checkpoints);
- a row that has had one keeps moving on its moments, so it takes the full AdamW step
  every step from then on (the active rows).

The weights equal plain AdamW's to float rounding (tests/test_training_scale.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from obliviate.training import sharding
from obliviate.training.optim import make_optimizer


class LazyRowAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction, no amsgrad) for
    2-D parameters with sparse row gradients. Rows that never had a gradient carry the step
    their decay is applied to (``decayed``); ``settle_rows`` before a forward pass reads
    them, ``settle`` before the whole table is read."""

    def __init__(self, params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                         active=torch.zeros(p.shape[0], dtype=torch.bool, device=p.device),
                         decayed=torch.zeros(p.shape[0], dtype=torch.long, device=p.device))
        return state

    @torch.no_grad()
    def _decay(self, group: dict, p: torch.Tensor, rows: torch.Tensor) -> None:
        """Inactive ``rows`` get the decay of the steps since theirs was last applied."""
        state = self._state(p)
        rows = rows[~state["active"][rows]]
        owed = (state["step"] - state["decayed"][rows]).to(p.dtype)
        p[rows] *= torch.pow(1 - group["lr"] * group["weight_decay"], owed)[:, None]
        state["decayed"][rows] = state["step"]

    def settle_rows(self, token_ids: torch.Tensor) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self._decay(group, p, torch.unique(token_ids.to(p.device)))

    def settle(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self._decay(group, p, torch.arange(p.shape[0], device=p.device))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1).coalesce()
                rows, values = grad.indices()[0], grad.values()
                self._decay(group, p, rows)  # a no-op where a forward pass already did it
                state = self._state(p)
                state["step"] += 1
                state["active"][rows] = True
                active = torch.nonzero(state["active"]).flatten()
                g = torch.zeros(len(active), p.shape[1], dtype=p.dtype, device=p.device)
                g[torch.searchsorted(active, rows)] = values
                m, v, w = state["exp_avg"][active], state["exp_avg_sq"][active], p[active]
                w.mul_(1 - lr * decay)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                w.addcdiv_(m, (v.sqrt() / bias2 ** 0.5).add_(eps), value=-lr / bias1)
                state["exp_avg"][active], state["exp_avg_sq"][active], p[active] = m, v, w

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts every state tensor to the weights' dtype
            state["active"], state["decayed"] = state["active"].bool(), state["decayed"].long()


class Chained:
    """Several optimizers stepped, zeroed, saved and loaded as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def settle(self) -> None:
        for optimizer in self.optimizers:
            if isinstance(optimizer, LazyRowAdamW):
                optimizer.settle()

    def state_dict(self) -> dict:
        return {"chained": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, part in zip(self.optimizers, state["chained"], strict=True):
            optimizer.load_state_dict(part)


@contextmanager
def optimizer_for(name: str, model: nn.Module, params, lr: float, weight_decay: float) -> Iterator:
    """``make_optimizer(name, params, ...)`` for the block, except that the input embedding's
    rows are updated lazily where that gives the same weights: plain AdamW on an untied
    nn.Embedding among ``params``, in one process. Call ``settle(optimizer)`` before the
    weights are read outside a forward pass."""
    params = list(params)
    lazy = sparse_input_rows(model) if name == "adamw" and sharding.world()[1] == 1 else None
    if lazy is None or not any(p is lazy for p in params):
        yield make_optimizer(name, params, lr, weight_decay)
        return
    rows = LazyRowAdamW([lazy], lr, weight_decay)
    embedding = model.get_input_embeddings()
    hook = embedding.register_forward_pre_hook(lambda _module, args: rows.settle_rows(args[0]))
    sparse, embedding.sparse = embedding.sparse, True
    try:
        yield Chained(make_optimizer(name, [p for p in params if p is not lazy], lr, weight_decay), rows)
    finally:
        hook.remove()
        embedding.sparse = sparse


def settle(optimizer) -> None:
    """Weights up to date before they are read (a no-op for any other optimizer)."""
    if isinstance(optimizer, Chained):
        optimizer.settle()


def sparse_input_rows(model: nn.Module) -> nn.Parameter | None:
    """The input embedding's weight when its rows can be updated lazily: its own matrix (not
    tied to the output layer, whose gradient is dense) and an nn.Embedding."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or (output is not None and output.weight is embedding.weight):
        return None
    return embedding.weight
