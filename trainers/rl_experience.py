"""From a scored rollout to what PPO's epochs train on (issue 21): per-token advantages and
value targets for `ppo.advantage: gae | grpo | rloo`, with the KL to the reference either
folded into the reward (`kl_in_reward`) or left for the loss. Pure tensor code over
`trainers.rl_losses`; the roles' forward passes happen elsewhere.

Inputs are (N, R) over response tokens unless noted: `old_logp` the actor's log-probs at
sampling time, `ref_logp` the reference's (None: no KL at all), `values` the critic's (gae
only), `scores` (N,) the reward of each whole response, `group` (N,) its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers import rl_losses as rl

ADVANTAGES = ("gae", "grpo", "rloo")


@dataclass
class Experience:
    advantages: torch.Tensor  # (N, R), 0 on padding
    returns: torch.Tensor | None  # (N, R) value targets (gae), else None
    kl: torch.Tensor  # (N, R) per-token KL estimate to the reference (0 without one)


def make_experience(*, scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                    ref_logp: torch.Tensor | None, values: torch.Tensor | None = None, advantage: str = "grpo",
                    gamma: float = 1.0, lam: float = 0.95, whiten: bool = True, kl_coef: float = 0.0,
                    kl_estimator: str = "k1", kl_in_reward: bool = True, scale_rewards: bool = True) -> Experience:
    if advantage not in ADVANTAGES:
        raise ValueError(f"ppo.advantage: {advantage!r}; use one of {', '.join(ADVANTAGES)}")
    mask = mask.to(old_logp.dtype)
    kl = (rl.kl_estimate(old_logp, ref_logp, kl_estimator) * mask if ref_logp is not None
          else torch.zeros_like(old_logp))
    if advantage == "gae":
        if values is None:
            raise ValueError("ppo.advantage gae needs a critic's values")
        rewards = rl.kl_penalised_rewards(scores, kl, mask, kl_coef if kl_in_reward else 0.0)
        adv, returns = rl.gae(rewards, values, mask, gamma, lam)
        return Experience(rl.masked_whiten(adv, mask) if whiten else adv, returns, kl)
    # Outcome methods: a sequence's reward, less the KL summed over its tokens when it is
    # part of the reward, becomes one advantage for every one of its tokens.
    seq = scores - (kl_coef * kl.sum(1) if kl_in_reward else 0.0)
    per_seq = rl.grpo_advantages(seq, group, scale=scale_rewards) if advantage == "grpo" else \
        rl.rloo_advantages(seq, group)
    return Experience(per_seq[:, None] * mask, None, kl)
