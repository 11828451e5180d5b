"""Model + optimizer + LR schedule -> DeepSpeed engine. The same path on CPU (gloo,
set up by Ray Train) and GPU (nccl)."""

from __future__ import annotations

import functools
import logging
import re
import warnings
from typing import Any, Iterable, Sequence

from trainers.spec import AnyRun, ParamGroupSpec


def quiet_workers() -> None:
    """torch 2.13 warns on every DeepSpeed collective (hundreds of KB per run): drop that
    one warning, and DeepSpeed's per-step info logs, nothing else."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed.*", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # bitsandbytes (imported by peft whenever it is installed) warns at import on AVX512-BF16
    # CPUs that an optional inference kernel (the `kernels` package) is missing: inference
    # only, and turned off for QLoRA training anyway (trainers.models).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # A worker iterates its own shard (trainers.data.split_for_workers): Ray Data would log
    # the start and end of that local read at every epoch and evaluation.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
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

    t = spec.train
    # Param groups (train.param_groups), each at lr x its scale: for our AdamW and for the
    # optimizer DeepSpeed builds from the JSON alike (it passes `model_parameters` through).
    params = param_groups(model.named_parameters(), t.param_groups, t.lr)
    if t.param_groups:
        _report_groups(params, t.param_groups)
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


def inference_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A trained model's DeepSpeed config made fit for a frozen one (a reference, a reward
    model): no optimizer, scheduler or offloaded optimizer; ZeRO-3 stays (partitioned like
    the trained model), lower stages become 0 (nothing to shard without optimizer state)."""
    import copy

    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage") != 3:
        zero["stage"] = 0
    return config


def frozen_engine(model, config: dict[str, Any]):
    """An inference-mode DeepSpeed engine of `model` under `config` (see inference_config)."""
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def param_groups(named_parameters: Iterable[tuple[str, Any]], groups: Sequence[ParamGroupSpec],
                 lr: float) -> list[dict[str, Any]]:
    """Optimizer param groups of the trainable parameters: each joins the first of `groups`
    whose pattern its name matches (`re.search`, as `model.freeze`), the rest form a group at
    scale 1, listed first (the `lr` the progress line reports). Each group carries its `lr`
    (`lr` x scale), `lr_scale` and `pattern` (None for the rest): the keys travel in the
    optimizer's state, so a restore keeps them (`apply_spec_hyperparameters`). Groups with
    no parameter are left out (DeepSpeed's ZeRO flattens every group it is given)."""
    compiled = [re.compile(g.pattern) for g in groups]
    members: list[list[Any]] = [[] for _ in range(len(groups) + 1)]  # [0]: matched no pattern
    for name, param in named_parameters:
        if param.requires_grad:
            members[next((i + 1 for i, rx in enumerate(compiled) if rx.search(name)), 0)].append(param)
    out = []
    for i, params in enumerate(members):
        scale, pattern = (1.0, None) if i == 0 else (groups[i - 1].lr_scale, groups[i - 1].pattern)
        if params:
            out.append({"params": params, "lr": lr * scale, "lr_scale": scale, "pattern": pattern})
    return out


def _report_groups(built: list[dict[str, Any]], groups: Sequence[ParamGroupSpec]) -> None:
    """Rank 0 says what each group holds, and which patterns matched no trainable parameter."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    sizes = [f"{g['pattern'] or 'the rest'} x{g['lr_scale']:g}: "
             f"{sum(getattr(p, 'ds_numel', p.numel()) for p in g['params']):,} parameters" for g in built]
    print("param groups: " + "; ".join(sizes), flush=True)
    used = {g["pattern"] for g in built}
    for i, g in enumerate(groups):
        if g.pattern not in used:
            print(f"warning: train.param_groups[{i}] ({g.pattern!r}) matches no trainable parameter "
                  "(frozen ones belong to no group; an earlier pattern wins)", flush=True)


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
    scales = {g.pattern: g.lr_scale for g in reversed(t.param_groups)}  # the first of equal patterns wins
    for group in optimizer.param_groups:
        group["weight_decay"] = t.weight_decay
        if "betas" in group:
            group["betas"] = tuple(t.betas)
        # A group keeps its parameters (the checkpoint's layout); the spec says its scale.
        group["lr_scale"] = scales.get(group.get("pattern"), group.get("lr_scale", 1.0))
    lambdas = getattr(scheduler, "lr_lambdas", None)  # the spec's schedule (a LambdaLR)
    if lambdas is not None:
        scheduler.base_lrs = [t.lr * group["lr_scale"] for group in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
