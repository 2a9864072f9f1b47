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


def test_elm_guided_distribution_and_soft_ce():
    base = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64))
    expert = torch.log(torch.tensor([[[0.8, 0.1, 0.1]]], dtype=torch.float64))
    novice = torch.log(torch.tensor([[[0.2, 0.4, 0.4]]], dtype=torch.float64))
    eta = torch.tensor([2.0], dtype=torch.float64)
    guided = losses.elm_guided_logprobs(base, expert, novice, eta)
    expected = torch.log(torch.tensor([0.5, 0.3, 0.2])) + 2 * torch.log(torch.tensor([0.25, 4.0, 4.0]))
    assert torch.allclose(guided[0, 0], expected.double())
    target = losses.guided_target_distribution(guided, base, temperature=2.0, top_k=2)
    # token 2 is outside the original top-2 -> 0; the rest softmax(guided / 2) over tokens 0, 1
    kept = torch.softmax(expected[:2].double() / 2.0, dim=0)
    assert target[0, 0, 2].item() == 0.0 and torch.allclose(target[0, 0, :2], kept)
    student = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]], dtype=torch.float64))
    ce = losses.soft_cross_entropy(student, target, torch.ones(1, 1))
    assert ce.item() == pytest.approx(-(kept[0] * math.log(0.6) + kept[1] * math.log(0.3)).item())
    # soft CE of a distribution with itself is its entropy (the minimum)
    q = torch.tensor([[[0.7, 0.2, 0.1]]], dtype=torch.float64)
    entropy = -(q * q.log()).sum()
    assert losses.soft_cross_entropy(q.log(), q, torch.ones(1, 1)).item() == pytest.approx(entropy.item())


def test_hard_cross_entropy_masks():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64))
    value = losses.hard_cross_entropy(logits, torch.tensor([[0, 1]]), torch.tensor([[1, 0]]))
    assert value.item() == pytest.approx(math.log(2))
