"""Multi-task fine-tuning: the tasks' sequences mixed by weight or temperature (the
mixture is built once, in `trainers.data`), one causal LM loss, and an eval loss per task.

The step is supervised fine-tuning's; what is multitask's own is counting the rows each
task contributes (the mixture actually trained on, `rows/<task>` on every metrics line)
and evaluating each task on its own eval set, with the overall `eval_loss` weighted by the
tasks' shares.
"""

from __future__ import annotations

from typing import Any

from trainers import loop
from trainers.eval import evaluate
from trainers.sft import lm_step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    s = loop.setup(config)
    loop.train(s, step, validate)
    loop.export(s)


def step(s: loop.Session, micro: list[dict[str, Any]]) -> loop.StepOut:
    import torch

    out = lm_step(s, micro)
    names = list(s.config["tasks"])
    rows = torch.bincount(torch.cat([b["task_id"] for b in micro]).long(), minlength=len(names))
    out.counts = {f"rows/{name}": int(n) for name, n in zip(names, rows.tolist())}
    return out


def validate(s: loop.Session) -> dict[str, float] | None:
    """`eval_loss/<task>` for every task with eval data, and `eval_loss` (and perplexity):
    their mean weighted by the tasks' shares of the mixture."""
    per_task, weighted, weights = {}, 0.0, 0.0
    for name, share in s.config["tasks"].items():
        shard = s.shard(f"eval_{name}")
        loss = evaluate(s.engine, shard, s.spec.train.micro_batch_size) if shard is not None else None
        if loss is None:
            continue
        per_task[f"eval_loss/{name}"] = round(loss, 6)
        weighted, weights = weighted + share * loss, weights + share
    if not per_task:
        return None
    return {**loop.eval_loss_metrics(weighted / weights), **per_task}
