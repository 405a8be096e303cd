"""GAE, the PPO losses, KL rewards and controllers against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ragloop.alignment.rl import (
    AdaptiveKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def test_gae_hand_computed():
    # γ = 0.9, λ = 0.8 (γλ = 0.72):
    # t=2: δ = 2 + 0 − 1.5 = 0.5                  A = 0.5
    # t=1: δ = 0 + 0.9·1.5 − 1.0 = 0.35           A = 0.35 + 0.72·0.5 = 0.71
    # t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4            A = 1.4 + 0.72·0.71 = 1.9112
    adv, ret = compute_gae(
        torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]]), torch.ones(1, 3), gamma=0.9, lam=0.8
    )
    assert torch.allclose(adv, torch.tensor([[1.9112, 0.71, 0.5]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[2.4112, 1.71, 2.0]]), atol=1e-6)


def test_gae_ignores_padding():
    # the padded position's value (99) must not leak: V after the last real token is 0
    # t=1: δ = 0 + 0 − 1.0 = −1.0 → A = −1.0;  t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4 → A = 1.4 − 0.72 = 0.68
    adv, ret = compute_gae(
        torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.5, 1.0, 99.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.9, 0.8
    )
    assert torch.allclose(adv, torch.tensor([[0.68, -1.0, 0.0]]), atol=1e-6)
    assert ret[0, 2] == 0


def test_policy_loss_hand_computed():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.2, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    s = policy_loss(new, old, adv, torch.ones(1, 2), clip_coef=0.2)
    # token 0: max(−1.2, −1.2) = −1.2 (at the clip edge, not clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert s.loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert s.clipfrac.item() == pytest.approx(0.5)
    assert s.ratio_max_dev.item() == pytest.approx(0.5, abs=1e-6)
    # k3: mean((r − 1) − log r) = ((0.2 − log 1.2) + (−0.5 − log 0.5)) / 2
    assert s.approx_kl.item() == pytest.approx(((0.2 - math.log(1.2)) + (-0.5 - math.log(0.5))) / 2, abs=1e-6)


def test_policy_loss_ratio_one_and_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    s = policy_loss(logp, logp.detach(), adv, torch.ones(1, 2), clip_coef=0.2)
    assert s.ratio_max_dev.item() == 0 and s.clipfrac.item() == 0
    s.loss.backward()
    # ∂/∂logp of mean(−A·exp(logp − old)) at ratio 1 is −A/2
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.5]]))


def test_value_loss_clipped():
    loss, frac = value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5)
    # unclipped (2 − 3)² = 1; clipped V = 1.5 → (1.5 − 3)² = 2.25; 0.5·max = 1.125
    assert loss.item() == pytest.approx(1.125) and frac.item() == 1.0
    loss, _ = value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), None)
    assert loss.item() == pytest.approx(0.5)


def test_token_rewards_kl_and_score_on_last_token():
    scores = torch.tensor([2.0, 1.0])
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    r, kl = token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-0.05, 2.0, 0.0], [1.0, 0.0, 0.0]]))


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_per_token(lp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_per_token(lp, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1)
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "k9")


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    c.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10_000))
    c.update(current_kl=3.0, n_steps=100)  # error −0.5 clipped to −0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.002) * (1 - 0.002))


def test_whiten_entropy_logprobs_ev():
    w = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]), atol=1e-5)
    assert entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    lp = logprobs_from_logits(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75))
    m = torch.ones(1, 3)
    y = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(y, y, m) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3) + 2.0, y, m) == pytest.approx(0.0)
    assert masked_mean(torch.tensor([[1.0, 5.0]]), torch.tensor([[1.0, 0.0]])).item() == 1.0
