"""Evaluation helpers: token-weighted eval loss over a dataset shard, averaged over ranks."""

from __future__ import annotations

from trainers.data import IGNORE, attn_implementation, model_inputs


def evaluate(engine, shard, micro_batch_size: int) -> float | None:
    """Mean next-token loss over every label token of the eval shard (all ranks).

    Every rank runs the same number of forward passes (Ray splits shards equally: 
    equal row counts, so equal batch counts): with ZeRO-3 each forward gathers parameters
    collectively. None when the eval split has no label tokens."""
    import torch
    import torch.distributed as dist

    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, token count
    attention = attn_implementation(engine.module)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size):
            # The training step's inputs (packed rows: one example attends to itself), but
            # the loss is taken here, summed over tokens: the model is not given the labels.
            inputs = model_inputs(batch, engine.device, attention)
            labels = inputs.pop("labels")[:, 1:]
            logits = engine(**inputs).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
            totals += torch.stack([loss.double(), (labels != IGNORE).sum().double()])
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None
