"""`model.peft.quantize` (QLoRA) checks, before anything starts: what the spec's own
validator cannot see (the ZeRO stage of a DeepSpeed JSON) and whether this Python
environment has bitsandbytes. Pure (no torch): the launcher runs these too.
"""

from __future__ import annotations

from trainers.spec import QUANTIZE_ZERO3, AnyRun
from trainers.user_errors import JobUserError, importable

FIELD = "model.peft.quantize"
PACKAGE = "bitsandbytes"


def quantizes(spec: AnyRun) -> bool:
    return spec.model.peft is not None and spec.model.peft.quantize is not None


def config_problems(spec: AnyRun, ds_cfg: dict) -> list[str]:
    """Problems of the resolved DeepSpeed config with `model.peft.quantize` (a JSON's stage 3)."""
    if quantizes(spec) and ds_cfg.get("zero_optimization", {}).get("stage") == 3:
        return [QUANTIZE_ZERO3.removeprefix(FIELD + " ")]
    return []


def missing_package(spec: AnyRun) -> bool:
    """`model.peft.quantize` is set and this Python environment lacks bitsandbytes."""
    return quantizes(spec) and not importable(PACKAGE)


def check_quantize(spec: AnyRun) -> None:
    """In the job, before the data is prepared: raises JobUserError (exit 2)."""
    if not quantizes(spec):
        return
    if missing_package(spec):
        import os
        import sys

        from trainers.user_errors import IMAGE_ENV

        image = os.environ.get(IMAGE_ENV)
        where = f"the cluster image {image}" if image else f"the cluster's Python ({sys.executable})"
        raise JobUserError(f"{FIELD}: {spec.model.peft.quantize} loads the base with {PACKAGE}, which {where} lacks",
                           hint=f"install it in the image: pip install 'llmlaunch[train]' (or {PACKAGE}), "
                                f"or remove {FIELD}")
    from trainers.ds_config import DeepSpeedConfigError, deepspeed_config

    try:
        ds_cfg = deepspeed_config(spec, use_gpu=True)  # the stage does not depend on the device
    except DeepSpeedConfigError:
        return  # reported by the launcher's checks and by the workers, as without quantize
    problems = config_problems(spec, ds_cfg)
    if problems:
        raise JobUserError(f"{FIELD}: {problems[0]}",
                           hint="set zero_optimization.stage to 2 in the DeepSpeed JSON, or remove " + FIELD)
