"""Against a real Kubernetes cluster with the KubeRay operator (v1.7.0) and k8s/ applied:
`pytest -m k8s` with KUBECONFIG set, LLMLAUNCH_TEST_CLUSTER naming a cluster definition
(default: prod) and LLMLAUNCH_TEST_STORAGE an s3:// prefix the pods can write."""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"),
                       reason="needs a real Kubernetes cluster with KubeRay: set KUBECONFIG (no API server can run here)"),
    pytest.mark.skipif(not os.environ.get("LLMLAUNCH_TEST_STORAGE"),
                       reason="needs LLMLAUNCH_TEST_STORAGE=s3://... that the cluster's pods can write"),
]
CLUSTER = os.environ.get("LLMLAUNCH_TEST_CLUSTER", "prod")


def test_up_status_run_down(launch):
    """The local S3 server's credentials are not passed (s3=False): the pods use the storage Secret."""
    assert launch("up", CLUSTER, timeout=1800, s3=False).returncode == 0
    status = launch("status", CLUSTER, "--json", s3=False)
    assert status.returncode == 0 and '"running": true' in status.stdout
    storage = os.environ["LLMLAUNCH_TEST_STORAGE"]
    run = launch("configs/examples/quickstart.yaml", "--cluster", CLUSTER, f"checkpoint.storage={storage}",
                 "model.path=" + os.environ.get("LLMLAUNCH_TEST_MODEL", "s3://llmlaunch-test/tiny-llama"),
                 "data.train[0].path=" + os.environ.get("LLMLAUNCH_TEST_DATA", "s3://llmlaunch-test/messages.jsonl"),
                 timeout=3600, s3=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert launch("down", CLUSTER, s3=False).returncode == 0


def test_ephemeral_run(launch):
    storage = os.environ["LLMLAUNCH_TEST_STORAGE"]
    run = launch("configs/examples/quickstart.yaml", "--cluster", CLUSTER, "--ephemeral",
                 f"checkpoint.storage={storage}",
                 "model.path=" + os.environ.get("LLMLAUNCH_TEST_MODEL", "s3://llmlaunch-test/tiny-llama"),
                 "data.train[0].path=" + os.environ.get("LLMLAUNCH_TEST_DATA", "s3://llmlaunch-test/messages.jsonl"),
                 timeout=3600, s3=False)
    assert run.returncode == 0, run.stderr[-3000:]
