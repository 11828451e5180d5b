"""The math of PPO and its critic-free relatives (GRPO, RLOO) as small pure functions on
tensors, for `method: ppo` (issue 21): advantages, the clipped policy and value losses, the
KL estimators and the adaptive KL coefficient. Shapes: per-token tensors are (B, T) over
the response tokens, with `mask` 1 on real response tokens and 0 on padding; per-sequence
tensors are (B,).

The definitions follow OpenRLHF (`models/utils.py`, `trainer/ppo_utils/experience_maker.py`)
and verl (`trainer/ppo/core_algos.py`); where they differ, the docstring says which is kept.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is 1 (over `dim`, or all of it); 0 where nothing is masked in."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`x` normalised to unit variance over its masked-in entries (and zero mean unless
    `shift_mean` is False, which keeps the mean: verl's `masked_whiten` option); the
    variance is the unbiased one, as verl and OpenRLHF compute it."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns), (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, with V and A
    zero past the last real token; returns R_t = A_t + V_t (the value targets). Padding
    (mask 0) gets 0 and does not carry into earlier tokens, as right padding never precedes
    a real token. Whitening, if wanted, comes after (`masked_whiten`)."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def grpo_advantages(scores: torch.Tensor, group: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage per sequence (B,): its score minus its group's mean (the
    responses to one prompt), divided by the group's standard deviation (unbiased, as
    `torch.std` in TRL and verl) unless `scale` is False (Dr. GRPO's unscaled form)."""
    out = torch.empty_like(scores)
    for g in torch.unique(group):
        at = group == g
        s = scores[at]
        centred = s - s.mean()
        out[at] = centred / (s.std() + eps) if scale and s.numel() > 1 else centred
    return out


def rloo_advantages(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO's advantage per sequence (B,): its score minus the mean score of the OTHER
    responses to the same prompt (the leave-one-out baseline; a group needs >= 2)."""
    out = torch.empty_like(scores)
    for g in torch.unique(group):
        at = group == g
        s = scores[at]
        if s.numel() < 2:
            raise ValueError("rloo needs at least 2 responses per prompt (ppo.samples_per_prompt >= 2)")
        out[at] = s - (s.sum() - s) / (s.numel() - 1)
    return out


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy
    (Schulman, "Approximating KL divergence"): with log r = ref_logp - logp,
    k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r - 1) - log r
    (unbiased and non-negative; GRPO's choice)."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}: use k1, k2 or k3")


def kl_penalised_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token rewards (B, T) for KL in the reward: -coef * kl on every response token,
    plus the sequence's score on its last real token (InstructGPT, OpenRLHF's
    `compute_reward`)."""
    mask = mask.to(kl.dtype)
    rewards = -coef * kl * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    return rewards + last.to(kl.dtype) * scores[:, None]


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al.'s adaptive controller: the coefficient grows when the KL runs above
    `target` and shrinks below it, by at most 20 % per `horizon` samples."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n_steps / horizon)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over response tokens: (loss, clip fraction).

    ratio = exp(logp - old_logp); per token max(-A ratio, -A clip(ratio, 1-clip, 1+clip)).
    `dual_clip` c > 1 (Ye et al. 2020) also bounds the loss of a negative advantage by -c A,
    so a ratio far above 1 on a bad token cannot blow it up. The clip fraction is the share
    of tokens where the clipped term is the one taken."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be above 1, got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return masked_mean(loss, mask), masked_mean((clipped > unclipped).to(logp.dtype), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2) -> torch.Tensor:
    """The critic's loss over response tokens: 0.5 (V - R)^2, or with `clip` the larger of
    that and 0.5 (V_clipped - R)^2, V_clipped = V_old + clip(V - V_old, -clip, clip)."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the per-token distributions (B, T, V) over response tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)
