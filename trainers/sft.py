"""Supervised fine-tuning: full-parameter or LoRA, causal LM loss on the label tokens
(assistant turns / responses for instruction data, every token for raw text).

`train_loop_per_worker` runs on every Ray Train worker; the loop's bookkeeping (resume,
logging, eval and checkpoint cadence, export) is `trainers.loop`'s.
"""

from __future__ import annotations

from typing import Any

from trainers import data, loop
from trainers.eval import evaluate


def train_loop_per_worker(config: dict[str, Any]) -> None:
    s = loop.setup(config)
    loop.train(s, lm_step, validate)
    loop.export(s)


def lm_step(s: loop.Session, micro: list[dict[str, Any]]) -> loop.StepOut:
    """One optimizer step of next-token loss over `micro` (its gradient-accumulation micro-batches)."""
    import torch

    attention = data.attn_implementation(s.engine.module)
    loss_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    tokens = 0
    for batch in micro:
        tokens += int(batch["attention_mask"].sum())  # counted before the copy: no GPU sync
        loss = s.engine(**data.model_inputs(batch, s.device, attention)).loss
        s.engine.backward(loss)
        s.engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
        loss_sum += loss.detach().float()
    return loop.StepOut({"loss": loss_sum / len(micro)}, tokens)


def validate(s: loop.Session) -> dict[str, float] | None:
    """Token-weighted eval loss and perplexity over the `eval` split."""
    shard = s.shard("eval")
    if shard is None:
        return None
    return loop.eval_loss_metrics(evaluate(s.engine, shard, s.spec.train.micro_batch_size)) or None
