"""Model + optimizer + LR schedule -> DeepSpeed engine. The same path on CPU (gloo,
set up by Ray Train) and GPU (nccl)."""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

from trainers.spec import AnyRun


def quiet_workers() -> None:
    """torch 2.13 warns on every DeepSpeed collective (hundreds of KB per run): drop that
    one warning, and DeepSpeed's per-step info logs, nothing else."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed.*", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # tqdm bars of weight loading/saving garble a streamed log; progress is ours to report.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def init_distributed() -> None:
    """Make DeepSpeed adopt the process group Ray Train already created (gloo or nccl).

    Must run before the model is built: ZeRO-3's partitioned construction
    (deepspeed.zero.Init) reads the world size from DeepSpeed's communicator."""
    import deepspeed

    deepspeed.init_distributed()


def build_engine(model, spec: AnyRun, ds_config: dict[str, Any], total_steps: int):
    """`deepspeed.initialize` with what the DeepSpeed config leaves to us: without an
    `optimizer` block we build AdamW (DeepSpeed's CPU Adam under ZeRO-Offload); without a
    `scheduler` block, the spec's schedule. When DeepSpeed builds the optimizer, the
    schedule is handed over as a callable that receives it (what Hugging Face's Trainer does)."""
    import deepspeed
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    t = spec.train
    optimizer = None
    if "optimizer" not in ds_config:
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
        if offload:
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    scheduler = None
    if "scheduler" not in ds_config:
        scheduler = functools.partial(spec_schedule, spec=spec, total_steps=total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=params if optimizer is None else None,
        config=ds_config,
    )
    return engine


def spec_schedule(optimizer, *, spec: AnyRun, total_steps: int):
    """The spec's `lr_schedule` after `warmup_ratio` of the steps, on `optimizer`."""
    from transformers import get_scheduler

    t = spec.train
    return get_scheduler(
        "constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
