"""Direct preference optimization (DPO, IPO) and the reference-free SimPO on preference
pairs: the policy learns to raise the log-probability of the chosen response over the
rejected one, relative to a frozen reference (the model the run starts from).

The reference costs no second copy with LoRA: it is the policy with its adapters disabled.
With full fine-tuning it is a frozen copy in inference mode under the same ZeRO stage when
that is 3 (partitioned like the policy), else whole on each worker (as TRL's
`prepare_deepspeed`), or, with `dpo.precompute_reference`, log-probs computed once over the
data before training (`trainers.reference_logps`). SimPO has no reference. The losses are `trainers.preference_losses`'.
"""

from __future__ import annotations

import functools
from typing import Any

from trainers import data, loop, models
from trainers.engine import frozen_engine, inference_config
from trainers.preference_losses import dpo_loss, sequence_logps, simpo_loss


def train_loop_per_worker(config: dict[str, Any]) -> None:
    s = loop.setup(config)
    reference = build_reference(s)
    if s.rank == 0:
        held = models.parameter_counts(s.engine.module)[1] + (
            models.parameter_counts(reference.module)[1] if hasattr(reference, "module") else 0)
        what = {None: "none (simpo)", "adapters-off": "the policy with its adapters disabled (no second copy)",
                "precomputed": "log-probs precomputed over the data (no second copy)"}
        print(f"reference: {what.get(reference, 'a frozen copy of the starting model')}; {held:,} parameters "
              f"held by this worker", flush=True)
    loop.train(s, functools.partial(step, reference=reference), functools.partial(validate, reference=reference),
               collate=functools.partial(data.collate_comparisons, pad_id=s.tokenizer.pad_token_id))
    loop.export(s)


def build_reference(s: loop.Session):
    """What scores the reference log-probs: None (SimPO), "precomputed" (a column of the
    data), "adapters-off" (LoRA), or a frozen DeepSpeed engine of the starting model."""
    if s.spec.dpo.loss == "simpo":
        return None
    if s.spec.dpo.precompute_reference:
        return "precomputed"
    if s.lora:
        return "adapters-off"
    ref_config = inference_config(s.ds_config)
    plain = s.spec.model_copy(update={"model": s.spec.model.model_copy(update={"peft": None, "freeze": []})})
    engine = frozen_engine(models.load_model(plain, s.model_dir, s.dtype, ref_config), ref_config)
    return engine


def _logps(s: loop.Session, model, batch: dict[str, Any], average: bool):
    out = model(input_ids=batch["input_ids"].to(s.device), attention_mask=batch["attention_mask"].to(s.device),
                use_cache=False)
    return sequence_logps(out.logits, batch["labels"].to(s.device), average=average)


def pair_loss(s: loop.Session, batch: dict[str, Any], reference):
    """The loss and TRL's metrics of one micro-batch of pairs: one forward of the policy (and
    one of the reference) over both responses of every pair."""
    import torch

    d = s.spec.dpo
    pairs = batch["pairs"].to(s.device)
    logps, counts = _logps(s, s.engine, batch, average=d.loss == "simpo")
    chosen, rejected = logps[pairs[:, 0]], logps[pairs[:, 1]]
    if reference is None:
        return simpo_loss(chosen, rejected, beta=d.beta, gamma=d.gamma, label_smoothing=d.label_smoothing)
    with torch.no_grad():
        if reference == "precomputed":
            ref = batch["ref_logps"].to(s.device)
        elif reference == "adapters-off":
            with s.engine.module.disable_adapter():
                ref, _ = _logps(s, s.engine, batch, average=False)
        else:
            ref, _ = _logps(s, reference, batch, average=False)
    ipo = d.loss == "ipo"
    return dpo_loss(chosen, rejected, ref[pairs[:, 0]], ref[pairs[:, 1]], beta=d.beta, loss_type=d.loss,
                    label_smoothing=d.label_smoothing, chosen_token_counts=counts[pairs[:, 0]] if ipo else None,
                    rejected_token_counts=counts[pairs[:, 1]] if ipo else None)


LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def step(s: loop.Session, micro: list[dict[str, Any]], reference) -> loop.StepOut:
    import torch

    sums = {k: torch.zeros((), device=s.device) for k in ("loss", *LOGGED)}
    tokens = 0
    for batch in micro:
        loss, metrics = pair_loss(s, batch, reference)
        s.engine.backward(loss)
        s.engine.step()
        sums["loss"] += loss.detach().float() / len(micro)
        for k in LOGGED:
            sums[k] += metrics[k].float() / len(micro)
        tokens += int(batch["attention_mask"].sum())
    return loop.StepOut(sums, tokens, counts={"pairs": sum(len(b["pairs"]) for b in micro)})


def validate(s: loop.Session, reference) -> dict[str, float] | None:
    """The loss and TRL's reward metrics over the eval pairs, averaged over micro-batches and ranks."""
    import torch
    import torch.distributed as dist

    shard = s.shard("eval")
    if shard is None:
        return None
    s.engine.eval()
    totals = torch.zeros(len(LOGGED) + 2, dtype=torch.float64, device=s.device)
    with torch.no_grad():
        for columns in shard.iter_batches(batch_size=s.spec.train.micro_batch_size, batch_format="numpy"):
            loss, metrics = pair_loss(s, data.collate_comparisons(columns, s.tokenizer.pad_token_id), reference)
            totals += torch.stack([loss.double(), *(metrics[k].double() for k in LOGGED),
                                   torch.ones((), dtype=torch.float64, device=s.device)])
    dist.all_reduce(totals)
    if totals[-1] == 0:
        return None
    mean = (totals[:-1] / totals[-1]).tolist()
    return {"eval_loss": round(mean[0], 6), **{f"eval_{k}": round(v, 6) for k, v in zip(LOGGED, mean[1:])}}
