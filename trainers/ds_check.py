"""Check a resolved DeepSpeed config by DeepSpeed's own rules, without starting anything.

`python -m trainers.ds_check < config.json` exits 0, or 2 with DeepSpeed's message.
The launcher runs it in a subprocess before provisioning, so the CLI itself never imports
torch or deepspeed.
"""

from __future__ import annotations

import json
import sys


def check(cfg: dict) -> str | None:
    """DeepSpeed's complaint about `cfg`, or None."""
    import io
    import contextlib

    cfg = dict(cfg)
    # Outside a process group DeepSpeed assumes one rank; the batch arithmetic over the
    # real world size is checked by trainers.ds_config already.
    cfg["train_batch_size"] = cfg.get("train_micro_batch_size_per_gpu", 1) * cfg.get("gradient_accumulation_steps", 1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            from deepspeed.runtime.config import DeepSpeedConfig

            DeepSpeedConfig(cfg)
        except Exception as e:  # DeepSpeed raises AssertionError, ValueError, pydantic errors...
            return f"{type(e).__name__}: {e}".strip()
    return None


if __name__ == "__main__":
    problem = check(json.load(sys.stdin))
    if problem:
        print(problem)
        sys.exit(2)
