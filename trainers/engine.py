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


def apply_spec_hyperparameters(engine, spec: AnyRun) -> None:
    """After a restore: the spec's learning rate, weight decay and betas win over those the
    checkpoint's optimizer and schedule state carried. Loading a checkpoint puts back the
    old param groups and the schedule's base rates, so a trial that population-based
    training moved to a new learning rate would otherwise go on at the donor's."""
    t = spec.train
    optimizer, scheduler = engine.optimizer, engine.lr_scheduler
    for group in optimizer.param_groups:
        group["weight_decay"] = t.weight_decay
        if "betas" in group:
            group["betas"] = tuple(t.betas)
    lambdas = getattr(scheduler, "lr_lambdas", None)  # the spec's schedule (a LambdaLR)
    if lambdas is not None:
        scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, lambdas):
            group["initial_lr"] = t.lr
            group["lr"] = t.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
