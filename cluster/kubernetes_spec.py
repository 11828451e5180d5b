"""Kubernetes (KubeRay) cluster definitions: `configs/clusters/NAME.yaml` with `kind: kubernetes`.

A platform team writes one file per cluster; ML engineers only name it
(`launch --cluster prod run.yaml`). The models here hold what differs between clusters
(namespace, image, pod sizes, GPU pools, scheduling, storage credentials); how those
become KubeRay manifests is `cluster.kubernetes_render`.

Also home of the Kubernetes name and label rules (`dns1123_label_problem`, ...), shared
with `cluster.crd_schema`: plain Python, no Kubernetes client import.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from cluster import looks_secret  # shared: the launcher checks every run spec's `env` by it too

# --- Kubernetes name, label and quantity rules (k8s.io/apimachinery/pkg/util/validation) ---

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_QUANTITY_SCALE = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3,
                   "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def dns1123_label_problem(value: str, max_len: int = 63) -> str | None:
    """Why `value` is not a DNS-1123 label (container, volume, group names), or None."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > max_len:
        return f"must be at most {max_len} characters (got {len(value)})"
    if not _DNS1123_LABEL.match(value):
        return "must be lower-case letters, digits and '-', starting and ending with a letter or digit"
    return None


def dns1035_label_problem(value: str, max_len: int = 63) -> str | None:
    """Like a DNS-1123 label but starting with a letter (names KubeRay turns into Services)."""
    problem = dns1123_label_problem(value, max_len)
    if problem is None and not _DNS1035_LABEL.match(value):
        problem = "must start with a lower-case letter"
    return problem


def dns1123_subdomain_problem(value: str) -> str | None:
    """Why `value` is not a DNS-1123 subdomain (most object names), or None."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > 253:
        return f"must be at most 253 characters (got {len(value)})"
    if not _DNS1123_SUBDOMAIN.match(value):
        return "must be lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
    return None


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label / annotation / node-selector key, or None."""
    if not isinstance(key, str) or not key:
        return "must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (problem := dns1123_subdomain_problem(prefix)):
        return f"prefix {prefix!r} {problem}"
    if len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return (f"name part {name!r} must be at most 63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def label_value_problem(value: Any) -> str | None:
    """Why `value` is not a valid label value, or None."""
    if not isinstance(value, str):
        return f"must be a string (got {type(value).__name__}; quote it in YAML)"
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return ("must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
                "letter or digit (or empty)")
    return None


def config_key_problem(key: str) -> str | None:
    """Why `key` cannot be a ConfigMap / Secret data key, or None."""
    if not isinstance(key, str) or not key or len(key) > 253 or not _CONFIG_KEY.match(key):
        return "must be 1-253 letters, digits, '-', '_' or '.'"
    return None


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity (`8`, `500m`, `64Gi`, `1e3`) as a Decimal; ValueError if malformed."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    suffix = match.group(3) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(text)
        return Decimal(text[: len(text) - len(suffix)]) * Decimal(_QUANTITY_SCALE[suffix])
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None


# --- field types --------------------------------------------------------------------------


def _as_text(value: Any) -> Any:
    # YAML gives `cpu: 8` as an int; Kubernetes wants quantities as strings.
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _positive_quantity(value: str) -> str:
    if parse_quantity(value) <= 0:
        raise ValueError(f"{value!r} must be greater than zero")
    return value


def _memory(value: str) -> str:
    if parse_quantity(value) < 256 * 2**20:
        raise ValueError(f"{value!r} is less than 256Mi: memory is in bytes unless suffixed (did you mean {value}Gi?)")
    return value


def _check(problem_of):
    def check(value: str) -> str:
        problem = problem_of(value)
        if problem:
            raise ValueError(f"{value!r} {problem}")
        return value

    return check


Cpu = Annotated[str, BeforeValidator(_as_text), AfterValidator(_positive_quantity)]
"""CPU cores as a Kubernetes quantity: `8`, `0.5`, `500m`."""
Memory = Annotated[str, BeforeValidator(_as_text), AfterValidator(_positive_quantity), AfterValidator(_memory)]
"""Bytes as a Kubernetes quantity: `64Gi`, `512Mi`."""
LabelName = Annotated[str, AfterValidator(_check(dns1123_label_problem))]
ObjectName = Annotated[str, AfterValidator(_check(dns1123_subdomain_problem))]
LabelKey = Annotated[str, AfterValidator(_check(label_key_problem))]
LabelValue = Annotated[str, BeforeValidator(_as_text), AfterValidator(_check(label_value_problem))]


def _plain_env_name(name: str) -> str:
    if not _ENV_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid environment variable name")
    if looks_secret(name):
        raise ValueError(f"{name} looks like a credential: put it in the Kubernetes Secret named by "
                         "`storage_secret` (keys), never as a plain value in a cluster definition")
    if name.startswith("LLMLAUNCH_"):
        raise ValueError(f"{name}: LLMLAUNCH_* variables are set by the launcher")
    return name


# Validated as dict *keys*: an error then names the variable, never echoes its value.
PlainEnvName = Annotated[str, AfterValidator(_plain_env_name)]
EnvName = Annotated[str, AfterValidator(_check(lambda n: None if _ENV_NAME.match(n) else "is not a valid "
                                                                                          "environment variable name"))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --- models -------------------------------------------------------------------------------


class Toleration(_Strict):
    """A Kubernetes toleration (same fields): lets pods run on nodes with a matching taint."""

    key: str | None = None
    """Taint key (e.g. `nvidia.com/gpu`); empty with operator `Exists` tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches `value`; `Exists` matches any value of `key`."""
    value: str | None = None
    """Taint value to match (operator `Equal` only)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    tolerationSeconds: int | None = Field(None, ge=0)  # noqa: N815 (Kubernetes' own field name)
    """How long a pod stays on a node after a `NoExecute` taint appears (e.g. a spot reclaim notice)."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.key is not None and (problem := label_key_problem(self.key)):
            raise ValueError(f"key {self.key!r} {problem}")
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if self.operator == "Equal" and not self.key:
            raise ValueError("operator Equal needs a key (use operator Exists to tolerate every taint)")
        if self.value is not None and (problem := label_value_problem(self.value)):
            raise ValueError(f"value {self.value!r} {problem}")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies to effect NoExecute only")
        return self

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class StorageSecret(_Strict):
    """The Kubernetes Secret (created by an admin, see k8s/) holding the storage credentials.

    Pods read each key as an environment variable through `secretKeyRef`: the values never
    pass through the launcher or appear in a manifest."""

    name: ObjectName = "llmlaunch-s3"
    """Name of the Secret in the cluster's namespace."""
    keys: dict[EnvName, Annotated[str, AfterValidator(_check(config_key_problem))]] = {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    }
    """Environment variable in the pods -> key in the Secret."""
    optional: bool = False
    """If true, pods start even when the Secret or a key is missing (credentials then come from
    elsewhere, e.g. a workload identity); if false they wait, with an event naming the Secret."""


class HeadSpec(_Strict):
    """The Ray head pod: GCS, dashboard / Jobs API and the job driver. CPU only."""

    cpu: Cpu = "8"
    """CPU cores (request = limit)."""
    memory: Memory = "32Gi"
    """Memory (request = limit)."""
    shm_size: Memory | None = None
    """Size of the memory-backed /dev/shm (Ray object store, DataLoader workers); default: half of `memory`.
    It counts against `memory`."""
    node_selector: dict[LabelKey, LabelValue] = {}
    """Node labels the head pod must match."""
    tolerations: list[Toleration] = []
    """Taints the head pod tolerates."""

    @model_validator(mode="after")
    def _shm_fits(self) -> HeadSpec:
        _check_shm(self.shm_size, self.memory)
        return self


# Typical `nvidia.com/gpu.product` values (GPU Feature Discovery) per Ray accelerator type.
# Clouds and SKUs differ (PCIe vs SXM, memory size): set `gpu_product` when yours do.
GPU_PRODUCTS = {
    "H100": "NVIDIA-H100-80GB-HBM3",
    "H200": "NVIDIA-H200",
    "B200": "NVIDIA-B200",
    "A100-80G": "NVIDIA-A100-SXM4-80GB",
    "A100-40G": "NVIDIA-A100-SXM4-40GB",
    "L40S": "NVIDIA-L40S",
    "L4": "NVIDIA-L4",
    "A10G": "NVIDIA-A10G",
}
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
_ACCELERATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")


class WorkerGroup(_Strict):
    """One pool of identical Ray worker pods (one KubeRay `workerGroupSpec`)."""

    name: Annotated[LabelName, Field(max_length=40)]
    """Group name (DNS-1123 label); appears in pod names and the `ray.io/group` label."""
    gpus: int = Field(0, ge=0, le=16)
    """GPUs per pod (`nvidia.com/gpu` limit); 0 for a CPU-only group."""
    gpu_type: str | None = None
    """Ray accelerator type (`H100`, `A100-80G`, `L4`, ...). Selects nodes by `nvidia.com/gpu.product`
    and advertises the Ray resource `accelerator_type:<gpu_type>`, so runs asking for that accelerator
    can scale this group up from zero."""
    gpu_product: str | None = None
    """Value of the `nvidia.com/gpu.product` node label to select; default from `gpu_type` (see
    GPU_PRODUCTS)."""
    cpu: Cpu = "8"
    """CPU cores per pod (request = limit)."""
    memory: Memory = "64Gi"
    """Memory per pod (request = limit)."""
    shm_size: Memory | None = None
    """Size of the memory-backed /dev/shm (NCCL, DataLoader workers, Ray object store); default: half
    of `memory`. It counts against `memory`."""
    replicas: int | None = Field(None, ge=0)
    """Pods at start; default `min_replicas`."""
    min_replicas: int = Field(0, ge=0)
    """Fewest pods the autoscaler keeps (0: the group costs nothing while idle)."""
    max_replicas: int = Field(1, ge=1)
    """Most pods the autoscaler may start."""
    node_selector: dict[LabelKey, LabelValue] = {}
    """Node labels the pods must match (added to the GPU product and spot selectors)."""
    tolerations: list[Toleration] = []
    """Taints the pods tolerate (GPU groups tolerate `nvidia.com/gpu` taints already)."""
    priority_class: ObjectName | None = None
    """Kubernetes PriorityClass of the pods (e.g. to preempt lower-priority batch work)."""
    spot: bool = False
    """Run on spot / preemptible nodes: adds the cluster's `spot_pool` node selector and tolerations."""

    @model_validator(mode="after")
    def _consistent(self) -> WorkerGroup:
        if self.replicas is None:
            self.replicas = self.min_replicas
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got "
                             f"{self.min_replicas} <= {self.replicas} <= {self.max_replicas}")
        if self.gpu_type is not None:
            if not _ACCELERATOR.match(self.gpu_type):
                raise ValueError(f"gpu_type {self.gpu_type!r} must be a Ray accelerator name such as H100")
            if self.gpus == 0:
                raise ValueError("gpu_type is set but gpus is 0")
            if self.gpu_product is None and self.gpu_type not in GPU_PRODUCTS:
                raise ValueError(f"gpu_type {self.gpu_type!r} has no known `nvidia.com/gpu.product` label: set "
                                 f"gpu_product (known types: {', '.join(GPU_PRODUCTS)})")
        if self.gpu_product is not None:
            if self.gpus == 0:
                raise ValueError("gpu_product is set but gpus is 0")
            if problem := label_value_problem(self.gpu_product):
                raise ValueError(f"gpu_product {self.gpu_product!r} {problem}")
        _check_shm(self.shm_size, self.memory)
        return self

    @property
    def product(self) -> str | None:
        """The `nvidia.com/gpu.product` value this group selects, if any."""
        return self.gpu_product or (GPU_PRODUCTS.get(self.gpu_type) if self.gpu_type else None)


def _check_shm(shm: str | None, memory: str) -> None:
    if shm is not None and parse_quantity(shm) > parse_quantity(memory):
        raise ValueError(f"shm_size {shm} is larger than memory {memory}: /dev/shm is charged to the pod's memory")


class SpotPool(_Strict):
    """How spot / preemptible nodes are told apart, for worker groups with `spot: true`.

    The default is a cloud-neutral convention: give spot node pools the label and the taint
    `llmlaunch.io/capacity-type=spot` (see k8s/README.md). Or match your cloud's own label:
    EKS `eks.amazonaws.com/capacityType: SPOT`, Karpenter `karpenter.sh/capacity-type: spot`,
    GKE `cloud.google.com/gke-spot: "true"`, AKS `kubernetes.azure.com/scalesetpriority: spot`."""

    node_selector: dict[LabelKey, LabelValue] = {"llmlaunch.io/capacity-type": "spot"}
    """Labels that spot nodes carry."""
    tolerations: list[Toleration] = [Toleration(key="llmlaunch.io/capacity-type", operator="Equal", value="spot",
                                                effect="NoSchedule")]
    """Taints that spot nodes carry (so that only pods meant for them land there)."""


class EphemeralDefaults(_Strict):
    """Settings of the per-run `RayJob` (`launch --ephemeral`): its cluster lives as long as the run."""

    ttl_seconds_after_finished: int = Field(600, ge=0)
    """Seconds the finished run's cluster is kept (to read logs) before KubeRay deletes it."""
    active_deadline_seconds: int | None = Field(None, gt=0)
    """Fail the run after this many seconds, whatever its state (default: no limit)."""
    backoff_limit: int = Field(0, ge=0)
    """Retries of a failed run on a fresh cluster (each resumes from the last complete checkpoint)."""


class KubernetesCluster(_Strict):
    """A Ray cluster on Kubernetes, run by the KubeRay operator (which an admin installs once, k8s/)."""

    kind: Literal["kubernetes"] = "kubernetes"
    name: Annotated[str, AfterValidator(_check(lambda v: dns1035_label_problem(v, max_len=40)))]
    """Cluster name: the persistent `RayCluster` is called this (lower-case letters, digits, '-';
    starts with a letter; at most 40 characters, as KubeRay derives Service and pod names from it)."""
    namespace: LabelName = "default"
    """Namespace of every object (created by the admin, with the launcher's RBAC: k8s/)."""
    image: str = Field("rayproject/ray:2.60.0-py311-gpu", min_length=1)
    """Container image of the head and workers. It must hold Ray 2.60 and `llmlaunch[train]`
    (torch, deepspeed, transformers, ...) built for the nodes' CUDA: the stock rayproject image
    lacks the latter, so build one `FROM` it (`pip install 'llmlaunch[train]'`)."""
    ray_version: str = Field("2.60.0", pattern=r"^\d+\.\d+\.\d+$")
    """Ray version in `image` (KubeRay's `rayVersion`)."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """When nodes pull `image`."""
    service_account: ObjectName | None = None
    """ServiceAccount the Ray pods run as (e.g. one bound to a cloud IAM role for storage). Default:
    none set; KubeRay then makes one for its autoscaler. When set and `autoscaling` is on, KubeRay binds
    its autoscaler Role (scale this RayCluster) to this account, and every pod running as it gets
    that right. Never the launcher's own account (k8s/rbac.yaml): training code must not create clusters."""
    storage_secret: StorageSecret | None = StorageSecret()
    """Secret with storage credentials, read by the pods as environment variables; null when the pods
    get credentials otherwise (workload identity, instance roles)."""
    env: dict[PlainEnvName, str] = {}
    """Plain, non-secret environment of every pod (`AWS_ENDPOINT_URL`, `AWS_REGION`, `HF_HOME`, ...).
    Names that look like credentials are rejected: those belong in `storage_secret`."""
    head: HeadSpec = HeadSpec()
    """The head pod."""
    worker_groups: list[WorkerGroup] = []
    """Worker pools; empty runs everything on the head (for tests and tiny jobs)."""
    autoscaling: bool = True
    """Run KubeRay's in-tree Ray autoscaler: groups scale between min and max replicas on demand."""
    spot_pool: SpotPool = SpotPool()
    """How spot nodes are labelled and tainted (used by groups with `spot: true`)."""
    volumes: list[dict[str, Any]] = []
    """Extra pod volumes, as Kubernetes `Volume` objects (e.g. a PVC for a shared model cache)."""
    volume_mounts: list[dict[str, Any]] = []
    """Where the extra volumes appear in the Ray containers, as Kubernetes `VolumeMount` objects."""
    labels: dict[LabelKey, LabelValue] = {}
    """Extra labels on every object and pod (cost centre, team, ...)."""
    ephemeral_defaults: EphemeralDefaults = EphemeralDefaults()
    """Settings of per-run clusters (`RayJob`, `--ephemeral`)."""
    dashboard_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Type of the head Service (dashboard / Jobs API). `ClusterIP`: reached by port-forward or from
    inside the cluster. The Jobs API runs arbitrary code: never expose it with a public LoadBalancer."""

    @model_validator(mode="after")
    def _consistent(self) -> KubernetesCluster:
        names = [g.name for g in self.worker_groups]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"worker group names must be unique: {', '.join(dupes)}")
        if not self.autoscaling and self.worker_groups and not any(g.replicas for g in self.worker_groups):
            raise ValueError("autoscaling is off and every worker group has 0 replicas: no worker would ever start")
        for group in self.worker_groups:
            worker_node_selector(group, self.spot_pool)  # raises on contradicting selectors
        if self.storage_secret:
            if clash := sorted(set(self.env) & set(self.storage_secret.keys)):
                raise ValueError(f"env and storage_secret.keys both set {', '.join(clash)}")
        for key in self.labels:
            if key.startswith(("ray.io/", "llmlaunch.io/", "app.kubernetes.io/managed-by")):
                raise ValueError(f"label {key!r}: ray.io/, llmlaunch.io/ and managed-by labels are set by "
                                 "KubeRay and the launcher")
        volume_names = []
        for i, volume in enumerate(self.volumes):
            name = volume.get("name") if isinstance(volume, dict) else None
            problem = dns1123_label_problem(name) if isinstance(name, str) else "missing"
            if problem:
                raise ValueError(f"volumes[{i}].name {name!r} must be a DNS-1123 label ({problem})")
            if name in RESERVED_VOLUMES:
                raise ValueError(f"volumes[{i}].name {name!r} is used by the launcher ({', '.join(RESERVED_VOLUMES)})")
            volume_names.append(name)
        for i, mount in enumerate(self.volume_mounts):
            if not isinstance(mount, dict) or mount.get("name") not in volume_names:
                raise ValueError(f"volume_mounts[{i}] must name one of `volumes` ({', '.join(volume_names) or 'none'})")
            path = str(mount.get("mountPath", ""))
            if not path.startswith("/") or path.rstrip("/") in RESERVED_MOUNT_PATHS:
                raise ValueError(f"volume_mounts[{i}].mountPath {path!r} must be absolute and not one of "
                                 f"{', '.join(RESERVED_MOUNT_PATHS)}")
        return self


def worker_node_selector(group: WorkerGroup, spot_pool: SpotPool) -> dict[str, str]:
    """The node selector of a group's pods: GPU product, spot pool, then the group's own labels."""
    selector: dict[str, str] = {}
    parts = [({GPU_PRODUCT_LABEL: group.product} if group.product else {}, "gpu_type / gpu_product"),
             (spot_pool.node_selector if group.spot else {}, "spot_pool.node_selector"),
             (group.node_selector, "node_selector")]
    for part, source in parts:
        for key, value in part.items():
            if selector.get(key, value) != value:
                raise ValueError(f"worker group {group.name!r}: {source} wants {key}={value} but another "
                                 f"setting wants {key}={selector[key]}")
            selector[key] = value
    return selector


# Volumes and mount paths every rendered pod has (cluster.kubernetes_render).
RESERVED_VOLUMES = ("dshm", "llmlaunch-spec")
RESERVED_MOUNT_PATHS = ("/dev/shm", "/etc/llmlaunch")
