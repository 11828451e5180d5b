"""Submit a run as a Ray job through the Ray Jobs API and follow it.

The Jobs API is the only way into a cluster, local or remote. Following a job tails its
logs and watches its status at the same time, returning as soon as the job is terminal
(tailing alone lingers for seconds after the end).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets as _secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import trainers
from launcher.config import for_cluster
from launcher.errors import LaunchTimeout, UsageError
from trainers.entry import MAX_FAILURES_ENV, RUN_ID_ENV, SPEC_ENV
from trainers.secrets_env import SECRETS_FILE_ENV
from trainers.spec import AnyRun
from trainers.user_errors import DEBUG_ENV

# Variables the launcher passes to a local cluster from its own environment: storage
# endpoints and credentials, and the Hugging Face hub settings. Values are never printed.
LOCAL_PASSTHROUGH_PREFIXES = ("AWS_", "HF_", "HUGGING_FACE_")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + _secrets.token_hex(2)


def job_env(spec: AnyRun, run_id: str, *, cluster_credentials: str | None, max_failures: int = 0) -> dict[str, str]:
    """The job's environment. Credential values never go in it (Ray logs runtime_envs): when
    the launcher passes its own (`cluster_credentials` None: the provider's
    CLUSTER_CREDENTIALS, a local cluster) they go to a 0600 file whose path the job gets
    (trainers.secrets_env); otherwise the cluster's jobs get theirs from what that names.
    `max_failures`: the provider's restart limit for the run, unless the spec's `env` sets one."""
    from cluster import looks_secret

    local = cluster_credentials is None
    env = dict(spec.env)
    if spec.secrets and not local:
        raise UsageError("secrets: on a remote cluster secrets come from the cluster, not the launcher",
                         hint=f"the cluster's jobs get credentials from {cluster_credentials}")
    missing = [name for name in spec.secrets if name not in os.environ]
    if missing:
        raise UsageError(f"secrets: {', '.join(missing)} not set in this environment",
                         hint="on --cluster local, secrets are read from the launcher's environment")
    if local:
        passed = {k: v for k, v in os.environ.items() if k.startswith(LOCAL_PASSTHROUGH_PREFIXES)}
        passed.update({name: os.environ[name] for name in spec.secrets})
        secret = {k: v for k, v in passed.items() if looks_secret(k) or k in spec.secrets}
        env.update({k: v for k, v in passed.items() if k not in secret})
        if secret:
            env[SECRETS_FILE_ENV] = _write_secrets(secret, run_id)
        if "LLMLAUNCH_HOME" in os.environ:  # the model cache lives there too
            env["LLMLAUNCH_HOME"] = os.environ["LLMLAUNCH_HOME"]
        # Ray Train's preemption watcher polls for node drains (spot reclaims): a head on this
        # machine is never drained, and the watcher is one more actor process every run starts.
        env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if os.environ.get(DEBUG_ENV):
        env[DEBUG_ENV] = "1"
    env[SPEC_ENV] = json.dumps(for_cluster(spec))
    env[RUN_ID_ENV] = run_id
    # Ray Train's FailureConfig(max_failures) in trainers.entry.fit: how often the workers restart
    # from the newest complete checkpoint after a node is lost (a spot reclaim). Unset is 0 there.
    if max_failures:
        env.setdefault(MAX_FAILURES_ENV, str(max_failures))
    # Ray Train's controller polls workers at this interval; the 2 s default adds idle
    # seconds to every run's start and end.
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Ray Train v2 sends every worker print() to its logger as well: each line twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # tqdm bars from Ray Data are unreadable once interleaved in a log stream.
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    return env


def _write_secrets(values: dict[str, str], run_id: str) -> str:
    directory = Path(os.environ.get("LLMLAUNCH_HOME", "~/.cache/llmlaunch")).expanduser() / "local" / "secrets"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{run_id}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return str(path)


def wait_for_job(address: str, job_id: str, timeout_s: float = 600) -> None:
    """Wait until a job submitted by someone else (KubeRay's submitter) is known."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.get_job_info(job_id)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise LaunchTimeout(f"job {job_id} did not appear on the cluster within {timeout_s:.0f}s",
                                    hint="KubeRay's submitter may be failing: `kubectl get rayjobs`") from None
            time.sleep(2)


def submit(address: str, spec: AnyRun, run_id: str, *, cluster_credentials: str | None, max_failures: int = 0,
           user_modules: list[str] = ()) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    # The trainers package travels with the job, so workers run the launcher's version
    # of the training code whatever the cluster image holds; so do the user's modules the
    # spec names (a reward function), which a remote cluster has never seen.
    runtime_env = {"env_vars": job_env(spec, run_id, cluster_credentials=cluster_credentials,
                                       max_failures=max_failures),
                   "py_modules": [str(Path(trainers.__file__).parent), *user_modules]}
    return client.submit_job(
        entrypoint="python -m trainers.entry",
        submission_id=f"{spec.name}-{run_id}",
        runtime_env=runtime_env,
        metadata={"llmlaunch.name": spec.name, "llmlaunch.run_id": run_id, "llmlaunch.method": spec.method},
        entrypoint_num_cpus=0,
    )


@dataclass
class JobEnd:
    status: str
    message: str


def follow(address: str, job_id: str, on_text: Callable[[str], None], poll_s: float = 0.5) -> JobEnd:
    """Stream the job's log text to `on_text` until the job is terminal.

    The log tail (a websocket, asyncio) runs in a daemon thread; the main thread only polls
    the status and sleeps, so Ctrl-C always lands there as a plain KeyboardInterrupt. Under
    `asyncio.run` in the main thread it became a task cancellation, which a tail stuck in
    its websocket read could absorb: the launcher then kept streaming instead of detaching.
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    lock = threading.Lock()
    printed, live = 0, True

    def deliver(chunk: str) -> None:
        nonlocal printed
        with lock:
            if live:
                printed += len(chunk)
                on_text(chunk)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            deliver(chunk)

    def tail_quietly() -> None:
        try:
            asyncio.run(tail())
        except Exception:  # the log fetched below covers whatever the tail missed
            pass

    threading.Thread(target=tail_quietly, name=f"tail-{job_id}", daemon=True).start()
    try:
        while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
            time.sleep(poll_s)
    finally:
        with lock:
            live = False
    # Whatever the tail had not delivered when the job ended.
    rest = client.get_job_logs(job_id)[printed:]
    if rest:
        on_text(rest)
    info = client.get_job_info(job_id)
    return JobEnd(status=status, message=info.message or "")
