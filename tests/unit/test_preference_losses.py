"""Preference losses (trainers.preference_losses): each loss on tensors small enough that the
expected number is written out here with `math`, then the same inputs through TRL 1.16's own
code (RewardTrainer.compute_loss, DPOTrainer._compute_loss on a tiny Llama with TRL's fused LM
head, CPOTrainer.cpo_loss and get_batch_logps), which must give the same loss and metrics."""

from __future__ import annotations

import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests` is not a package root under plain `pytest`
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")

from trainers.preference_losses import (  # noqa: E402
    bradley_terry,
    dpo_loss,
    kendall_tau,
    ranking_loss,
    ranking_pairs,
    sequence_logps,
    simpo_loss,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops: on a busy 2-core machine two threads run many times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nls(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return -math.log(1 / (1 + math.exp(-x)))


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol


# ---------------------------------------------------------------- by hand

def test_sequence_logps_by_hand():
    # Row 0: position 0 predicts labels[1] = 0 from logits [0, ln 3]: p = 1/4; position 1 predicts
    # labels[2] = 1 from [1, 1]: p = 1/2; the last position predicts nothing. Row 1 scores no token.
    logits = torch.tensor([[[0.0, math.log(3)], [1.0, 1.0], [5.0, -5.0]],
                           [[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1], [7, -100, -100]])
    logps, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [2, 0] and counts.dtype == torch.int64
    assert close(logps[0], math.log(1 / 4) + math.log(1 / 2)) and logps[1] == 0
    avg, _ = sequence_logps(logits, labels, average=True)
    assert close(avg[0], -math.log(8) / 2) and avg[1] == 0  # no scored token: 0, not NaN
    own, _ = sequence_logps(logits, labels.masked_fill(labels == -100, -1), ignore_index=-1)
    assert torch.equal(own, logps)
    half, _ = sequence_logps(logits.bfloat16(), labels)
    assert half.dtype == torch.float32


def test_bradley_terry_by_hand():
    r_c, r_r = t(2.0, 0.0), t(0.5, 1.0)
    loss, m = bradley_terry(r_c, r_r)
    assert close(loss, (nls(1.5) + nls(-1.0)) / 2)
    assert close(m["accuracy"], 0.5) and close(m["margin"], 0.25)
    assert close(m["chosen"], 1.0) and close(m["rejected"], 0.75)

    loss, m = bradley_terry(r_c, r_r, margin=t(1.0, 0.5))  # the chosen must win by the margin
    assert close(loss, (nls(0.5) + nls(-1.5)) / 2) and close(m["margin"], 0.25)  # metric: no data margin

    loss, _ = bradley_terry(r_c, r_r, center_coefficient=0.01)  # + 0.01 mean((r_c + r_r)^2)
    assert close(loss, (nls(1.5) + nls(-1.0)) / 2 + 0.01 * (2.5 ** 2 + 1.0 ** 2) / 2)
    assert close(bradley_terry(r_c, r_r, center_coefficient=0.0)[0], bradley_terry(r_c, r_r)[0])

    r_c.requires_grad_(True)
    bradley_terry(r_c, r_r)[0].backward()
    assert close(r_c.grad[0], -(1 - 1 / (1 + math.exp(-1.5))) / 2)  # d/dx -log sigmoid(x) = sigmoid(x) - 1
    with pytest.raises(ValueError, match="1-D of one length"):
        bradley_terry(t(1.0, 2.0), t(1.0))


def test_ranking_pairs_ranks_with_ties():
    # ranks 1, 2, 2, 4: every pair but the tied (1, 2)
    assert ranking_pairs([[1, 2, 2, 4]], by="rank").tolist() == [[0, 1], [0, 2], [0, 3], [1, 3], [2, 3]]
    # a second group's indices follow the first's in the flat batch; (better, worse) either way round
    assert ranking_pairs([[1, 2], [2, 1]], by="rank").tolist() == [[0, 1], [3, 2]]
    # ranks and scores are opposite ways round
    assert torch.equal(ranking_pairs([[1, 2, 3]], by="rank"), ranking_pairs([[3.0, 2.0, 1.0]], by="score"))


def test_ranking_pairs_scores_with_ties():
    pairs = ranking_pairs([torch.tensor([0.1, 0.9, 0.5]), [3.0, 3.0]], by="score")
    assert pairs.tolist() == [[1, 0], [2, 0], [1, 2]]  # the all-tied second group adds none
    assert pairs.dtype == torch.long
    assert ranking_pairs([[1.0, 1.0]], by="score").shape == (0, 2)
    no_ties = ranking_pairs(torch.randn(3, 5), by="score")  # (G, K) tensor: G * K(K-1)/2 pairs
    assert no_ties.shape == (3 * 10, 2)
    with pytest.raises(TypeError):
        ranking_pairs([[1, 2]])  # `by` has no default
    with pytest.raises(ValueError, match="NaN"):
        ranking_pairs([[1.0, float("nan")]], by="score")


def test_ranking_loss_by_hand():
    rewards = t(1.0, 0.0, 0.5, 2.0)
    pairs = ranking_pairs([[1, 2, 2, 4]], by="rank")  # (0,1) (0,2) (0,3) (1,3) (2,3)
    diffs = [1.0 - 0.0, 1.0 - 0.5, 1.0 - 2.0, 0.0 - 2.0, 0.5 - 2.0]
    loss, m = ranking_loss(rewards, pairs)
    assert close(loss, sum(nls(d) for d in diffs) / 5)  # mean over the batch's pairs
    assert close(m["accuracy"], 2 / 5) and close(m["margin"], sum(diffs) / 5) and m["pairs"] == 5
    with pytest.raises(ValueError, match="no strict preference"):
        ranking_loss(rewards, ranking_pairs([[1, 1, 1, 1]], by="rank"))


def test_kendall_tau_by_hand():
    # scores 3,2,2,1 against ranks 1,2,3,3. Pairs: (0,1) (0,2) (0,3) (1,3) concordant; (1,2) tied
    # in the scores, (2,3) tied in the ranks. tau_b = (4 - 0) / sqrt((6 - 1)(6 - 1)) = 0.8
    assert close(kendall_tau(t(3, 2, 2, 1), t(1, 2, 3, 3)), 0.8)
    # scores 1,3,2 against ranks 1,2,3: (0,1) and (0,2) discordant, (1,2) concordant: (1 - 2)/3
    assert close(kendall_tau(t(1, 3, 2), t(1, 2, 3)), -1 / 3)
    both = kendall_tau(torch.stack([t(3, 2, 1), t(1, 2, 3)]), torch.stack([t(1, 2, 3), t(1, 2, 3)]))
    assert both.tolist() == [1.0, -1.0]  # one value per prompt
    assert math.isnan(kendall_tau(t(1, 1, 1), t(1, 2, 3)))  # all ties: undefined, as scipy


def test_dpo_sigmoid_by_hand():
    # h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2.5) = 1.5; beta h = 0.75
    args = t(-1.0), t(-3.0), t(-2.0), t(-2.5)
    loss, m = dpo_loss(*args, beta=0.5)
    assert close(loss, nls(0.75))
    expected = {"rewards/chosen": 0.5, "rewards/rejected": -0.25, "rewards/margins": 0.75,
                "rewards/accuracies": 1.0, "logps/chosen": -1.0, "logps/rejected": -3.0}
    assert {k: round(float(v), 6) for k, v in m.items()} == expected
    loss, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)  # cDPO: a label flips with p = 0.1
    assert close(loss, 0.9 * nls(0.75) + 0.1 * nls(-0.75))


def test_dpo_ipo_by_hand():
    # beta 0.5: target 1/(2 beta) = 1. Per-token log-ratios: chosen 1/2 tokens, rejected -0.5/4.
    args = t(-1.0), t(-3.0), t(-2.0), t(-2.5)
    counts = torch.tensor([2]), torch.tensor([4])
    loss, m = dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_token_counts=counts[0],
                       rejected_token_counts=counts[1])
    assert close(loss, (0.5 + 0.125 - 1) ** 2) and close(m["rewards/chosen"], 0.5)  # metrics: summed
    averaged = t(-1.0 / 2), t(-3.0 / 4), t(-2.0 / 2), t(-2.5 / 4)
    loss_avg, m_avg = dpo_loss(*averaged, beta=0.5, loss_type="ipo")
    assert close(loss_avg, loss) and close(m_avg["rewards/chosen"], 0.25)  # metrics: per token
    zero = dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_token_counts=torch.tensor([0]),
                    rejected_token_counts=torch.tensor([1]))[0]
    assert close(zero, (1.5 - 1) ** 2)  # a count of 0 divides by 1
    with pytest.raises(ValueError, match="no label smoothing"):
        dpo_loss(*args, beta=0.5, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, beta=0.5, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(*args, beta=0.5, label_smoothing=0.5)


def test_simpo_by_hand():
    # z = beta (avg_c - avg_r) - gamma = 2 (-0.5 + 1) - 0.5 = 0.5
    loss, m = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    assert close(loss, nls(0.5))
    assert close(m["rewards/chosen"], -1.0) and close(m["rewards/rejected"], -2.0)
    assert close(m["rewards/margins"], 1.0) and close(m["logps/chosen"], -0.5)
    loss, _ = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert close(loss, 0.8 * nls(0.5) + 0.2 * nls(-0.5))


# ---------------------------------------------------------------- TRL's own code computes the number

class _Accelerator:
    """What the loss methods read of `accelerate.Accelerator` on one process."""
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trainer(cls, **attrs):
    """A TRL trainer without its __init__: only the attributes its loss method reads (checked
    against the TRL 1.16 source), so no model is loaded, no dataset prepared, no Accelerator
    started."""
    trainer = object.__new__(cls)
    trainer.accelerator = _Accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    for key, value in attrs.items():
        setattr(trainer, key, value)
    return trainer


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    with warnings.catch_warnings():  # "You are importing from 'trl.experimental'": CPOTrainer lives there
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.reward_trainer import RewardTrainer
    from trl.trainer.utils import add_fused_lm_head
    return SimpleNamespace(CPOTrainer=CPOTrainer, DPOTrainer=DPOTrainer, RewardTrainer=RewardTrainer,
                           add_fused_lm_head=add_fused_lm_head)


class _RewardHead(torch.nn.Module):
    """A reward model whose scores are given: (2N, 1), the chosen rows first, as TRL's collator
    lays them out."""

    def __init__(self, rewards):
        super().__init__()
        self.rewards = rewards

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        return SimpleNamespace(logits=self.rewards.unsqueeze(-1))


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (False, 0.01), (True, 0.05)])
def test_bradley_terry_matches_trl_reward_trainer(trl, margin, center):
    gen = torch.Generator().manual_seed(0)
    n = 6
    rewards = torch.randn(2 * n, generator=gen) * 2
    inputs = {"input_ids": torch.ones(2 * n, 3, dtype=torch.long), "attention_mask": torch.ones(2 * n, 3)}
    if margin:
        inputs["margin"] = torch.rand(n, generator=gen)
    model = _RewardHead(rewards).eval()
    trainer = _trainer(trl.RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=center))
    expected = trainer.compute_loss(model, dict(inputs))
    logged = trainer._metrics["eval"]

    loss, m = bradley_terry(rewards[:n], rewards[n:], margin=inputs.get("margin"), center_coefficient=center)
    assert close(loss, expected, 1e-5)
    assert close(m["accuracy"], logged["accuracy"][0], 1e-6) and close(m["margin"], logged["margin"][0], 1e-5)
    assert close((m["chosen"] + m["rejected"]) / 2, logged["mean_reward"][0], 1e-5)


def _tiny_policy(trl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    # what DPOTrainer.__init__ does to the policy
    trl.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _preference_batch(n=3, length=9, vocab=48):
    """DPOTrainer's padded batch: n chosen rows then n rejected, right-padded, each a prompt of
    2-4 tokens then a completion; and made-up precomputed reference log-probs (summed)."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, vocab, (2 * n, length), generator=gen)
    attention = torch.zeros(2 * n, length, dtype=torch.long)
    completion = torch.zeros(2 * n, length, dtype=torch.long)
    for row in range(2 * n):
        prompt, total = 2 + row % 3, length - (row * 2) % 5
        attention[row, :total] = 1
        completion[row, prompt:total] = 1
    input_ids = input_ids.masked_fill(attention == 0, 0)
    ref = -torch.rand(2 * n, generator=gen) * 20 - 10
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
            "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}


def _dpo_trainer(trl, model, loss_type, beta):
    return _trainer(trl.DPOTrainer, model=model, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                    precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                    label_smoothing=0.0, use_weighting=False, aux_loss_enabled=False)


def _our_logps(model, batch, average=False):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, counts = sequence_logps(logits, labels, average=average)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:], counts[:n], counts[n:]


def test_sequence_logps_matches_trl_fused_head(trl):
    model, batch = _tiny_policy(trl), _preference_batch()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        fused = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                      fused_lm_head=True).log_probs.sum(dim=1)  # DPOTrainer's logps
    c, r, _, _ = _our_logps(model, batch)
    assert torch.allclose(torch.cat([c, r]), fused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_trl_get_batch_logps(trl, average):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 10, 50, generator=gen) * 3
    labels = torch.randint(0, 50, (4, 10), generator=gen)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    labels[2, ::2] = -100
    expected = trl.CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=average)
    ours, _ = sequence_logps(logits, labels, average=average)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_matches_trl_dpo_trainer(trl, loss_type, beta):
    model, batch = _tiny_policy(trl), _preference_batch()
    trainer = _dpo_trainer(trl, model, loss_type, beta)
    with torch.no_grad():
        expected = trainer._compute_loss(model, dict(batch), return_outputs=False)
    logged = {k: v[0] for k, v in trainer._metrics["eval"].items()}

    c, r, n_c, n_r = _our_logps(model, batch)
    ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    counts = {"chosen_token_counts": n_c, "rejected_token_counts": n_r} if loss_type == "ipo" else {}
    loss, m = dpo_loss(c, r, ref_c, ref_r, beta=beta, loss_type=loss_type, **counts)
    assert close(loss, expected, 1e-5), (float(loss), float(expected))
    for key, value in m.items():
        assert close(value, logged[key], 1e-5), key

    if loss_type == "ipo":  # or per-token log-probs, the reference's too, and no counts: the same loss
        avg_c, avg_r, _, _ = _our_logps(model, batch, average=True)
        loss_avg, _ = dpo_loss(avg_c, avg_r, ref_c / n_c, ref_r / n_r, beta=beta, loss_type="ipo")
        assert close(loss_avg, expected, 1e-5)


def _cpo_trainer(trl, loss_type, beta, label_smoothing, simpo_gamma=None):
    trainer = _trainer(trl.CPOTrainer, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, alpha=0.0)
    if simpo_gamma is not None:
        trainer.simpo_gamma = simpo_gamma
    return trainer


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_label_smoothing_matches_trl_cpo_sigmoid(trl, label_smoothing):
    """TRL 1.16's DPOTrainer does not smooth "sigmoid"; its CPOTrainer does, with the cDPO
    formula on the policy's log-ratio difference. Fed the log-ratios against the reference, that
    is DPO's h."""
    gen = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-torch.rand(5, generator=gen) * 30 for _ in range(4))
    trainer = _cpo_trainer(trl, "sigmoid", 0.2, label_smoothing)
    losses, _, _ = trainer.cpo_loss(pc - rc, pr - rr)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=label_smoothing)
    assert close(loss, losses.mean(), 1e-5)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.375, 0.0), (1.0, 0.3, 0.1)])
def test_simpo_matches_trl_cpo_simpo(trl, beta, gamma, label_smoothing):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 8, 30, generator=gen) * 2
    labels = torch.randint(0, 30, (6, 8), generator=gen)
    labels[:, :2] = -100
    labels[3, 5:] = -100
    avg = trl.CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True)  # what CPO feeds SimPO
    ours_avg, _ = sequence_logps(logits, labels, average=True)
    trainer = _cpo_trainer(trl, "simpo", beta, label_smoothing, simpo_gamma=gamma)  # simpo_gamma is our gamma
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(avg[:3], avg[3:])
    loss, m = simpo_loss(ours_avg[:3], ours_avg[3:], beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    assert close(loss, losses.mean(), 1e-5)
    assert close(m["rewards/chosen"], chosen_rewards.mean(), 1e-5)
    assert close(m["rewards/margins"], (chosen_rewards - rejected_rewards).mean(), 1e-5)
    assert close(m["rewards/accuracies"], (chosen_rewards > rejected_rewards).float().mean())
