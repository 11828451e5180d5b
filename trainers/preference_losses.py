"""Losses of the preference family: a reward model from pairs (Bradley-Terry) or from rankings
of K responses (InstructGPT), and a policy from pairs against a reference (DPO, IPO) or without
one (SimPO). Each is a small function of tensors that returns the loss and the metrics TRL logs
for it; none calls a model except `sequence_logps`, which turns a forward pass's logits into the
per-sequence log-probabilities the DPO family takes.

The formulas are TRL 1.16's, checked number for number against TRL's own code in
tests/unit/test_preference_losses.py: `RewardTrainer.compute_loss`
(trl/trainer/reward_trainer.py), `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) and
`CPOTrainer.cpo_loss` / `get_batch_logps` (trl/experimental/cpo/cpo_trainer.py).

What each loss needs from the caller (`c`/`r`: chosen/rejected, `pi`/`ref`: policy/reference):

    loss             log-probs to pass                      as TRL computes them
    dpo "sigmoid"    summed over completion tokens          DPOTrainer
    dpo "ipo"        summed, plus the token counts; or      DPOTrainer divides the summed log-ratios
                     averaged (both pi and ref) and no      by the completion length; with averaged
                     counts (same loss, other metrics)      inputs the rewards/ and logps/ metrics
                                                            are per-token, TRL's are summed
    simpo            averaged over completion tokens        CPOTrainer (average_log_prob=True)

`sequence_logps(logits, labels)` gives the sums and the token counts,
`sequence_logps(..., average=True)` the averages.

The metrics are detached 0-dim float32 tensors: a caller averages them over ranks (or not)
before calling `.item()`, so a step syncs the device once. TRL averages each rank's batch mean
over the ranks, which is the global mean when every rank holds as many rows.

torch is imported at the top: these run only on the training workers, never on the driver.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor, what: str) -> None:
    if chosen.ndim != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"{what}: chosen and rejected must be 1-D of one length, got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the probability that a label is flipped and must lie in "
                         f"[0, 0.5), got {label_smoothing}")


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-pair -(1-eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss when a label is
    flipped with probability eps (conservative DPO, Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO"). eps = 0 is the plain logistic loss."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


# ---------------------------------------------------------------- log-probabilities

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probability of the label tokens, and how many tokens it sums.

    `logits` (B, T, V) from a causal LM, `labels` (B, T): position t's logits predict
    labels[:, t+1] (the causal shift), and a label equal to `ignore_index` (the prompt, the
    padding) counts for nothing. Returns `(logps, token_counts)`, both (B,): `logps` is the sum
    of the scored tokens' log-probabilities, or their mean when `average` (0 for a sequence that
    scores no token); `token_counts` is the number of scored tokens (int64).

    Computed in float32 whatever the logits' dtype, one sequence at a time so that the float32
    copy of the logits is one row, not the batch (log p = logit - logsumexp(logits), as TRL's
    `selective_log_softmax` does in float32).

    Matches TRL 1.16: the sum is DPOTrainer's `chosen_logps`/`rejected_logps`. DPOTrainer has no
    `concatenated_forward` or `get_batch_logps` any more; it calls the model with the fused LM
    head of `trl.trainer.utils.add_fused_lm_head`, whose `log_probs` are the per-token
    log-probabilities of labels[:, 1:] (0 where -100), and sums them over the sequence. The fused
    head accumulates the hidden-state x LM-head products in float32, so with a bf16 model it can
    differ from these bf16 logits upcast by the bf16 rounding of the logits. The sum and the mean
    both equal `CPOTrainer.get_batch_logps` (trl/experimental/cpo) with
    `average_log_prob=False`/`True` (the mean is what its SimPO and IPO use), except that TRL's
    mean of a sequence with no scored token is NaN (0/0).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (batch, seq, vocab) and labels (batch, seq), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe = targets.masked_fill(~mask, 0)
    rows = []
    for row, target in zip(logits[:, :-1], safe):  # (T-1, V) float32 at a time
        row = row.float()
        rows.append(row.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    per_token = torch.stack(rows).masked_fill(~mask, 0.0)
    counts = mask.sum(dim=-1)
    logps = per_token.sum(dim=-1)
    if average:
        logps = logps / counts.clamp(min=1)
    return logps, counts


# ---------------------------------------------------------------- reward models

def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coefficient: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Pairwise reward-model loss (Bradley & Terry 1952; as a reward model, Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback").

        loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coefficient * mean((r_c + r_r)^2)

    `r_chosen`, `r_rejected` (N,): the rewards of each pair's two responses. `margin` (N,),
    optional: how much better the chosen response is (Llama 2's margin loss, Touvron et al.
    2023); the chosen reward must beat the rejected one by it. `center_coefficient`, optional:
    the auxiliary loss that keeps rewards centred on zero (Eisenstein et al. 2023, "Helping or
    Herding?"); TRL's `RewardConfig.center_rewards_coefficient`, which suggests 0.01. None (not
    0) leaves the term out, as TRL does.

    Metrics, as TRL logs them: `accuracy` (fraction with r_c > r_r, strictly), `margin` (mean
    r_c - r_r, without the data's margin); and `chosen`, `rejected`, the mean rewards (TRL logs
    min/mean/max over both instead). Exactly `RewardTrainer.compute_loss` of TRL 1.16.
    """
    _check_pair(r_chosen, r_rejected, "bradley_terry")
    r_c, r_r = r_chosen.float(), r_rejected.float()
    diff = r_c - r_r
    if margin is not None:
        if margin.shape != r_c.shape:
            raise ValueError(f"bradley_terry: margin must be ({r_c.shape[0]},), got {tuple(margin.shape)}")
        loss = -F.logsigmoid(diff - margin.to(diff.dtype)).mean()
    else:
        loss = -F.logsigmoid(diff).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * torch.mean((r_c + r_r) ** 2)
    with torch.no_grad():
        metrics = {"accuracy": (r_c > r_r).float().mean(), "margin": diff.mean(),
                   "chosen": r_c.mean(), "rejected": r_r.mean()}
    return loss, metrics


def ranking_pairs(groups: Sequence[Sequence[float]] | torch.Tensor, *,
                  by: Literal["rank", "score"]) -> torch.Tensor:
    """The (better, worse) index pairs of every strict preference within each prompt's responses.

    `groups[g]` holds prompt g's K_g responses, in the order their rewards sit in the flat
    reward batch (N = sum K_g; a (G, K) tensor is G groups of K). With `by="rank"` the values
    are ranks, lower is better (1 = best; a tie shares a rank, e.g. [1, 2, 2, 4]); with
    `by="score"`, scores, higher is better (equal scores are a tie). `by` has no default:
    mistaking one for the other would silently train the reverse preference.

    Returns a (P, 2) int64 tensor of indices into the flat batch, pairs within a prompt only,
    each pair once, ordered by group then (i, j) with i < j in the group: K(K-1)/2 pairs for a
    prompt without ties, fewer with them, none for a prompt whose responses all tie.
    """
    if by not in ("rank", "score"):
        raise ValueError(f"ranking_pairs: by must be 'rank' or 'score', got {by!r}")
    if isinstance(groups, torch.Tensor):
        if groups.ndim != 2:
            raise ValueError(f"ranking_pairs: a tensor of groups must be (groups, K), got {tuple(groups.shape)}")
        groups = groups.tolist()
    pairs: list[tuple[int, int]] = []
    offset = 0
    for g, values in enumerate(groups):
        values = values.tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]
        if any(math.isnan(v) for v in values):
            raise ValueError(f"ranking_pairs: group {g} has a NaN {by}")
        # goodness: higher is better whichever `by`
        good = [-v for v in values] if by == "rank" else values
        for i in range(len(good)):
            for j in range(i + 1, len(good)):
                if good[i] > good[j]:
                    pairs.append((offset + i, offset + j))
                elif good[j] > good[i]:
                    pairs.append((offset + j, offset + i))
        offset += len(good)
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def ranking_loss(rewards: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Reward-model loss over rankings of K responses per prompt (Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback", eq. 1):

        loss = mean over pairs (b, w) of -log sigmoid(r_b - r_w)

    `rewards` (N,): one reward per response, the groups of `ranking_pairs` laid end to end;
    `pairs` (P, 2): `ranking_pairs`'s (better, worse) indices.

    InstructGPT scales each prompt's sum over its C(K,2) pairs by 1/C(K,2) and averages over
    prompts. This takes the mean over all pairs of the batch instead: the same when every prompt
    has as many pairs (the same K, no ties); otherwise a prompt weighs by its number of strict
    pairs. Raises ValueError when there is no pair: a batch whose responses all tie has nothing
    to learn, and the data check should turn such groups away before training.

    Metrics: `accuracy` (fraction of pairs with r_b > r_w), `margin` (mean r_b - r_w), `pairs`
    (P, as a float tensor).
    """
    if rewards.ndim != 1:
        raise ValueError(f"ranking_loss: rewards must be (N,), got {tuple(rewards.shape)}")
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"ranking_loss: pairs must be (P, 2), got {tuple(pairs.shape)}")
    if pairs.shape[0] == 0:
        raise ValueError("ranking_loss: no strict preference pair in the batch (all responses tie)")
    pairs = pairs.to(rewards.device)
    r = rewards.float()
    diff = r[pairs[:, 0]] - r[pairs[:, 1]]
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean(),
                   "pairs": torch.tensor(float(pairs.shape[0]), device=r.device)}
    return loss, metrics


def kendall_tau(pred_scores: torch.Tensor, true_ranks: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between predicted scores (higher is better) and true ranks (lower is
    better, ties shared) of one prompt's K responses; over the last dimension, so (G, K) inputs
    give G values, one per prompt, for the caller to average.

        tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2))

    C, D: concordant and discordant pairs; n0 = K(K-1)/2; n1, n2: pairs tied in the scores, in
    the ranks (a pair tied in either is neither C nor D). 1: the scores order the responses as
    the ranks do; -1: reversed. NaN when either side is all ties (or K < 2), as
    scipy.stats.kendalltau. Pass true scores as ranks by negating them.
    """
    if pred_scores.shape != true_ranks.shape or pred_scores.ndim < 1:
        raise ValueError(f"kendall_tau: scores and ranks must have one shape, got "
                         f"{tuple(pred_scores.shape)} and {tuple(true_ranks.shape)}")
    x = pred_scores.detach().double()
    y = -true_ranks.detach().double()  # goodness: higher is better on both sides
    k = x.shape[-1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=x.device), diagonal=1)
    sx = torch.sign(x.unsqueeze(-1) - x.unsqueeze(-2))[..., upper]  # (..., n0): sign of x_i - x_j, i < j
    sy = torch.sign(y.unsqueeze(-1) - y.unsqueeze(-2))[..., upper]
    s = (sx * sy).sum(-1)  # C - D
    nx = (sx != 0).sum(-1).double()  # n0 - n1
    ny = (sy != 0).sum(-1).double()  # n0 - n2
    return s / torch.sqrt(nx * ny)  # 0 / 0 = NaN when a side is all ties


# ---------------------------------------------------------------- policies from preferences

def _policy_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> Metrics:
    with torch.no_grad():
        return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float,
             loss_type: Literal["sigmoid", "ipo"] = "sigmoid", label_smoothing: float = 0.0,
             chosen_token_counts: torch.Tensor | None = None,
             rejected_token_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Direct preference optimisation against a frozen reference, all inputs (N,).

    With h = (pi_c - ref_c) - (pi_r - ref_r), the policy's log-ratio gain on the chosen
    response over the rejected one:

    "sigmoid" (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
        loss = mean(-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h))
      from summed log-probs (`sequence_logps`). eps = `label_smoothing` is conservative DPO
      (Mitchell 2023): the chance a preference label is flipped, in [0, 0.5). TRL 1.16's
      DPOTrainer no longer smooths its "sigmoid" loss (its `label_smoothing` serves only
      "robust" and "exo_pair"); eps = 0 is exactly its "sigmoid", eps > 0 is TRL's
      CPOTrainer "sigmoid" formula (and older DPOTrainers') on the log-ratios.
    "ipo" (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17; beta is the paper's tau):
        loss = mean((h' - 1/(2 beta))^2)
      on per-token log-ratios, as TRL does (its comment: confirmed with the IPO authors). Either
      pass summed log-probs and `chosen_token_counts`/`rejected_token_counts` (the completion
      lengths, `sequence_logps`'s counts), and h' = (pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r with
      counts clamped to >= 1, exactly TRL's DPOTrainer loss and metrics (TRL counts the
      completion mask before the shift, the same number unless a completion starts at
      position 0, with no prompt before it); or pass log-probs
      already averaged (`average=True`, the policy's and the reference's alike) and no counts:
      the same loss, but the metrics below are then per-token, where TRL's are summed. IPO takes
      no label smoothing.

    Metrics, as TRL's DPOTrainer logs them: `rewards/chosen` = mean beta (pi_c - ref_c),
    `rewards/rejected`, `rewards/margins` (mean chosen - rejected), `rewards/accuracies`
    (fraction with chosen > rejected, strictly), `logps/chosen` = mean pi_c, `logps/rejected`:
    all from the log-probs as passed (summed ones, for TRL's numbers).
    """
    for t in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        _check_pair(policy_chosen_logps, t, "dpo_loss")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    _check_smoothing(label_smoothing)
    pi_c, pi_r = policy_chosen_logps.float(), policy_rejected_logps.float()
    chosen_logratios = pi_c - ref_chosen_logps.float()
    rejected_logratios = pi_r - ref_rejected_logps.float()
    if loss_type == "sigmoid":
        if chosen_token_counts is not None or rejected_token_counts is not None:
            raise ValueError("dpo_loss: token counts are for loss_type='ipo'; 'sigmoid' takes summed log-probs")
        losses = _smoothed_logistic(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("dpo_loss: IPO takes no label smoothing")
        if (chosen_token_counts is None) != (rejected_token_counts is None):
            raise ValueError("dpo_loss: give both chosen_token_counts and rejected_token_counts, or neither")
        c_score, r_score = chosen_logratios, rejected_logratios
        if chosen_token_counts is not None:
            _check_pair(chosen_token_counts, rejected_token_counts, "dpo_loss token counts")
            c_score = c_score / chosen_token_counts.to(c_score).clamp(min=1.0)
            r_score = r_score / rejected_token_counts.to(r_score).clamp(min=1.0)
        losses = (c_score - r_score - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    metrics = _policy_metrics(beta * chosen_logratios, beta * rejected_logratios, pi_c, pi_r)
    return losses.mean(), metrics


def simpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor, *, beta: float,
               gamma: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Simple preference optimisation, reference-free (Meng et al. 2024, "SimPO: Simple
    Preference Optimization with a Reference-Free Reward"), inputs (N,):

        z = beta (avg_c - avg_r) - gamma
        loss = mean(-(1 - eps) log sigmoid(z) - eps log sigmoid(-z))

    `avg_*`: the policy's log-probs averaged over the completion's tokens
    (`sequence_logps(..., average=True)`). The reward is beta * avg, and `gamma` is the target
    margin in those reward units. TRL's `CPOConfig.simpo_gamma` is this gamma already (its
    `cpo_loss` computes logits = (avg_c - avg_r) - simpo_gamma/beta, then log sigmoid(beta
    logits)); the SimPO authors' code takes `gamma_beta_ratio` instead, gamma = beta *
    gamma_beta_ratio (beta=2 with a ratio of 0.5 is gamma=1 here). eps = `label_smoothing`
    as in `dpo_loss`; TRL's CPOTrainer smooths SimPO the same way.

    This is pure SimPO: TRL's CPOTrainer with loss_type="simpo" also adds cpo_alpha (default
    1.0) times the chosen responses' NLL unless cpo_alpha is set to 0; add that term outside.

    Metrics, as TRL's CPOTrainer logs them: `rewards/chosen` = mean beta avg_c,
    `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, `logps/chosen` = mean avg_c,
    `logps/rejected`.
    """
    _check_pair(policy_chosen_avg_logps, policy_rejected_avg_logps, "simpo_loss")
    if not beta > 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}")
    _check_smoothing(label_smoothing)
    avg_c, avg_r = policy_chosen_avg_logps.float(), policy_rejected_avg_logps.float()
    losses = _smoothed_logistic(beta * (avg_c - avg_r) - gamma, label_smoothing)
    return losses.mean(), _policy_metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)
