"""DPO's reference log-probabilities computed once over the prepared data, before training
(`dpo.precompute_reference: true`): a Ray Data pass of the starting model in inference mode
adds a `ref_logps` column (one float per response) beside the tokens of every prepared
row, train and eval. The workers then train with the policy alone: no frozen copy in memory
and no second forward per step.

The pass runs on the workers' devices before they start (as many scoring actors as there
will be workers, each with one worker's CPUs and GPUs), so the starting model must fit on
one device; when it does not, the frozen copy under ZeRO-3 (`precompute_reference: false`)
is the way. The column lives with the prepared data in Ray's object store, so a resumed
job computes it again: one forward pass, cheaper than any training step it saves.
"""

from __future__ import annotations

import time
from typing import Any

COLUMN = "ref_logps"


class Scorer:
    """A Ray Data actor: the starting model, whole, in inference mode; scores batches of rows."""

    def __init__(self, spec: dict[str, Any], use_gpu: bool):
        import torch

        from trainers import models
        from trainers.ds_config import precision
        from trainers.spec import parse_spec

        run = parse_spec(spec)
        plain = run.model_copy(update={"model": run.model.model_copy(update={"peft": None, "freeze": []})})
        model_dir = models.local_model_dir(run.model.path)
        self.pad_id = models.load_tokenizer(model_dir, run.model.trust_remote_code, run.data.chat_template).pad_token_id
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = models.load_model(plain, model_dir, precision(run, use_gpu), {}).to(self.device).eval()
        self.model.requires_grad_(False)

    def __call__(self, table):
        import numpy as np
        import pyarrow as pa
        import torch

        from trainers import preference_data
        from trainers.preference_losses import sequence_logps

        records = preference_data.from_table(table)
        batch = preference_data.collate(records, self.pad_id)
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(batch["input_ids"]).to(self.device),
                             attention_mask=torch.from_numpy(batch["attention_mask"]).to(self.device), use_cache=False)
            logps, _ = sequence_logps(out.logits, torch.from_numpy(batch["labels"]).to(self.device))
        logps = logps.cpu().numpy()
        per_row = [logps[batch["group"] == g].astype(np.float32).tolist() for g in range(len(records))]
        return table.append_column(COLUMN, pa.array(per_row, type=pa.list_(pa.float32())))


def attach(spec, prepared):
    """`prepared` with the reference's log-probs beside every train and eval row (materialized)."""
    import dataclasses

    import ray

    t0 = time.perf_counter()
    r = spec.resources
    gpus = r.worker_gpus(ray.cluster_resources())

    def scored(ds):
        if ds is None:
            return None
        return ds.map_batches(Scorer, batch_size=spec.train.micro_batch_size, batch_format="pyarrow",
                              fn_constructor_kwargs={"spec": spec.model_dump(mode="json"), "use_gpu": bool(gpus)},
                              concurrency=r.workers, num_cpus=r.cpus_per_worker, num_gpus=gpus).materialize()

    out = dataclasses.replace(prepared, train=scored(prepared.train), eval=scored(prepared.eval))
    print(f"reference: log-probs of the starting model precomputed over {prepared.rows} train and "
          f"{prepared.eval_rows} eval prompts in {time.perf_counter() - t0:.1f}s", flush=True)
    return out
