"""Loss terms of the trained erasure methods, as pure functions of tensors.

Each method (methods/rmu.py, elm.py, grad_diff.py, npo.py) composes these; nothing here
touches a model. Shapes: logits (B, T, V), token ids and masks (B, T), activations
(B, T, D). Masks are 1 on real tokens and 0 on padding; padding never counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _up(x: torch.Tensor) -> torch.Tensor:
    """float32 for half precision inputs; float64 stays float64 (closed-form tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, T) over positions where ``mask`` is 1."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1, shape (B, T-1) (next-token shift)."""
    logprobs = F.log_softmax(_up(logits[:, :-1]), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over real (unpadded) target tokens."""
    return -_masked_mean(token_logprobs(logits, input_ids), attention_mask[:, 1:])


def sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood of each sequence's real tokens, shape (B,) (NPO's log pi(y|x))."""
    mask = attention_mask[:, 1:].to(torch.float32)
    return (token_logprobs(logits, input_ids) * mask).sum(dim=1)


def gradient_difference_loss(forget_nll: torch.Tensor, retain_nll: torch.Tensor, retain_weight: float = 1.0) -> torch.Tensor:
    """Ascend on the forget set, descend on the retain set: -NLL_f + w * NLL_r.

    (Liu et al. 2022 / TOFU's GradDiff; open-unlearning default weights 1 and 1.)
    """
    return -forget_nll + retain_weight * retain_nll


def npo_loss(policy_logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024, arXiv 2404.05868, eq. 3):
    -(2 / beta) * mean log sigmoid(-beta * (log pi(y|x) - log pi_ref(y|x))).

    Equals 2 log(2) / beta when the model still matches the reference, and falls to 0 as
    the forget text becomes unlikely; as beta -> 0 its gradient is gradient ascent's.
    """
    log_ratio = policy_logprob - reference_logprob
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def rmu_forget_loss(activations: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU forget term (WMDP, arXiv 2403.03218, eq. 1): MSE between layer-L activations on
    forget text and the fixed control vector c*u, averaged over real tokens and dims."""
    squared = (_up(activations) - _up(control)).pow(2).mean(dim=-1)
    return _masked_mean(squared, mask)


def rmu_retain_loss(activations: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """RMU retain term (eq. 2): alpha * MSE to the frozen model's activations on retain text."""
    squared = (_up(activations) - _up(frozen)).pow(2).mean(dim=-1)
    return alpha * _masked_mean(squared, mask)


def rmu_control_vector(dim: int, coefficient: float, generator: torch.Generator) -> torch.Tensor:
    """c * u with u uniform on [0, 1)^d scaled to unit norm (the WMDP reference's draw)."""
    u = torch.rand(dim, generator=generator, dtype=torch.float32)
    return coefficient * u / u.norm()


def eta_ramp(length: int, start: float = 1.0, end: float = 1000.0) -> torch.Tensor:
    """ELM's guidance strength per token position, linear from ``start`` to ``end``."""
    if length == 1:
        return torch.tensor([float(start)])
    return torch.linspace(start, end, length)


def elm_erase_target(base_logits: torch.Tensor, expert_logits: torch.Tensor, novice_logits: torch.Tensor,
                     eta: torch.Tensor, temperature: float = 1.2, top_k: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """ELM's erase target (arXiv 2410.02760, eq. 5) as (token ids, probabilities), each (..., k).

    log P'(x) = log P(x) + eta * (log P(x | novice) - log P(x | expert)) is kept on the
    original model's top-k tokens of each position (the guidance only re-weights plausible
    continuations), divided by the temperature and normalised over them; every other token
    has probability 0. Only the k kept values are formed: a full-vocabulary distribution
    enters through its log-normaliser alone, which on a 262k-token vocabulary spares
    several passes over (batch x length x vocabulary) tensors a step. ``eta`` broadcasts
    over positions: shape (T,) or (B, T).
    """
    kept = base_logits.topk(min(top_k, base_logits.shape[-1]), dim=-1).indices
    guided = _logprobs_at(base_logits, kept) + eta.to(_up(base_logits).dtype)[..., None] * (
        _logprobs_at(novice_logits, kept) - _logprobs_at(expert_logits, kept))
    return kept, F.softmax(guided / temperature, dim=-1)


def soft_cross_entropy(logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """-sum_v q(v) log p(v) per position over the target's tokens (q is 0 elsewhere),
    averaged over real positions."""
    per_position = -(target_probs * _logprobs_at(logits, target_ids)).sum(dim=-1)
    return _masked_mean(per_position, mask)


def _logprobs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at ``ids`` along the last axis, without the full log-softmax."""
    logits = _up(logits)
    return logits.gather(-1, ids) - logits.logsumexp(dim=-1, keepdim=True)


def hard_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to given target token ids at the same positions (ELM's retain and
    consistency terms use the original model's argmax / its generated tokens)."""
    return -_masked_mean(_logprobs_at(logits, targets[..., None]).squeeze(-1), mask)
