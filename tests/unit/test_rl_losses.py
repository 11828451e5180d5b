"""PPO/GRPO/RLOO math (`trainers.rl_losses`) against values computed by hand on small
tensors, and the KL estimators against their definition."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from trainers import rl_losses as rl  # noqa: E402


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_by_hand_gamma_lambda_one():
    adv, ret = rl.gae(t([0.0, 1.0]), t([0.5, 0.2]), t([1, 1]), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.8])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0])


def test_gae_by_hand_discounted_and_padding_carries_nothing():
    # t=1: delta = 1 - 0.2 = 0.8 = A1; t=0: delta = 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.9*0.5*0.8 = 0.04
    adv, ret = rl.gae(t([0.0, 1.0, 5.0]), t([0.5, 0.2, 9.0]), t([1, 1, 0]), gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.04, 0.8, 0.0])
    assert ret[0].tolist() == pytest.approx([0.54, 1.0, 0.0])


def test_whitening_uses_the_masked_entries_only():
    x = t([1.0, 2.0, 3.0, 4.0, 100.0])
    out = rl.masked_whiten(x, t([1, 1, 1, 1, 0]))
    sd = math.sqrt(5 / 3)  # unbiased variance of 1..4 about 2.5
    assert out[0].tolist() == pytest.approx([-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd, 0.0], abs=1e-6)
    kept = rl.masked_whiten(x, t([1, 1, 1, 1, 0]), shift_mean=False)
    assert kept[0, :4].mean().item() == pytest.approx(2.5)


def test_grpo_and_rloo_advantages_per_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    g0 = 0.5 / math.sqrt(1 / 3)  # |1 - 0.5| over the unbiased std of [1, 0, 0, 1]
    g1 = 1 / math.sqrt(2)        # |3 - 2| over the unbiased std of [3, 1]
    assert rl.grpo_advantages(scores, group, eps=0).tolist() == pytest.approx([g0, -g0, -g0, g0, g1, -g1])
    assert rl.grpo_advantages(scores, group, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 1, -1])
    # leave-one-out: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3; 3 - 1; 1 - 3
    assert rl.rloo_advantages(scores, group).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 2, -2])
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        rl.rloo_advantages(scores[:1], group[:1])


def test_kl_estimators_by_hand_and_against_the_true_kl():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    log_r = math.log(0.5)
    assert rl.kl_estimate(logp, ref, "k1").item() == pytest.approx(-log_r)
    assert rl.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * log_r ** 2)
    assert rl.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 - log_r)
    # k1 and k3 are unbiased: their mean over samples from q is KL(q || p)
    q, p = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((q * (q / p).log()).sum())
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(q, 200_000, replacement=True, generator=gen)
    for kind in ("k1", "k3"):
        assert rl.kl_estimate(q[x].log(), p[x].log(), kind).mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (rl.kl_estimate(q[x].log(), p[x].log(), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        rl.kl_estimate(logp, ref, "k4")


def test_kl_penalty_on_every_token_and_the_score_on_the_last():
    rewards = rl.kl_penalised_rewards(torch.tensor([2.0]), t([0.1, 0.2, 0.3]), t([1, 1, 0]), coef=0.5)
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1 + 2.0, 0.0])


def test_adaptive_kl_coefficient_moves_at_most_twenty_percent_per_horizon():
    assert rl.adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=1000, n_steps=100) == pytest.approx(0.102)
    assert rl.adaptive_kl_coef(0.1, kl=5.4, target=6.0, horizon=1000, n_steps=100) == pytest.approx(0.099)


def test_clipped_and_dual_clipped_policy_loss_by_hand():
    adv = t([1.0, -1.0, 1.0, -1.0])
    logp = torch.log(t([1.5, 1.5, 0.5, 3.0]))
    old = torch.zeros_like(logp)
    # per token: max(-A r, -A clip(r)) = -1.2 (clipped), 1.5, -0.5, 3.0
    loss, frac = rl.policy_loss(logp, old, adv, torch.ones_like(adv), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 3.0) / 4)
    assert frac.item() == pytest.approx(0.25)
    loss, _ = rl.policy_loss(logp, old, adv, torch.ones_like(adv), clip=0.2, dual_clip=2.0)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 2.0) / 4)  # the last bounded by -c A = 2
    loss, _ = rl.policy_loss(logp, old, adv, t([1, 1, 1, 0]), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5) / 3)
    with pytest.raises(ValueError, match="above 1"):
        rl.policy_loss(logp, old, adv, torch.ones_like(adv), dual_clip=0.5)


def test_clipped_value_loss_by_hand():
    v, old, ret, mask = t([1.0, 0.0]), t([0.5, 0.5]), t([2.0, 0.0]), t([1, 1])
    # clipped values 0.7 and 0.3: max((1-2)^2, (0.7-2)^2) = 1.69; max(0, 0.3^2) = 0.09
    assert rl.value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert rl.value_loss(v, old, ret, mask, clip=None).item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)


def test_entropy_of_uniform_and_certain_tokens():
    logits = torch.stack([torch.zeros(4), torch.tensor([50.0, 0, 0, 0])])[None]  # (1, 2, 4)
    assert rl.entropy(logits, t([1, 0])).item() == pytest.approx(math.log(4))
    assert rl.entropy(logits, t([0, 1])).item() == pytest.approx(0.0, abs=1e-6)
