"""Closed-form checks of every loss term on hand-made float64 tensors."""
from __future__ import annotations

import math

import pytest
import torch

from obliviate.training import losses


def test_causal_lm_loss_masks_padding_exactly():
    # uniform logits over 4 tokens: every real target costs log 4; padded targets are ignored
    logits = torch.zeros(1, 4, 4, dtype=torch.float64)
    logits[0, 2] = torch.tensor([0.0, 0.0, 100.0, 0.0])  # a padded position with a confident wrong guess
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert losses.causal_lm_loss(logits, ids, mask).item() == pytest.approx(math.log(4))
    assert losses.sequence_logprob(logits, ids, mask).item() == pytest.approx(-2 * math.log(4))


def test_causal_lm_loss_perfect_prediction_is_zero():
    ids = torch.tensor([[0, 1, 2]])
    logits = torch.full((1, 3, 3), -1e4, dtype=torch.float64)
    logits[0, 0, 1] = logits[0, 1, 2] = 0.0
    assert losses.causal_lm_loss(logits, ids, torch.ones_like(ids)).item() == pytest.approx(0.0, abs=1e-9)


def test_gradient_difference():
    assert losses.gradient_difference_loss(torch.tensor(3.0), torch.tensor(2.0), 0.5).item() == pytest.approx(-2.0)


def test_npo_closed_form():
    same = losses.npo_loss(torch.tensor([-5.0, -7.0], dtype=torch.float64), torch.tensor([-5.0, -7.0], dtype=torch.float64), 0.1)
    assert same.item() == pytest.approx(2 * math.log(2) / 0.1)
    # log ratio -10, beta 0.5: -(2/0.5) * log sigmoid(5)
    value = losses.npo_loss(torch.tensor([-20.0], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64), 0.5)
    assert value.item() == pytest.approx(-4 * math.log(1 / (1 + math.exp(-5))))


def test_npo_gradient_tends_to_gradient_ascent_as_beta_vanishes():
    policy = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    losses.npo_loss(policy, torch.tensor([-3.0], dtype=torch.float64), 1e-6).backward()
    assert policy.grad.item() == pytest.approx(1.0, rel=1e-5)  # d/dlogp of +logp (ascent on NLL)


def test_rmu_terms():
    acts = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    control = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # position 0: (0 + 4) / 2 = 2; position 1: (4 + 16) / 2 = 10; mean 6 (position 2 padded)
    assert losses.rmu_forget_loss(acts, control, mask).item() == pytest.approx(6.0)
    assert losses.rmu_retain_loss(acts, acts + 1.0, mask, 30.0).item() == pytest.approx(30.0)
    u = losses.rmu_control_vector(16, 6.5, torch.Generator().manual_seed(0))
    assert u.norm().item() == pytest.approx(6.5, rel=1e-6) and (u >= 0).all()


def test_eta_ramp():
    ramp = losses.eta_ramp(4, 1.0, 1000.0)
    assert ramp.tolist() == pytest.approx([1.0, 334.0, 667.0, 1000.0])


def test_elm_erase_target_and_soft_ce():
    base = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64))
    expert = torch.log(torch.tensor([[[0.8, 0.1, 0.1]]], dtype=torch.float64))
    novice = torch.log(torch.tensor([[[0.2, 0.4, 0.4]]], dtype=torch.float64))
    eta = torch.tensor([2.0], dtype=torch.float64)
    kept, target = losses.elm_erase_target(base, expert, novice, eta, temperature=2.0, top_k=2)
    # log P + 2 log(P_novice / P_expert), on the original top-2 (tokens 0, 1), softmax of it / 2
    guided = torch.log(torch.tensor([0.5, 0.3])) + 2 * torch.log(torch.tensor([0.25, 4.0]))
    expected = torch.softmax(guided.double() / 2.0, dim=0)
    assert kept[0, 0].tolist() == [0, 1] and torch.allclose(target[0, 0], expected)
    student = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]], dtype=torch.float64))
    ce = losses.soft_cross_entropy(student, kept, target, torch.ones(1, 1))
    assert ce.item() == pytest.approx(-(expected[0] * math.log(0.6) + expected[1] * math.log(0.3)).item())
    # soft CE of a distribution with itself is its entropy (the minimum)
    q = torch.tensor([[[0.7, 0.2, 0.1]]], dtype=torch.float64)
    entropy = -(q * q.log()).sum()
    everything = torch.arange(3)[None, None]
    assert losses.soft_cross_entropy(q.log(), everything, q, torch.ones(1, 1)).item() == pytest.approx(entropy.item())


def test_the_top_k_target_is_the_full_vocabulary_definition():
    """Forming only the k kept values gives the full-vocabulary formula's distribution and loss."""
    generator = torch.Generator().manual_seed(0)
    base, expert, novice, student = (torch.randn(2, 5, 300, generator=generator) * 3 for _ in range(4))
    eta = losses.eta_ramp(5, 1.0, 1000.0)
    kept, target = losses.elm_erase_target(base, expert, novice, eta, temperature=1.2, top_k=50)
    log = torch.nn.functional.log_softmax
    guided = log(base, -1) + eta[:, None] * (log(novice, -1) - log(expert, -1))
    outside = torch.ones_like(guided, dtype=torch.bool).scatter_(-1, base.topk(50, dim=-1).indices, False)
    full = torch.softmax(guided.masked_fill(outside, float("-inf")) / 1.2, dim=-1)
    torch.testing.assert_close(full.gather(-1, kept), target)
    torch.testing.assert_close(full.sum(-1), target.sum(-1))
    mask = torch.ones(2, 5)
    full_ce = -(full * log(student, -1)).sum(-1).mean()
    torch.testing.assert_close(losses.soft_cross_entropy(student, kept, target, mask), full_ce)


def test_hard_cross_entropy_masks():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64))
    value = losses.hard_cross_entropy(logits, torch.tensor([[0, 1]]), torch.tensor([[1, 0]]))
    assert value.item() == pytest.approx(math.log(2))
