"""`--cluster NAME` with `kind: kubernetes`: a KubeRay RayCluster (persistent) or RayJob
(ephemeral, one per run), applied with the official `kubernetes` client.

The launcher reaches the head's dashboard / Jobs API through a port-forward it opens itself
(the head Service stays ClusterIP), or by in-cluster DNS when it runs inside the cluster.
The pure parts (manifests, diagnosis of a pod that does not start) are tested offline; the
API calls run against a real cluster with `pytest -m k8s` when KUBECONFIG is set.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
from typing import Any, Callable

from cluster import ClusterStatus, ProviderError
from cluster.kubernetes_render import API_VERSION, MANAGED_BY, RUN_ID_ENV, SPEC_ENV, render_raycluster
from cluster.kubernetes_spec import KubernetesCluster

# The provider interface (cluster/__init__.py): pods read no file of this machine, run the
# cluster image's Python, and get storage credentials from the definition's storage Secret.
READS_LOCAL_FILES = False
USES_THIS_PYTHON = False
CLUSTER_CREDENTIALS = "the cluster's storage Secret (`storage_secret`)"

GROUP, VERSION = API_VERSION.split("/")
DASHBOARD_PORT = 8265
HEAD_READY_TIMEOUT_S = 900
POLL_S = 2.0
INSTALL_HINT = ("install the KubeRay operator (v1.7.0) first: "
                "`helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0`; see k8s/README.md")
RBAC_HINT = "an admin applies k8s/rbac.yaml and binds your user or ServiceAccount to the `llmlaunch` Role"


def owner() -> str:
    return os.environ.get("LLMLAUNCH_OWNER") or getpass.getuser()


def render(definition: KubernetesCluster) -> list[dict[str, Any]]:
    return [render_raycluster(definition, owner())]


def validate(definition: KubernetesCluster, source: str | None = None) -> list[dict[str, Any]]:
    """The definition's model is the offline check (the API server validates the objects): `render`."""
    return render(definition)


def documents(definition: KubernetesCluster, *, source: str | None = None,
              run: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """`launch render`: the RayCluster `launch up` applies, or with `run` (the keywords of
    `run_ephemeral`) that run's RayJob and spec ConfigMap."""
    if run is None:
        docs = render(definition)
        note = "runs are submitted to this RayCluster through the Ray Jobs API; `launch up` applies it"
    else:
        from cluster.kubernetes_render import render_rayjob

        docs = render_rayjob(definition, spec_json=run["spec_json"], run_name=run["run_name"], run_id=run["run_id"],
                             owner=owner(), env=_by_value(run["env"]))
        note = f"the run id ({run['run_id']}) is chosen at submission"
    return docs, f"{len(docs)} object(s) for namespace {definition.namespace}; {note}"


def _by_value(env: dict[str, str]) -> dict[str, str]:
    """The job's environment minus what a RayJob sets from its mounted ConfigMap (the spec)
    and by itself (the run id), which do not travel in its runtime_env."""
    return {k: v for k, v in env.items() if k not in (SPEC_ENV, RUN_ID_ENV)}


# ---------------------------------------------------------------- diagnosis (pure)

def diagnose_pod(pod: dict[str, Any]) -> str | None:
    """Why a pod (as the API returns it, a plain dict) will not become ready, or None if it
    may still: image pull failures, unschedulable (with the scheduler's reason), crashes."""
    name = pod.get("metadata", {}).get("name", "pod")
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return f"{name} cannot be scheduled: {cond.get('message', 'no reason given')}"
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
            return f"{name} cannot pull image {cs.get('image')}: {waiting.get('message', reason)}"
        if reason in ("CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError"):
            return f"{name} container {cs.get('name')}: {reason}: {waiting.get('message', '')}".rstrip(": ")
    return None


def is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def api_error(e: Exception, what: str, ray_resource: bool = False) -> ProviderError:
    """A kubernetes ApiException (or connection error) as a ProviderError with a hint.
    A 404 on a ray.io resource means the KubeRay CRDs are missing."""
    status = getattr(e, "status", None)
    if status == 404 and ray_resource:
        return ProviderError(f"{what}: the ray.io/v1 API is not served by this cluster", hint=INSTALL_HINT)
    if status in (401, 403):
        return ProviderError(f"{what}: permission denied ({status}): {getattr(e, 'reason', '')}", hint=RBAC_HINT)
    if status is None:
        return ProviderError(f"{what}: cannot reach the Kubernetes API server: {e}",
                             hint="check KUBECONFIG / the current context (`kubectl cluster-info`)")
    return ProviderError(f"{what}: the API server answered {status} {getattr(e, 'reason', '')}: "
                         f"{getattr(e, 'body', '')}"[:2000])


# ---------------------------------------------------------------- API calls

def _apis():
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            # The client reads KUBECONFIG once, at import: read it at call time instead.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    except (ConfigException, FileNotFoundError) as e:
        raise ProviderError(f"no Kubernetes credentials: {e}",
                            hint="set KUBECONFIG or a current context (`kubectl config current-context`)") from None
    return client.CustomObjectsApi(), client.CoreV1Api(), client.ApiClient()


def _call(fn: Callable, what: str, *args, ray_resource: bool = False, **kwargs):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as e:
        raise api_error(e, what, ray_resource) from None
    except (HTTPError, OSError) as e:
        raise api_error(e, what) from None


def apply(definition: KubernetesCluster, body: dict[str, Any], plural: str, on_progress=print,
          update: bool = True) -> dict[str, Any]:
    """Create the object; when it exists, patch it (`update`: a changed definition updates
    the cluster, as `launch up` does) or leave it as it is (a run reusing a shared cluster)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    custom, _, _ = _apis()
    ns, name = definition.namespace, body["metadata"]["name"]
    try:
        created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)
        on_progress(f"created {body['kind']} {ns}/{name}")
        return created
    except ApiException as e:
        if e.status != 409:
            raise api_error(e, f"creating {body['kind']} {ns}/{name}", ray_resource=True) from None
    except (HTTPError, OSError) as e:
        raise api_error(e, f"creating {body['kind']} {ns}/{name}") from None
    if not update:
        on_progress(f"{body['kind']} {ns}/{name} exists; using it as it is (`launch up` applies changes)")
        return body
    patched = _call(custom.patch_namespaced_custom_object, f"updating {body['kind']} {ns}/{name}",
                    GROUP, VERSION, ns, plural, name, {"metadata": {"labels": body["metadata"]["labels"]},
                                                       "spec": body["spec"]}, ray_resource=True)
    on_progress(f"{body['kind']} {ns}/{name} exists; applied the definition to it")
    return patched


def head_pod(definition: KubernetesCluster, cluster_name: str) -> dict[str, Any] | None:
    _, core, client = _apis()
    pods = _call(core.list_namespaced_pod, "listing pods", definition.namespace,
                 label_selector=f"ray.io/cluster={cluster_name},ray.io/node-type=head")
    items = [client.sanitize_for_serialization(p) for p in pods.items]
    return items[0] if items else None


def up(definition: KubernetesCluster, on_progress=print, update: bool = True) -> str:
    body = render(definition)[0]
    apply(definition, body, "rayclusters", on_progress, update=update)
    _wait_head(definition, definition.name, on_progress)
    return _reach(definition, definition.name, on_progress)


def _wait_head(definition: KubernetesCluster, cluster_name: str, on_progress, timeout_s: float = HEAD_READY_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        pod = head_pod(definition, cluster_name)
        if pod is not None:
            if is_ready(pod):
                on_progress(f"head pod {pod['metadata']['name']} ready")
                return pod
            problem = diagnose_pod(pod)
            if problem:
                raise ProviderError(problem, hint=f"`kubectl -n {definition.namespace} describe pod "
                                                  f"{pod['metadata']['name']}`")
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if phase != last:
                on_progress(f"head pod {pod['metadata']['name']}: {phase}")
                last = phase
        time.sleep(POLL_S)
    raise ProviderError(f"the head pod of {cluster_name} was not ready within {timeout_s:.0f}s",
                        hint=f"`kubectl -n {definition.namespace} get pods -l ray.io/cluster={cluster_name}`")


def _reach(definition: KubernetesCluster, cluster_name: str, on_progress=print) -> str:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return f"http://{cluster_name}-head-svc.{definition.namespace}.svc.cluster.local:{DASHBOARD_PORT}"
    pod = head_pod(definition, cluster_name)
    if pod is None:
        raise ProviderError(f"{cluster_name} has no head pod", hint=f"launch up {definition.name}")
    port = port_forward(definition.namespace, pod["metadata"]["name"], DASHBOARD_PORT)
    on_progress(f"port-forward 127.0.0.1:{port} -> {definition.namespace}/{pod['metadata']['name']}:{DASHBOARD_PORT}")
    return f"http://127.0.0.1:{port}"


def port_forward(namespace: str, pod: str, remote_port: int) -> int:
    """Forward a local port on 127.0.0.1 to the pod for as long as this process lives."""
    from kubernetes.stream import portforward

    _, core, _ = _apis()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            pf = portforward(core.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(remote_port))
            remote = pf.socket(remote_port)
            for a, b in ((conn, remote), (remote, conn)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True, name="llmlaunch-port-forward").start()
    return server.getsockname()[1]


def job_cluster(definition: KubernetesCluster, job_id: str) -> str | None:
    """The RayCluster of the ephemeral RayJob that runs Ray job `job_id`, if there is one."""
    custom, _, _ = _apis()
    jobs = _call(custom.list_namespaced_custom_object, "listing RayJobs", GROUP, VERSION, definition.namespace,
                 "rayjobs", label_selector=f"{MANAGED_BY}=llmlaunch", ray_resource=True)
    for job in jobs.get("items", []):
        if job.get("spec", {}).get("jobId") == job_id:
            return (job.get("status") or {}).get("rayClusterName")
    return None


def address_for_job(definition: KubernetesCluster, job_id: str) -> str | None:
    """Where to reach job `job_id`: its ephemeral cluster, else the persistent one."""
    cluster_name = job_cluster(definition, job_id)
    if cluster_name is None:
        return address(definition)
    pod = head_pod(definition, cluster_name)
    if pod is None or not is_ready(pod):
        return None
    return _reach(definition, cluster_name, on_progress=lambda _: None)


# The provider interface's name for it.
job_address = address_for_job


def address(definition: KubernetesCluster) -> str | None:
    pod = head_pod(definition, definition.name)
    if pod is None or not is_ready(pod):
        return None
    return _reach(definition, definition.name, on_progress=lambda _: None)


def status(definition: KubernetesCluster) -> ClusterStatus:
    _, core, client = _apis()
    pods = _call(core.list_namespaced_pod, "listing pods", definition.namespace,
                 label_selector=f"ray.io/cluster={definition.name}")
    nodes, resources = [], {"GPU": 0.0}
    for p in (client.sanitize_for_serialization(x) for x in pods.items):
        limits = [(c.get("resources") or {}).get("limits") or {} for c in p["spec"]["containers"]]
        gpus = sum(int(lim.get("nvidia.com/gpu", 0)) for lim in limits)
        resources["GPU"] += gpus if is_ready(p) else 0
        labels = p["metadata"].get("labels") or {}
        nodes.append({"pod": p["metadata"]["name"], "type": labels.get("ray.io/node-type"),
                      "group": labels.get("ray.io/group"), "phase": (p.get("status") or {}).get("phase"),
                      "ready": is_ready(p), "gpus": gpus, "node": p["spec"].get("nodeName"),
                      "problem": diagnose_pod(p)})
    head = [n for n in nodes if n["type"] == "head"]
    running = bool(head and head[0]["ready"])
    return ClusterStatus(name=definition.name, kind="kubernetes", running=running,
                         address=None, resources=resources, nodes=nodes,
                         detail="" if running else f"no ready head pod in {definition.namespace} (`launch up {definition.name}`)")


def down(definition: KubernetesCluster, on_progress=None) -> bool:
    from kubernetes.client.exceptions import ApiException

    custom, _, _ = _apis()
    what = f"deleting RayCluster {definition.namespace}/{definition.name}"
    from urllib3.exceptions import HTTPError

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, definition.namespace, "rayclusters", definition.name)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise api_error(e, what, ray_resource=True) from None
    except (HTTPError, OSError) as e:
        raise api_error(e, what) from None


def supports(feature: str) -> bool:
    return feature in {"gpu", "autoscaling", "spot", "ephemeral", "render"}


def max_failures(definition: KubernetesCluster) -> int:
    # A Kubernetes definition has no such field (yet): a lost pod ends the run, and the same
    # `launch run` continues it from its newest complete checkpoint.
    return 0


def capacity(definition: KubernetesCluster) -> dict[str, float]:
    """CPUs and GPUs of the worker groups at their maximum size: what the autoscaler can
    provide, which is what a run can be placed on (groups may sit at 0 replicas now)."""
    from cluster.kubernetes_spec import parse_quantity

    cpu = sum(float(parse_quantity(g.cpu)) * g.max_replicas for g in definition.worker_groups)
    gpu = sum(g.gpus * g.max_replicas for g in definition.worker_groups)
    if not definition.worker_groups:  # everything runs on the head
        cpu = float(parse_quantity(definition.head.cpu))
    return {"CPU": cpu, "GPU": float(gpu)}


def run_ephemeral(definition: KubernetesCluster, *, spec_json: str, run_name: str, run_id: str,
                  env: dict[str, str], on_progress=print) -> tuple[str, str]:
    """Apply a RayJob (+ its spec ConfigMap), wait for its cluster's head; returns the Jobs
    API address and the Ray job id KubeRay submits the run under. `env`: the job's
    environment (the spec and run id in it are set by the RayJob instead)."""
    from cluster.kubernetes_render import render_rayjob

    rayjob, spec_map = render_rayjob(definition, spec_json=spec_json, run_name=run_name, run_id=run_id,
                                     owner=owner(), env=_by_value(env))
    created = apply(definition, rayjob, "rayjobs", on_progress)
    try:
        return _start_ephemeral(definition, rayjob, spec_map, created, on_progress)
    except BaseException:
        # Abandoned half-way (an error, Ctrl-C): do not leave GPU pods waiting for nothing.
        name = rayjob["metadata"]["name"]
        custom, _, _ = _apis()
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, definition.namespace, "rayjobs", name)
            on_progress(f"deleted RayJob {definition.namespace}/{name}")
        except Exception:
            on_progress(f"could not delete RayJob {definition.namespace}/{name}: "
                        f"`kubectl -n {definition.namespace} delete rayjob {name}`")
        raise


def _start_ephemeral(definition, rayjob, spec_map, created, on_progress) -> tuple[str, str]:
    from cluster.kubernetes_render import owned_by

    custom, core, _ = _apis()
    _call(core.create_namespaced_config_map, "creating the run spec ConfigMap", definition.namespace,
          owned_by(spec_map, created))
    name = rayjob["metadata"]["name"]
    deadline = time.monotonic() + HEAD_READY_TIMEOUT_S
    cluster_name = None
    while cluster_name is None:
        if time.monotonic() > deadline:
            raise ProviderError(f"RayJob {name} created no RayCluster within {HEAD_READY_TIMEOUT_S}s",
                                hint=f"`kubectl -n {definition.namespace} describe rayjob {name}`")
        job = _call(custom.get_namespaced_custom_object, f"reading RayJob {name}", GROUP, VERSION,
                    definition.namespace, "rayjobs", name, ray_resource=True)
        cluster_name = (job.get("status") or {}).get("rayClusterName")
        time.sleep(0 if cluster_name else POLL_S)
    on_progress(f"RayJob {name}: cluster {cluster_name}")
    _wait_head(definition, cluster_name, on_progress)
    return _reach(definition, cluster_name, on_progress), rayjob["spec"]["jobId"]
