"""Credentials for jobs on `--cluster local`, by file rather than in the job's runtime_env.

Ray writes a job's runtime_env (env vars included) to its logs and shows it in the
dashboard, so the launcher puts credential values in a 0600 file on the same machine and
passes only its path (`LLMLAUNCH_SECRETS_FILE`). Every process that may need them (the job's
driver, Ray Data tasks, Train workers) calls `load()`; variables already set win.
"""

from __future__ import annotations

import json
import os

SECRETS_FILE_ENV = "LLMLAUNCH_SECRETS_FILE"
_loaded = False


def load() -> None:
    global _loaded
    path = os.environ.get(SECRETS_FILE_ENV)
    if _loaded or not path:
        return
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        return
    for name, value in values.items():
        os.environ.setdefault(name, value)
    _loaded = True
