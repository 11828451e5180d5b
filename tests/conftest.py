"""Session-wide real services for the tests (no mocks): a SeaweedFS S3 server on 127.0.0.1
and a local Ray head started with `launch up local` (the product's own path), after the
S3 server (their port ranges must not overlap).

Tests run the CLI as a user does, in a subprocess, with LLMLAUNCH_HOME pointing at the
session's state so the user's own `~/.cache/llmlaunch` is never touched."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.fixtures.s3 import S3Server, make_bucket, start_seaweedfs

# This Python's bin directory first on PATH, as in an activated venv (the README runs
# `.venv/bin/python -m pytest` without activating it). DeepSpeed JIT-builds its ops with the
# first `ninja` on PATH: the venv's (1.13, a dependency of deepspeed) in .ci/setup and in the
# jobs (cluster.local puts it first for the head), the system's (1.11) otherwise. The two
# disagree about the build log, so each build made by one is rebuilt by the other (measured:
# 30-45 s of g++ per op, several times per session).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """AWS_* variables pointing at the session's server; yields `s3://<fresh bucket>/runs`."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    bucket = make_bucket(s3_server, f"test-{uuid.uuid4().hex[:12]}")
    yield f"{bucket}/runs"


REPO = Path(__file__).resolve().parents[1]
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
        # `launch down local` as documented; it must report that it stopped the head
        down = subprocess.run([*LAUNCH, "down", "local"], env=env, cwd=REPO, timeout=120,
                              capture_output=True, text=True)
        assert down.returncode == 0 and "stopped" in down.stderr, down.stderr


README_LORA = "launch configs/examples/lora.yaml train.max_steps=10"


@pytest.fixture(scope="session")
def readme_lora_run(launch_home):
    """README's LoRA command, typed as documented (bash, this venv's `launch`), run once: the
    docs test checks the command, test_training.py its adapter and merged model."""
    env = {**os.environ, "LLMLAUNCH_HOME": launch_home}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env['PATH']}"
    return subprocess.run(["bash", "-c", README_LORA], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def launch_cli(home: str, s3_server, *args: str, env: dict[str, str] | None = None, timeout: float = 600,
               s3: bool = True):
    """Run `launch ARGS...` as a subprocess against the session's Ray head (and S3 server)."""
    full_env = {**os.environ, "LLMLAUNCH_HOME": home, **(s3_server.env() if s3 else {}), **(env or {})}
    proc = subprocess.run([*LAUNCH, *args], env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if os.environ.get("LLMLAUNCH_TEST_VERBOSE"):
        sys.stderr.write(proc.stdout + proc.stderr)
    return proc


@pytest.fixture
def launch(launch_home, s3_server):
    """Run `launch ARGS...` as a subprocess; returns CompletedProcess (text, both streams)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600, s3: bool = True):
        return launch_cli(launch_home, s3_server, *args, env=env, timeout=timeout, s3=s3)

    return run


def output(proc) -> str:
    return proc.stdout + proc.stderr
