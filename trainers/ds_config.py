"""DeepSpeed config from the run spec: the ZeRO shorthand, or a user's JSON with
Hugging Face style `"auto"` values filled in from the spec.

A JSON may hold an `optimizer` block, a `scheduler` block, both or neither, as with Hugging
Face's Trainer: DeepSpeed builds what the JSON describes and the trainer supplies the rest
(AdamW, and the spec's `lr_schedule` with warmup; see trainers.engine.build_engine). Values
set explicitly in the JSON must agree with the spec (`_SPEC_FIELDS`); `"auto"` takes the spec's.

Pure (no torch): the launcher resolves and checks the config before anything is
provisioned; the workers resolve it again once the step count and model width are known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainers.spec import AnyRun, ZeroSpec

# Keys whose "auto" depends on the model width; resolved on the workers.
_HIDDEN_SIZE_KEYS = {
    "zero_optimization.reduce_bucket_size": lambda h: h * h,
    "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
}


class DeepSpeedConfigError(ValueError):
    """Problems with a DeepSpeed config, each as (json key, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(f"{k}: {m}" for k, m in problems))


def precision(spec: AnyRun, use_gpu: bool) -> str:
    """The training dtype: `auto` is bfloat16 on GPUs and float32 on CPUs."""
    if spec.model.dtype == "auto":
        return "bfloat16" if use_gpu else "float32"
    return spec.model.dtype


def deepspeed_config(
    spec: AnyRun,
    *,
    use_gpu: bool,
    total_steps: int | None = None,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for this spec. Values that need `total_steps` or
    `hidden_size` stay `"auto"` while those are None. Raises DeepSpeedConfigError."""
    ds = spec.train.deepspeed
    if isinstance(ds, ZeroSpec):
        cfg, source = _from_shorthand(ds, use_gpu), "train.deepspeed"
    elif ds.lstrip().startswith("{"):  # the JSON text itself (inlined by the launcher)
        cfg, source = _parse_json(ds, "train.deepspeed (inline JSON)"), "train.deepspeed (inline JSON)"
    else:
        cfg, source = load_json(ds), ds
    problems: list[tuple[str, str]] = []
    _resolve(cfg, spec, use_gpu, total_steps, hidden_size, problems)
    if problems:
        raise DeepSpeedConfigError(source, problems)
    return cfg


def load_json(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DeepSpeedConfigError(path, [("(file)", "not found; give a path relative to the spec file")]) from None
    return _parse_json(text, path)


def _parse_json(text: str, source: str) -> dict[str, Any]:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(source, [(f"line {e.lineno}", f"invalid JSON: {e.msg}")]) from None
    if not isinstance(cfg, dict):
        raise DeepSpeedConfigError(source, [("(file)", "must be a JSON object")])
    return cfg


def _from_shorthand(z: ZeroSpec, use_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=use_gpu)
    if z.stage == 3:
        # Needed to export consolidated weights at the end (save_16bit_model).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        for key in _HIDDEN_SIZE_KEYS:
            zero[key.split(".")[1]] = "auto"
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # Progress is reported by the trainer; DeepSpeed's own prints are noise.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _resolve(cfg, spec, use_gpu, total_steps, hidden_size, problems) -> None:
    t = spec.train
    dtype = precision(spec, use_gpu)
    workers = spec.resources.workers
    gas = spec.grad_accum_steps
    warmup = None if total_steps is None else int(t.warmup_ratio * total_steps)
    # key -> value from the spec; explicit values in the JSON must agree with these.
    from_spec: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * workers,
        "gradient_clipping": t.grad_clip,
        "bf16.enabled": dtype == "bfloat16",
        "fp16.enabled": dtype == "float16",
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": list(t.betas),
        "optimizer.params.eps": 1e-8,
        "optimizer.params.weight_decay": t.weight_decay,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": t.lr,
        "scheduler.params.warmup_num_steps": warmup,
        "scheduler.params.total_num_steps": total_steps,
    }
    batch_keys = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"}
    for key, value in from_spec.items():
        if not _has(cfg, key):
            if key in batch_keys:
                _set(cfg, key, value)
            continue
        current = _get(cfg, key)
        if current == "auto":
            if value is not None:
                _set(cfg, key, value)
        elif key in _SPEC_FIELDS and value is not None and not _same(current, value):
            # As Hugging Face's Trainer does: two sources for one value is a mistake, and
            # the JSON silently winning would also defeat a `tune:` search over the spec field.
            problems.append((key, f"is {json.dumps(current)} but the spec gives {json.dumps(value)} "
                                  f"({_SPEC_FIELDS[key]}); set it to \"auto\" or change the spec"))
    for key, fn in _HIDDEN_SIZE_KEYS.items():
        if _has(cfg, key) and _get(cfg, key) == "auto" and hidden_size is not None:
            _set(cfg, key, fn(hidden_size))
    if dtype in ("bfloat16", "float16") and not use_gpu:
        problems.append(("bf16.enabled" if dtype == "bfloat16" else "fp16.enabled",
                         f"model.dtype {dtype} needs GPUs; use model.dtype: auto or float32 on CPU workers"))
    else:
        for key, wanted in (("bf16.enabled", dtype == "bfloat16"), ("fp16.enabled", dtype == "float16")):
            if _get(cfg, key) is True and not wanted:
                where = "CPU workers train in float32 (DeepSpeed's bf16/fp16 need GPUs)" if not use_gpu else \
                    f"model.dtype resolves to {dtype}"
                problems.append((key, f"is true but {where}; set it to \"auto\" (it follows model.dtype)"))
    if t.param_groups and "scheduler" in cfg:
        # WarmupLR & co. write one rate (warmup_max_lr) into every group.
        problems.append(("scheduler", "DeepSpeed's schedulers give every parameter group the same learning rate, "
                                      "which would undo train.param_groups' lr_scale; remove the block (the spec's "
                                      "lr_schedule then runs each group at its scale)"))
    if _has(cfg, "zero_optimization.offload_param") and _get(cfg, "zero_optimization.stage") != 3:
        problems.append(("zero_optimization.offload_param", "parameter offload needs ZeRO stage 3"))
    if _get(cfg, "zero_optimization.stage") == 3:
        cfg["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    deferred = set(_HIDDEN_SIZE_KEYS) | {"scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps"}
    for key in _auto_keys(cfg):
        if key not in deferred or (total_steps is not None and hidden_size is not None):
            problems.append((key, "is \"auto\" but the spec has no value for it; set it explicitly"))


# JSON keys that must agree with the spec when set explicitly, and the spec field behind each.
_SPEC_FIELDS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / micro_batch_size / resources.workers",
    "train_batch_size": "train.global_batch_size / micro_batch_size / resources.workers",
    "gradient_clipping": "train.grad_clip",
    "optimizer.params.lr": "train.lr",
    "optimizer.params.betas": "train.betas",
    "optimizer.params.weight_decay": "train.weight_decay",
    "scheduler.params.warmup_max_lr": "train.lr",
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


_MISSING = object()


def _get(cfg: dict, key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _has(cfg: dict, key: str) -> bool:
    return _get(cfg, key, _MISSING) is not _MISSING


def _set(cfg: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
