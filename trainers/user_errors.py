"""User errors found inside the job: reported as one line, never as a traceback.

The job's driver prints `LLMLAUNCH_ERROR {"message", "hint"}` and exits 2; the launcher
shows it as `error: ...` / `hint: ...` and exits 2 as for any bad input
(launcher.output). `LLMLAUNCH_DEBUG=1` (set by `launch --debug`) adds the traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback

MARKER = "LLMLAUNCH_ERROR "
DEBUG_ENV = "LLMLAUNCH_DEBUG"
IMAGE_ENV = "LLMLAUNCH_IMAGE"
EXIT_CODE = 2
# What the workers import; `llmlaunch[train]` installs them.
TRAIN_PACKAGES = ("torch", "deepspeed", "transformers", "peft", "datasets", "accelerate")


class JobUserError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def report(error: JobUserError) -> int:
    if os.environ.get(DEBUG_ENV):
        traceback.print_exc()
    print(MARKER + json.dumps({"message": error.message, "hint": error.hint}), flush=True)
    return EXIT_CODE


def importable(name: str) -> bool:
    """Whether this Python environment has the package, found without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_train_packages() -> list[str]:
    """The worker-side packages this Python environment lacks."""
    return [name for name in TRAIN_PACKAGES if not importable(name)]


def check_train_packages() -> None:
    """At the start of the job: the cluster's image must hold what the workers import."""
    missing = missing_train_packages()
    if missing:
        image = os.environ.get(IMAGE_ENV)
        where = f"the cluster image {image}" if image else f"the cluster's Python ({sys.executable})"
        raise JobUserError(f"{where} lacks {', '.join(missing)}, which the training workers need",
                           hint="install them in the image: pip install 'llmlaunch[train]'")
