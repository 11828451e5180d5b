"""KubeRay manifests from a `KubernetesCluster` definition: pure functions returning plain dicts.

No templating and no API calls: what these return is what `--dry-run` prints and what the
tests validate against the KubeRay v1 CRD schema (`cluster.crd_schema`).

Two ways to run:
- persistent: `render_raycluster` -> one `RayCluster` (`launch up prod`); runs are submitted to it
  through the Ray Jobs API, with the spec in the job's runtime_env (`launcher.submit`).
- ephemeral: `render_rayjob` -> a `RayJob` whose cluster lives as long as the run, plus a ConfigMap
  holding the run spec.

How the run spec reaches an ephemeral run: by reference. The spec JSON is the ConfigMap's
`spec.json`, mounted read-only at `/etc/llmlaunch/spec/` in the head and every worker; the job's
runtime_env sets `LLMLAUNCH_SPEC_FILE=/etc/llmlaunch/spec/spec.json` and `LLMLAUNCH_RUN_ID`, and
the entrypoint is `python -m trainers.entry`, which reads the file. The RayJob therefore carries
neither the spec nor any credential, and the spec is one immutable object `kubectl get` can show.
Apply order: the RayJob first, then the ConfigMap made owned by it (`owned_by(configmap, created)`),
so deleting the RayJob deletes the spec too; pods that start before the ConfigMap exists wait
for it (the kubelet retries the mount), they do not fail.

Every pod gets: requests = limits (Guaranteed QoS; GPU pods must not be overcommitted), the GPU
limit `nvidia.com/gpu`, a memory-backed emptyDir at /dev/shm sized for NCCL / DataLoader workers /
the Ray object store, the storage Secret's keys as `secretKeyRef` environment variables (never
values), the cluster's plain env, its labels, node selectors and tolerations. The dashboard / Jobs
API is the head Service, `ClusterIP` unless the definition says otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from decimal import Decimal
from typing import Any, Mapping, Sequence

import yaml

from cluster.kubernetes_spec import (
    KubernetesCluster,
    StorageSecret,
    Toleration,
    WorkerGroup,
    dns1035_label_problem,
    looks_secret,
    parse_quantity,
    worker_node_selector,
)

API_VERSION = "ray.io/v1"
KUBERAY_VERSION = "v1.7.0"  # the CRDs these manifests are validated against

# Labels on every object and pod the launcher creates.
MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_CLUSTER = "llmlaunch.io/cluster"
LABEL_RUN = "llmlaunch.io/run"
LABEL_RUN_ID = "llmlaunch.io/run-id"
LABEL_OWNER = "llmlaunch.io/owner"
ANNOTATION_OWNER = "llmlaunch.io/owner"  # the owner as given; the label holds a sanitized form

# How an ephemeral run finds its spec (trainers.entry reads these).
ENTRYPOINT = "python -m trainers.entry"
SPEC_FILE_ENV = "LLMLAUNCH_SPEC_FILE"
SPEC_ENV = "LLMLAUNCH_SPEC"
RUN_ID_ENV = "LLMLAUNCH_RUN_ID"
IMAGE_ENV = "LLMLAUNCH_IMAGE"
SPEC_VOLUME = "llmlaunch-spec"
SPEC_DIR = "/etc/llmlaunch/spec"
SPEC_KEY = "spec.json"
SPEC_FILE = f"{SPEC_DIR}/{SPEC_KEY}"
CONFIGMAP_MAX_BYTES = 1_000_000  # the API server refuses objects over ~1 MiB

GPU_RESOURCE = "nvidia.com/gpu"
# GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule (GKE does it for you) to keep
# CPU pods off expensive nodes; GPU pods tolerate it.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
SUBMISSION_MODE = "K8sJobMode"  # KubeRay runs `ray job submit` in a Kubernetes Job next to the cluster
RAYJOB_NAME_MAX = 47  # KubeRay appends 6 characters for the cluster it creates (limit 53)
RAYCLUSTER_NAME_MAX = 53


def label_value(text: str, fallback: str = "unknown") -> str:
    """`text` made into a valid label value (at most 63 letters, digits, '-', '_', '.')."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text))[:63]
    value = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)
    return value or fallback


def job_id(run_name: str, run_id: str) -> str:
    """The Ray job id of a run: the same on every cluster kind (`launcher.submit`)."""
    return f"{run_name}-{run_id}"


def rayjob_name(run_name: str, run_id: str) -> str:
    """The RayJob's name: `<run name>-<run id>` as a DNS-1035 label of at most 47 characters."""

    def clean(text: str) -> str:
        return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")

    rid = clean(run_id) or hashlib.sha256(run_id.encode()).hexdigest()[:8]
    if len(rid) > 24:
        rid = hashlib.sha256(run_id.encode()).hexdigest()[:12]
    base = clean(run_name)
    if not base[:1].isalpha():
        base = f"run-{base}".rstrip("-")
    name = f"{base[: RAYJOB_NAME_MAX - len(rid) - 1].rstrip('-')}-{rid}"
    if problem := dns1035_label_problem(name, RAYJOB_NAME_MAX):  # cannot happen; never apply a bad name
        raise ValueError(f"RayJob name {name!r} {problem}")
    return name


def _labels(defn: KubernetesCluster, owner: str, **extra: str) -> dict[str, str]:
    return {**defn.labels, MANAGED_BY: "llmlaunch", LABEL_CLUSTER: defn.name,
            LABEL_OWNER: label_value(owner), **extra}


def _metadata(name: str, namespace: str, labels: dict[str, str], owner: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:
        meta["annotations"] = {ANNOTATION_OWNER: owner}
    return meta


def _bytes_quantity(n: Decimal) -> str:
    n = int(n)
    for suffix, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def _shm(shm_size: str | None, memory: str) -> str:
    # Default half the pod's memory: the Ray object store takes ~30% and wants to live in
    # /dev/shm; NCCL and DataLoader workers use the rest.
    return shm_size or _bytes_quantity(parse_quantity(memory) / 2 // 2**20 * 2**20)


def _env(defn: KubernetesCluster) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(defn.env.items())]
    # Named by the job when the image lacks the training packages (trainers.user_errors).
    env.append({"name": IMAGE_ENV, "value": defn.image})
    if defn.storage_secret is not None:
        secret = defn.storage_secret
        for var, key in sorted(secret.keys.items()):
            ref: dict[str, Any] = {"name": secret.name, "key": key}
            if secret.optional:
                ref["optional"] = True
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return env


def _tolerations(items: Sequence[Toleration | dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for t in items:
        manifest = t.manifest() if isinstance(t, Toleration) else dict(t)
        if manifest not in out:
            out.append(manifest)
    return out


def _pod_template(defn: KubernetesCluster, *, container: str, cpu: str, memory: str, shm_size: str | None,
                  gpus: int, node_selector: Mapping[str, str], tolerations: list[dict[str, Any]],
                  labels: dict[str, str], priority_class: str | None = None,
                  spec_configmap: str | None = None) -> dict[str, Any]:
    resources = {"cpu": cpu, "memory": memory}
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                  "sizeLimit": _shm(shm_size, memory)}}]
    if spec_configmap:
        mounts.append({"name": SPEC_VOLUME, "mountPath": SPEC_DIR, "readOnly": True})
        volumes.append({"name": SPEC_VOLUME, "configMap": {"name": spec_configmap}})
    mounts += copy.deepcopy(defn.volume_mounts)
    volumes += copy.deepcopy(defn.volumes)
    ray_container: dict[str, Any] = {
        "name": container,
        "image": defn.image,
        "imagePullPolicy": defn.image_pull_policy,
        # requests = limits: Guaranteed QoS, no overcommitted GPUs or memory.
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": mounts,
    }
    if env := _env(defn):
        ray_container["env"] = env
    if container == "ray-worker":
        # Leave the cluster cleanly when a pod is deleted (scale-down, spot reclaim).
        ray_container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}
    spec: dict[str, Any] = {"containers": [ray_container], "volumes": volumes}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = tolerations
    if priority_class:
        spec["priorityClassName"] = priority_class
    if defn.service_account:
        spec["serviceAccountName"] = defn.service_account
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _ray_resources_param(resources: dict[str, int]) -> str:
    # KubeRay passes the value to `ray start --resources=...` through a shell, and the Ray
    # autoscaler parses this exact quoting: '"{\"accelerator_type:H100\": 1}"'.
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def _worker_group(defn: KubernetesCluster, group: WorkerGroup, labels: dict[str, str],
                  spec_configmap: str | None) -> dict[str, Any]:
    tolerations = _tolerations(([GPU_TOLERATION] if group.gpus else [])
                               + (list(defn.spot_pool.tolerations) if group.spot else []) + list(group.tolerations))
    spec: dict[str, Any] = {
        "groupName": group.name,
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "template": _pod_template(defn, container="ray-worker", cpu=group.cpu, memory=group.memory,
                                  shm_size=group.shm_size, gpus=group.gpus,
                                  node_selector=worker_node_selector(group, defn.spot_pool),
                                  tolerations=tolerations, labels=labels,
                                  priority_class=group.priority_class, spec_configmap=spec_configmap),
    }
    if group.gpu_type:
        # The resource Ray itself reports on such a node; declaring it lets the autoscaler
        # scale this group from zero for `accelerator_type` requests.
        spec["rayStartParams"]["resources"] = _ray_resources_param({f"accelerator_type:{group.gpu_type}": 1})
    return spec


def _cluster_spec(defn: KubernetesCluster, labels: dict[str, str], spec_configmap: str | None = None) -> dict[str, Any]:
    head_params = {"dashboard-host": "0.0.0.0"}  # inside the pod; reachable through the ClusterIP Service only
    if defn.worker_groups:
        head_params["num-cpus"] = "0"  # keep training and data tasks off the head
    spec: dict[str, Any] = {
        "rayVersion": defn.ray_version,
        "enableInTreeAutoscaling": defn.autoscaling,
        "headGroupSpec": {
            "serviceType": defn.dashboard_service_type,
            "rayStartParams": head_params,
            "template": _pod_template(defn, container="ray-head", cpu=defn.head.cpu, memory=defn.head.memory,
                                      shm_size=defn.head.shm_size, gpus=0, node_selector=defn.head.node_selector,
                                      tolerations=_tolerations(defn.head.tolerations), labels=labels,
                                      spec_configmap=spec_configmap),
        },
        # Always present, even empty: the Ray autoscaler reads the key.
        "workerGroupSpecs": [_worker_group(defn, g, labels, spec_configmap) for g in defn.worker_groups],
    }
    if defn.autoscaling:
        sidecar = {"cpu": "500m", "memory": "512Mi"}
        spec["autoscalerOptions"] = {"upscalingMode": "Default",
                                     "resources": {"requests": dict(sidecar), "limits": dict(sidecar)}}
    return spec


def render_raycluster(defn: KubernetesCluster, owner: str) -> dict[str, Any]:
    """The persistent `RayCluster` of `launch up <name>`, named after the definition."""
    labels = _labels(defn, owner)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(defn.name, defn.namespace, labels, owner),
        "spec": _cluster_spec(defn, labels),
    }


def _check_job_env(env: Mapping[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if name in (SPEC_ENV, SPEC_FILE_ENV, RUN_ID_ENV):
            raise ValueError(f"env: {name} is set by render_rayjob (the spec travels by reference, in a ConfigMap)")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ValueError(f"env: {name!r} is not a valid environment variable name")
        if looks_secret(name):
            # Name only: the value must not reach an error message either.
            raise ValueError(f"env: {name} looks like a credential; on Kubernetes credentials come from a Secret "
                             "(the cluster's storage_secret), never as values in a manifest")
        if not isinstance(value, str):
            raise ValueError(f"env: {name} must be a string")
    return dict(env)


def render_rayjob(defn: KubernetesCluster, *, spec_json: str, run_name: str, run_id: str, owner: str,
                  env: Mapping[str, str]) -> list[dict[str, Any]]:
    """`[RayJob, ConfigMap]` for one ephemeral run (apply in this order, see the module doc).

    `env` is the job's plain environment (no spec, no credentials: ValueError names the
    offending variable). The cluster is deleted `ephemeral_defaults.ttl_seconds_after_finished`
    after the run ends."""
    try:
        method = json.loads(spec_json).get("method", "")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError("spec_json must be a JSON object") from None
    if len(spec_json.encode()) > CONFIGMAP_MAX_BYTES:
        raise ValueError(f"the run spec is {len(spec_json.encode())} bytes; a ConfigMap holds at most {CONFIGMAP_MAX_BYTES}")
    env_vars = {**_check_job_env(env), SPEC_FILE_ENV: SPEC_FILE, RUN_ID_ENV: run_id}
    name = rayjob_name(run_name, run_id)
    configmap = f"{name}-spec"
    labels = _labels(defn, owner, **{LABEL_RUN: name, LABEL_RUN_ID: label_value(run_id)})
    eph = defn.ephemeral_defaults
    job_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "jobId": job_id(run_name, run_id),
        "metadata": {"llmlaunch.name": run_name, "llmlaunch.run_id": run_id, "llmlaunch.method": str(method)},
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": env_vars}, sort_keys=True),
        "submissionMode": SUBMISSION_MODE,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": eph.ttl_seconds_after_finished,
        "backoffLimit": eph.backoff_limit,
        "rayClusterSpec": _cluster_spec(defn, labels, spec_configmap=configmap),
    }
    if eph.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = eph.active_deadline_seconds
    rayjob = {"apiVersion": API_VERSION, "kind": "RayJob",
              "metadata": _metadata(name, defn.namespace, labels, owner), "spec": job_spec}
    spec_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(configmap, defn.namespace, labels),
                "immutable": True, "data": {SPEC_KEY: spec_json}}
    return [rayjob, spec_map]


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """A copy of `obj` that Kubernetes deletes with `owner` (an object as returned by the API
    server, so with `metadata.uid`). No `blockOwnerDeletion`: that would need rights on the
    owner's finalizers."""
    out = copy.deepcopy(obj)
    out["metadata"]["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                           "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]
    return out


# --- what an admin applies once (k8s/) ----------------------------------------------------

ADMIN_LABELS = {MANAGED_BY: "llmlaunch"}

# The launcher's rights in its namespace, and why each is needed. Nothing cluster-wide, no
# Secrets (pods read the storage Secret themselves), no pods/exec, no creating pods directly.
LAUNCHER_RULES: list[tuple[dict[str, Any], str]] = [
    ({"apiGroups": ["ray.io"], "resources": ["rayclusters", "rayjobs"],
      "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
     "create/patch/delete the persistent RayCluster (`launch up/down`) and per-run RayJobs "
     "(`--ephemeral`, `launch cancel`); get/list/watch their status (`launch status`, waiting for ready)"),
    ({"apiGroups": [""], "resources": ["pods", "services", "events"], "verbs": ["get", "list", "watch"]},
     "find the head pod and the head Service (dashboard / Jobs API), watch pods start, and show "
     "scheduling events (no GPU node, image pull errors, missing Secret) when a cluster does not come up"),
    ({"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
     "show the head's log when Ray itself fails to start"),
    ({"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create", "get"]},
     "reach the ClusterIP dashboard from a laptop by port-forward: `create` for SPDY and (Kubernetes "
     "1.35+) WebSocket requests, `get` for WebSocket requests on 1.31-1.34"),
    ({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "delete"]},
     "each ephemeral run's spec: created owned by its RayJob (so deleted with it), read back by "
     "`launch status`, deleted by the launcher when a submission is abandoned half-way"),
]


def render_admin(namespace: str, service_account: str = "llmlaunch") -> list[dict[str, Any]]:
    """Namespace, the launcher's ServiceAccount, its Role (LAUNCHER_RULES) and the RoleBinding.

    k8s/namespace.yaml and k8s/rbac.yaml are exactly this for `ml-training` (a test checks)."""
    meta = {"namespace": namespace, "labels": dict(ADMIN_LABELS)}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": dict(ADMIN_LABELS)}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, **copy.deepcopy(meta)}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": service_account, **copy.deepcopy(meta)},
         "rules": [copy.deepcopy(rule) for rule, _why in LAUNCHER_RULES]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": service_account, **copy.deepcopy(meta)},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": service_account},
         "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
    ]


def storage_secret_template(namespace: str, secret: StorageSecret | None = None) -> dict[str, Any]:
    """The storage Secret with placeholder values, for an admin to fill in (k8s/storage-secret.example.yaml)."""
    secret = secret or StorageSecret()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret.name, "namespace": namespace, "labels": dict(ADMIN_LABELS)},
        "type": "Opaque",
        "stringData": {key: f"REPLACE-WITH-{var}" for var, key in sorted(secret.keys.items())},
    }


def to_yaml(objects: Sequence[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream (for --dry-run output and `kubectl apply -f -`)."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)
