"""The SSH tunnel through which `kind: aws` reaches a cluster's Jobs API.

Port 8265 (the dashboard / Jobs API) is never opened in the security group: this process runs
`ssh -N -L 127.0.0.1:PORT:127.0.0.1:8265` to the head, with the definition's key (or Ray's
default one), one known_hosts file per head instance (trust on first use) and its log in
`state_dir(definition)`. A tunnel is reused while it lives and answers, and ends with this
process (atexit, and on Linux PR_SET_PDEATHSIG even on SIGKILL) or when the cluster goes down
(`close_tunnels`). Nothing listens on an interface other than 127.0.0.1.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from cluster import ProviderError
from cluster.aws_render import DASHBOARD_PORT
from cluster.aws_spec import AwsCluster

__all__ = ["state_dir", "key_path", "tunnel_command", "reach", "close_tunnels"]

TUNNEL_TIMEOUT_S = 60

# This process's open tunnels: (cluster name, head IP) -> (the ssh process, its local URL).
_TUNNELS: dict[tuple[str, str], tuple[subprocess.Popen, str]] = {}


def state_dir(definition: AwsCluster) -> Path:
    """Where the launcher keeps this cluster's tunnel log and known_hosts files."""
    return Path(os.environ.get("LLMLAUNCH_HOME", "~/.cache/llmlaunch")).expanduser() / "aws" / definition.name


def key_path(definition: AwsCluster, head: dict[str, Any]) -> Path:
    """The private key for SSH to the head: the definition's, else Ray's default
    (`~/.ssh/<the head's key pair>.pem`, which Ray wrote when it created the pair)."""
    if definition.ssh_key:
        return definition.ssh_key.path
    return Path(f"~/.ssh/{head.get('key_name') or 'ray-autoscaler_' + definition.region}.pem").expanduser()


def tunnel_command(definition: AwsCluster, head_ip: str, local_port: int, key: Path, known_hosts: Path) -> list[str]:
    """The `ssh` command of the tunnel: 127.0.0.1:local_port on this machine to the head's
    dashboard / Jobs API on the head's own loopback. Nothing listens on other interfaces."""
    return ["ssh", "-N", "-L", f"127.0.0.1:{local_port}:127.0.0.1:{DASHBOARD_PORT}",
            "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=3",
            "-o", "ConnectTimeout=15",
            # Trust on first use, one file per head instance: a new head (new key) gets a new file.
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
            f"{definition.ssh_user}@{head_ip}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _die_with_parent() -> None:
    # Linux: the tunnel goes when the launcher goes, even on SIGKILL (atexit covers the rest).
    # The signal follows the thread that started ssh: the CLI opens tunnels from its main thread.
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def reach(definition: AwsCluster, head: dict[str, Any], say: Callable[[str], None]) -> str:
    """The Jobs API URL (http://127.0.0.1:PORT) of `head` (a `cluster.aws.nodes` entry): this
    process's tunnel to it while that lives and answers, else a new one, once the API answers."""
    ip = head["private_ip"] if definition.use_internal_ips else head["public_ip"]
    if not ip:
        raise ProviderError(f"the head {head['instance']} has no {'private' if definition.use_internal_ips else 'public'} IP",
                            hint="subnets must give public IPs, or set use_internal_ips when the launcher is in the VPC")
    cached = _TUNNELS.get((definition.name, ip))
    if cached and cached[0].poll() is None and _answers(cached[1]):
        return cached[1]
    state = state_dir(definition)
    state.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = state / "tunnel.log"
    cmd = tunnel_command(definition, ip, port, key_path(definition, head), state / f"known_hosts-{head['instance']}")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=_die_with_parent)
    atexit.register(_stop, proc)
    deadline = time.monotonic() + TUNNEL_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProviderError(f"SSH tunnel to the head {head['instance']} ({ip}) failed: "
                                f"{log.read_text(errors='replace')[-800:].strip()}",
                                hint="SSH comes in from `security_group.ssh_cidrs` only; check ssh_user and the key "
                                     f"({cmd[cmd.index('-i') + 1]})")
        if _answers(url):
            _TUNNELS[(definition.name, ip)] = (proc, url)
            say(f"SSH tunnel 127.0.0.1:{port} -> {definition.ssh_user}@{ip} (head {head['instance']}):{DASHBOARD_PORT}")
            return url
        time.sleep(0.5)
    _stop(proc)
    raise ProviderError(f"the Jobs API on the head {head['instance']} did not answer through the SSH tunnel within "
                        f"{TUNNEL_TIMEOUT_S}s", hint=f"`launch status {definition.name}`; Ray's dashboard may still be "
                                                     "starting: try again in a minute")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def close_tunnels(name: str) -> None:
    """End this process's tunnels to the cluster `name` (before it goes down)."""
    for key in [k for k in _TUNNELS if k[0] == name]:
        _stop(_TUNNELS.pop(key)[0])

