"""`--cluster local`: a Ray head on 127.0.0.1 on the user's own machine.

Started once (`ray start --head --block` in its own process group), reused by later runs,
stopped by `launch down local`. State lives in `$LLMLAUNCH_HOME/local` (default
`~/.cache/llmlaunch/local`). Every listener is bound to loopback: the dashboard / Jobs API
is reachable from this machine only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cluster import ClusterStatus, ProviderError
from cluster.definition import LocalCluster

# The provider interface (cluster/__init__.py): the workers are processes of this machine, in
# this Python environment, with the launcher's files and credentials.
READS_LOCAL_FILES = True
USES_THIS_PYTHON = True
CLUSTER_CREDENTIALS = None

HOST = "127.0.0.1"
START_TIMEOUT_S = 90
# SeaweedFS (and other local services) use 18xxx/19xxx gRPC ports; keep Ray's workers apart.
WORKER_PORTS = (20000, 29999)


def home() -> Path:
    return Path(os.environ.get("LLMLAUNCH_HOME", "~/.cache/llmlaunch")).expanduser() / "local"


def _state_file() -> Path:
    return home() / "head.json"


def _temp_dir() -> str:
    # Ray's unix socket paths live under its temp dir and must stay under ~107 bytes.
    key = hashlib.sha256(str(home().resolve()).encode()).hexdigest()[:8]
    return f"/tmp/llmlaunch-{os.getuid()}-{key}"


def render(definition: LocalCluster) -> list[str]:
    """The `ray start` command `up` would run (ports are chosen at start)."""
    return _command(definition, {k: 0 for k in _PORT_FLAGS})


def validate(definition: LocalCluster, source: str | None = None) -> list[str]:
    """Nothing beyond the definition's model to check offline: `render`."""
    return render(definition)


_PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
               "ray-client-server-port")


def _command(d: LocalCluster, ports: dict[str, int]) -> list[str]:
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--block", f"--node-ip-address={HOST}", f"--dashboard-host={HOST}",
           "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={_temp_dir()}",
           f"--min-worker-port={WORKER_PORTS[0]}", f"--max-worker-port={WORKER_PORTS[1]}"]
    cmd += [f"--{flag}={port}" for flag, port in ports.items()]
    if d.num_cpus is not None:
        cmd.append(f"--num-cpus={d.num_cpus}")
    if d.num_gpus is not None:
        cmd.append(f"--num-gpus={d.num_gpus}")
    if d.object_store_memory_gb is not None:
        cmd.append(f"--object-store-memory={int(d.object_store_memory_gb * 2**30)}")
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _read_state() -> dict[str, Any] | None:
    try:
        return json.loads(_state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _token_file() -> Path:
    return home() / "auth_token"


def use_token() -> None:
    """Authenticate this process's Ray clients to the local head.

    Ray 2.60 heads require a token (`RAY_AUTH_MODE=token`). Ours lives in the state dir,
    readable by this user only, so other users of a shared machine cannot submit jobs to
    it even though the dashboard listens on loopback."""
    token = _token_file()
    if not token.exists():
        home().mkdir(parents=True, exist_ok=True)
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.pop("RAY_AUTH_TOKEN", None)


def _answers(url: str) -> bool:
    request = urllib.request.Request(f"{url}/api/version",
                                     headers={"Authorization": f"Bearer {_token_file().read_text().strip()}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def address(definition: LocalCluster | None = None) -> str | None:
    use_token()
    state = _read_state()
    if state and _alive(state["pid"]) and _answers(state["address"]):
        return state["address"]
    return None


def up(definition: LocalCluster | None = None, on_progress=print, update: bool = True) -> str:
    """Start the head, or return the running one's address. `update` has nothing to apply:
    a running head keeps the settings it was started with (`launch down local` first)."""
    definition = definition or LocalCluster()
    running = address(definition)
    if running:
        return running
    home().mkdir(parents=True, exist_ok=True)
    ports = {flag: _free_port() for flag in _PORT_FLAGS}
    url = f"http://{HOST}:{ports['dashboard-port']}"
    log_path = home() / "head.log"
    env = dict(os.environ)  # carries RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH (set by address())
    # Jobs run `python -m trainers.entry`: it must be this environment's Python, whatever
    # the caller's PATH (e.g. .venv/bin/launch run without activating the venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Measured: without this, Ray on Linux binds the machine's address and all interfaces.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # On SIGTERM a node drains for up to 30 s so a cloud can move work elsewhere; a local
    # head being stopped by its user has nowhere to move it.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "2")
    on_progress(f"starting a local Ray head on {HOST} (log: {log_path})")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_command(definition, ports), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    _state_file().write_text(json.dumps({"pid": proc.pid, "address": url, "gcs": f"{HOST}:{ports['port']}",
                                          "temp_dir": _temp_dir(), "started_at": time.time()}))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        # The dashboard answers a moment before the head node has registered its resources.
        if _answers(url) and status(definition).resources.get("CPU"):
            on_progress(f"local Ray head ready: {url}")
            return url
        time.sleep(0.5)
    _stop(proc.pid)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise ProviderError(f"the local Ray head did not start within {START_TIMEOUT_S}s:\n{tail}",
                        hint=f"see {log_path}; `launch down local` clears a stale head")


def _stop(pid: int, timeout_s: float = 30) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_our_head(pid: int) -> bool:
    """The PID still belongs to `ray start` (not another process that reused the number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc (macOS): trust the state file
    return any(part.endswith(b"ray") for part in cmdline) and b"start" in cmdline


def down(definition: LocalCluster | None = None, on_progress=None) -> bool:
    state = _read_state()
    if not state:
        return False
    was_running = _alive(state["pid"]) and _is_our_head(state["pid"])
    if was_running:
        _stop(state["pid"])
    _state_file().unlink(missing_ok=True)
    return was_running


def status(definition: LocalCluster | None = None) -> ClusterStatus:
    url = address(definition)
    if url is None:
        return ClusterStatus(name="local", kind="local", running=False, detail="not running (`launch up local`)")
    from ray.util.state import list_nodes

    nodes = [n for n in list_nodes(address=url, detail=True) if n.state == "ALIVE"]
    resources: dict[str, float] = {}
    for n in nodes:
        for k, v in (n.resources_total or {}).items():
            if k in ("CPU", "GPU", "memory", "object_store_memory"):
                resources[k] = resources.get(k, 0) + v
    return ClusterStatus(name="local", kind="local", running=True, address=url, resources=resources,
                         nodes=[{"id": n.node_id[:12], "ip": n.node_ip, "head": n.is_head_node} for n in nodes])


def job_address(definition: LocalCluster | None, job_id: str) -> str | None:
    return address(definition)


def capacity(definition: LocalCluster | None = None) -> None:
    """Known only once the head runs (Ray detects the cores and GPUs): the launcher checks a
    run's resources against `status` after `up`."""
    return None


def max_failures(definition: LocalCluster | None = None) -> int:
    # One machine: a lost worker is a crash to look at, not a node to replace.
    return 0


def supports(feature: str) -> bool:
    return feature in {"cpu", "gpu"}
