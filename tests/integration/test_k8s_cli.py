"""`--cluster prod` (kind: kubernetes) through the real CLI and the official kubernetes
client, with no API server: what can be shown here is that the right objects are built and
validated, that nothing is contacted before the checks pass, and that an unreachable or
unconfigured API server gives exit 3 with a hint. Admission, defaulting, RBAC, the KubeRay
operator and scheduling need a real cluster: tests/k8s/ (pytest -m k8s, KUBECONFIG)."""

from __future__ import annotations

import socket

import pytest
import yaml

from cluster import crd_schema
from tests.conftest import output

pytestmark = pytest.mark.integration
S3_SPEC = ["configs/examples/quickstart.yaml", "model.path=s3://models/tiny", "data.train[0].path=s3://data/chat.jsonl"]
RENDER_SPEC = [*S3_SPEC, "checkpoint.storage=s3://runs/llmlaunch"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubeconfig(tmp_path, server: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": server}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "not-a-real-token"}}]}))
    return str(path)


@pytest.mark.parametrize("ephemeral", [False, True])
def test_render_prints_strictly_valid_manifests(launch, ephemeral):
    proc = launch("render", *RENDER_SPEC, "--cluster", "prod", *(["--ephemeral"] if ephemeral else []))
    assert proc.returncode == 0, output(proc)
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [d["kind"] for d in docs] == (["RayJob", "ConfigMap"] if ephemeral else ["RayCluster"])
    for doc in docs:
        problems = crd_schema.problems(doc) if doc["kind"].startswith("Ray") else crd_schema.core_problems(doc, "1.30.0")
        assert not problems, problems


def test_local_paths_are_refused_for_a_remote_cluster(launch):
    proc = launch("configs/examples/quickstart.yaml", "--cluster", "prod")
    assert proc.returncode == 2
    for field in ("checkpoint.storage", "model.path", "data.train[0].path"):
        assert field in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_api_server_exits_3_with_a_hint(launch, s3_env, tmp_path):
    cfg = kubeconfig(tmp_path, f"https://127.0.0.1:{closed_port()}")
    proc = launch(*S3_SPEC, f"checkpoint.storage={s3_env}", "--cluster", "prod", env={"KUBECONFIG": cfg})
    assert proc.returncode == 3, output(proc)
    assert "cannot reach the Kubernetes API server" in proc.stderr and "kubectl cluster-info" in proc.stderr
    assert "Traceback" not in proc.stderr and "not-a-real-token" not in output(proc)


def test_missing_kubeconfig_exits_3(launch, s3_env, tmp_path):
    proc = launch(*S3_SPEC, f"checkpoint.storage={s3_env}", "--cluster", "prod",
                  env={"KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)})
    assert proc.returncode == 3, output(proc)
    assert "no Kubernetes credentials" in proc.stderr


def test_ephemeral_needs_a_kubernetes_cluster(launch):
    proc = launch("configs/examples/quickstart.yaml", "--ephemeral")
    assert proc.returncode == 2 and "--ephemeral needs a kubernetes cluster" in proc.stderr


def test_storage_unverifiable_from_here_is_a_warning_for_a_remote_cluster(launch, s3_server, tmp_path):
    """The pods use the cluster's storage Secret, not this machine's keys: the probe from
    here failing (a bucket these keys cannot see) does not block the run."""
    cfg = kubeconfig(tmp_path, f"https://127.0.0.1:{closed_port()}")
    proc = launch(*S3_SPEC, "checkpoint.storage=s3://no-such-bucket-here/runs", "--cluster", "prod",
                  env={"KUBECONFIG": cfg})
    assert "warning: checkpoint.storage" in proc.stderr, output(proc)
    assert proc.returncode == 3  # it went on to the (unreachable) API server
