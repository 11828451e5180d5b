"""Real services for the integration and end-to-end tests: a local Ray head started with
`launch up local` (the product's own path) after the S3 server, shared by the session.

Each test runs the CLI as a user does, in a subprocess, with LLMLAUNCH_HOME pointing at
the session's state so the user's own `~/.cache/llmlaunch` is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "launcher.cli"]


@pytest.fixture(scope="session")
def launch_home(s3_server):
    """LLMLAUNCH_HOME for the session, with a running local Ray head (started after the
    S3 server: their port ranges must not overlap). A short path: Ray's sockets live there."""
    home = tempfile.mkdtemp(prefix="llt-", dir="/tmp")
    env = {**os.environ, "LLMLAUNCH_HOME": home}
    subprocess.run([*LAUNCH, "up", "local"], env=env, check=True, cwd=REPO, timeout=180)
    try:
        yield home
    finally:
        subprocess.run([*LAUNCH, "down", "local"], env=env, cwd=REPO, timeout=120)


@pytest.fixture
def launch(launch_home, s3_server):
    """Run `launch ARGS...` as a subprocess; returns CompletedProcess (text, both streams)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600, s3: bool = True):
        full_env = {**os.environ, "LLMLAUNCH_HOME": launch_home, **(s3_server.env() if s3 else {}), **(env or {})}
        proc = subprocess.run([*LAUNCH, *args], env=full_env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        if os.environ.get("LLMLAUNCH_TEST_VERBOSE"):
            sys.stderr.write(proc.stdout + proc.stderr)
        return proc

    return run


def output(proc) -> str:
    return proc.stdout + proc.stderr
