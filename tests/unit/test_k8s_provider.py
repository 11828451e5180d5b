"""The Kubernetes provider's pure parts: why a head pod does not start, capacity, and how
API errors become messages with hints. (The API calls themselves: tests/integration/
test_k8s_cli.py offline, tests/k8s/ against a real cluster.)"""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from cluster import kubernetes as k8s
from launcher.clusters import load_cluster


def pod(phase="Pending", conditions=(), containers=()):
    return {"metadata": {"name": "prod-head-abc"},
            "status": {"phase": phase, "conditions": list(conditions), "containerStatuses": list(containers)}}


def test_unschedulable_pod_names_the_schedulers_reason():
    p = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    assert k8s.diagnose_pod(p) == "prod-head-abc cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff"])
def test_image_pull_failure_names_the_image(reason):
    p = pod(containers=[{"name": "ray-head", "image": "registry.example/llm:bad",
                         "state": {"waiting": {"reason": reason, "message": "manifest unknown"}}}])
    assert k8s.diagnose_pod(p) == "prod-head-abc cannot pull image registry.example/llm:bad: manifest unknown"


def test_crash_loop_is_reported_and_a_starting_pod_is_not():
    crashing = pod("Running", containers=[{"name": "ray-head", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])
    assert "CrashLoopBackOff" in k8s.diagnose_pod(crashing)
    creating = pod(containers=[{"name": "ray-head", "state": {"waiting": {"reason": "ContainerCreating"}}}])
    assert k8s.diagnose_pod(creating) is None
    assert not k8s.is_ready(creating)
    assert k8s.is_ready(pod("Running", conditions=[{"type": "Ready", "status": "True"}]))
    assert not k8s.is_ready(pod("Running", conditions=[{"type": "Ready", "status": "False"}]))


@pytest.mark.parametrize("status,expected,hint", [
    (404, "ray.io/v1 API is not served", "helm install kuberay-operator"),
    (403, "permission denied (403)", "k8s/rbac.yaml"),
    (500, "answered 500", None),
])
def test_api_errors_become_messages_with_hints(status, expected, hint):
    err = k8s.api_error(ApiException(status=status, reason="x"), "creating RayCluster ml/prod", ray_resource=True)
    assert expected in str(err) and str(err).startswith("creating RayCluster ml/prod")
    assert (hint in err.hint) if hint else err.hint is None


def test_a_404_on_a_core_object_is_not_blamed_on_missing_crds():
    err = k8s.api_error(ApiException(status=404, reason="NotFound"), "listing pods")
    assert "ray.io" not in str(err) and err.hint is None


def test_capacity_is_the_worker_groups_at_maximum_size():
    prod = load_cluster("prod")
    expected_gpu = sum(g.gpus * g.max_replicas for g in prod.worker_groups)
    assert expected_gpu > 0
    assert k8s.capacity(prod)["GPU"] == expected_gpu
