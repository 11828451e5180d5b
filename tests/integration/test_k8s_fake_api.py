"""The Kubernetes provider's request sequence through the official client, against a small
HTTP fake of the API server on 127.0.0.1 (no API server can run here).

What the fake checks: the paths and verbs the client sends, and every RayCluster / RayJob
body against the strict KubeRay v1.7.0 CRD schema (it answers 422 otherwise, as an API
server would). What it does NOT check: admission, defaulting, RBAC, the KubeRay operator,
scheduling, or the port-forward (a websocket upgrade). Those need `pytest -m k8s`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
import yaml

from cluster import ProviderError, crd_schema
from cluster import kubernetes as k8s
from launcher.clusters import load_cluster

pytestmark = pytest.mark.integration


class FakeApi:
    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.queries: list[str] = []
        self.head_states = ["Pending", "Pending", "Ready"]  # what successive pod lists show
        self.head_problem: dict | None = None
        self.crds_installed = True

    def head_pod(self) -> dict:
        state = self.head_states.pop(0) if len(self.head_states) > 1 else self.head_states[0]
        status = {"phase": "Running" if state == "Ready" else "Pending",
                  "conditions": [{"type": "Ready", "status": "True" if state == "Ready" else "False"}]}
        if self.head_problem:
            status.update(self.head_problem)
        return {"metadata": {"name": "prod-head-x1", "labels": {"ray.io/node-type": "head", "ray.io/group": "headgroup"}},
                "spec": {"containers": [{"name": "ray-head", "resources": {"limits": {"cpu": "8"}}}]},
                "status": status}


def serve(api: FakeApi):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> dict:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

        def handle_any(self, verb: str):
            url = urlparse(self.path)
            path = url.path
            api.requests.append((verb, path))
            api.queries.append(url.query)
            if path.startswith("/apis/ray.io/") and not api.crds_installed:
                return self.reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
            if path.endswith("/rayjobs") and verb == "GET":
                return self.reply(200, {"kind": "RayJobList", "apiVersion": "ray.io/v1",
                                        "items": [o for k, o in api.objects.items() if "/rayjobs/" in k]})
            if path.endswith("/pods") and verb == "GET":
                return self.reply(200, {"kind": "PodList", "items": [api.head_pod()]})
            if verb == "POST" and path.startswith("/apis/ray.io/"):
                obj = self.body()
                problems = crd_schema.problems(obj)
                if problems:
                    return self.reply(422, {"kind": "Status", "code": 422, "message": "; ".join(problems)})
                key = f"{path}/{obj['metadata']['name']}"
                if key in api.objects:
                    return self.reply(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
                api.objects[key] = obj
                return self.reply(201, obj)
            if verb == "PATCH" and path in api.objects:
                return self.reply(200, api.objects[path])
            if verb == "DELETE":
                if api.objects.pop(path, None) is None:
                    return self.reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                return self.reply(200, {"kind": "Status", "code": 200})
            return self.reply(404, {"kind": "Status", "code": 404})

        def do_GET(self):
            self.handle_any("GET")

        def do_POST(self):
            self.handle_any("POST")

        def do_PATCH(self):
            self.handle_any("PATCH")

        def do_DELETE(self):
            self.handle_any("DELETE")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def fake(tmp_path, monkeypatch):
    api = FakeApi()
    server = serve(api)
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(k8s, "POLL_S", 0.01)
    yield api
    server.shutdown()


def test_up_creates_waits_for_the_head_and_reuses(fake):
    prod = load_cluster("prod")
    address = k8s.up(prod, on_progress=lambda _: None)
    assert address.startswith("http://127.0.0.1:")  # the launcher's own port-forward
    rc_path = "/apis/ray.io/v1/namespaces/ml-training/rayclusters"
    assert ("POST", rc_path) in fake.requests
    assert [p for v, p in fake.requests if v == "GET"].count("/api/v1/namespaces/ml-training/pods") >= 3
    # a second `up` finds it (409) and applies the definition with a patch
    fake.requests.clear()
    k8s.up(prod, on_progress=lambda _: None)
    assert ("PATCH", f"{rc_path}/prod") in fake.requests
    assert k8s.status(prod).running
    assert k8s.down(prod) is True
    assert k8s.down(prod) is False  # not found: nothing was running


def test_head_that_cannot_pull_its_image_fails_fast_with_the_reason(fake):
    fake.head_states = ["Pending"]
    fake.head_problem = {"containerStatuses": [{"name": "ray-head", "image": "ghcr.io/acme/llm:nope", "imageID": "",
                                                "ready": False, "restartCount": 0,
                                                "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                      "message": "not found"}}}]}
    with pytest.raises(ProviderError, match="cannot pull image ghcr.io/acme/llm:nope: not found") as e:
        k8s.up(load_cluster("prod"), on_progress=lambda _: None)
    assert "kubectl -n ml-training describe pod prod-head-x1" in e.value.hint


def test_missing_kuberay_crds_give_the_install_hint(fake):
    fake.crds_installed = False
    with pytest.raises(ProviderError, match="ray.io/v1 API is not served") as e:
        k8s.up(load_cluster("prod"), on_progress=lambda _: None)
    assert "helm install kuberay-operator" in e.value.hint


def test_logs_and_cancel_of_an_ephemeral_run_reach_the_rayjobs_own_cluster(fake):
    prod = load_cluster("prod")
    fake.objects["/apis/ray.io/v1/namespaces/ml-training/rayjobs/quickstart-x"] = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "quickstart-x"},
        "spec": {"jobId": "quickstart-20260101-000000-abcd"}, "status": {"rayClusterName": "quickstart-x-7f2kq"}}
    fake.head_states = ["Ready"]
    address = k8s.address_for_job(prod, "quickstart-20260101-000000-abcd")
    assert address.startswith("http://127.0.0.1:")
    assert any("ray.io%2Fcluster%3Dquickstart-x-7f2kq" in q or "ray.io/cluster=quickstart-x-7f2kq" in q
               for q in fake.queries)
    # a job id no RayJob runs: the persistent cluster's head
    fake.queries.clear()
    k8s.address_for_job(prod, "some-other-job")
    assert any("ray.io%2Fcluster%3Dprod%2C" in q or "ray.io/cluster=prod," in q for q in fake.queries)
