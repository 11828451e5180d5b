"""Reward modeling and comparative ranking: a causal LM backbone with a scalar head
(`AutoModelForSequenceClassification`, one label, scored at each sequence's last non-pad
token) trained with the Bradley-Terry loss on every ordered pair of a prompt's responses.

A `preference` row is one pair; a `ranking` row holds K responses, and all K(K-1)/2 pairs
with a strict preference train in the same step from ONE forward pass over the K
responses (InstructGPT): each response is encoded once per step, not once per pair. The
exported model loads with `AutoModelForSequenceClassification.from_pretrained` and scores
the responses of a later `ppo` run.
"""

from __future__ import annotations

import functools
from typing import Any

from trainers import data, loop
from trainers.preference_losses import bradley_terry, kendall_tau


def train_loop_per_worker(config: dict[str, Any]) -> None:
    s = loop.setup(config)
    loop.train(s, step, validate, collate=functools.partial(data.collate_comparisons, pad_id=s.tokenizer.pad_token_id))
    loop.export(s)


def rewards(s: loop.Session, batch: dict[str, Any]):
    """One scalar per sequence of the micro-batch (float32)."""
    out = s.engine(input_ids=batch["input_ids"].to(s.device), attention_mask=batch["attention_mask"].to(s.device),
                   use_cache=False)
    return out.logits.squeeze(-1).float()


def pair_loss(s: loop.Session, batch: dict[str, Any], r):
    pairs = batch["pairs"].to(s.device)
    margin = batch["margin"].to(s.device).float() if "margin" in batch else None
    return bradley_terry(r[pairs[:, 0]], r[pairs[:, 1]], margin=margin,
                         center_coefficient=s.spec.reward.center_coefficient)


def step(s: loop.Session, micro: list[dict[str, Any]]) -> loop.StepOut:
    import torch

    sums = {k: torch.zeros((), device=s.device) for k in ("loss", "accuracy", "margin")}
    tokens = sequences = pairs = 0
    for batch in micro:
        r = rewards(s, batch)
        loss, metrics = pair_loss(s, batch, r)
        s.engine.backward(loss)
        s.engine.step()
        for k, v in (("loss", loss.detach()), ("accuracy", metrics["accuracy"]), ("margin", metrics["margin"])):
            sums[k] += v.float() / len(micro)
        tokens += int(batch["attention_mask"].sum())
        sequences, pairs = sequences + len(batch["input_ids"]), pairs + len(batch["pairs"])
    # Sequences encoded and pairs trained, over the run: a ranking step encodes each response once.
    return loop.StepOut(sums, tokens, counts={"sequences": sequences, "pairs": pairs})


def validate(s: loop.Session) -> dict[str, float] | None:
    """Pairwise accuracy, mean margin and Bradley-Terry loss over the eval pairs, and for
    rankings Kendall's tau between the predicted order and the labelled one, per prompt."""
    import torch
    import torch.distributed as dist

    shard = s.shard("eval")
    if shard is None:
        return None
    s.engine.eval()
    # loss sum, correct pairs, margin sum, pairs, tau sum, prompts with a tau
    totals = torch.zeros(6, dtype=torch.float64, device=s.device)
    with torch.no_grad():
        for columns in shard.iter_batches(batch_size=s.spec.train.micro_batch_size, batch_format="numpy"):
            batch = data.collate_comparisons(columns, s.tokenizer.pad_token_id)
            r = rewards(s, batch)
            pairs = batch["pairs"].to(s.device)
            diff = r[pairs[:, 0]] - r[pairs[:, 1]]
            totals[:4] += torch.stack([-torch.nn.functional.logsigmoid(diff).sum(), (diff > 0).sum(), diff.sum(),
                                       torch.tensor(float(len(pairs)), device=s.device)]).double()
            group, rank = batch["group"].to(s.device), batch["rank"].to(s.device)
            for g in torch.unique(group):
                members = group == g
                if int(members.sum()) > 2:  # a ranking: order agreement beyond the pair
                    tau = kendall_tau(r[members], rank[members].float())
                    if not torch.isnan(tau):
                        totals[4:] += torch.stack([tau.double(), torch.ones((), dtype=torch.float64,
                                                                             device=s.device)])
    dist.all_reduce(totals)
    if totals[3] == 0:
        return None
    out = {"eval_loss": round(float(totals[0] / totals[3]), 6), "eval_accuracy": round(float(totals[1] / totals[3]), 6),
           "eval_margin": round(float(totals[2] / totals[3]), 6)}
    if totals[5] > 0:
        out["eval_kendall_tau"] = round(float(totals[4] / totals[5]), 6)
    return out
