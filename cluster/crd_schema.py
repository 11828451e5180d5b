"""Offline checks of rendered manifests: the KubeRay v1 CRD schema made strict, plus the rules a
schema cannot express (object names, label syntax, enum-like strings, KubeRay's own webhook rules).

No API server is needed. The CRDs are KubeRay's (v1.7.0), vendored with the package in
`cluster/kuberay_crds/` (see its README.md; Apache-2.0, LICENSE beside them). `$LLMLAUNCH_KUBERAY_CRDS`,
if set, names a directory to use first (`CRDsNotFound` names every place tried).

Strict, because the API server is not: it prunes fields a CRD schema does not declare, so a
misspelt `tolerations` in a manifest is silently dropped, not rejected. `load_strict_schema`
rewrites the CRD's `openAPIV3Schema` the way a strict reader would:
- every object node with `properties` and no `additionalProperties` gets `additionalProperties:
  false` (`x-kubernetes-preserve-unknown-fields: true` keeps a node open);
- a `required` entry whose property has a `default` is dropped (the API server fills defaults
  before it validates);
- `x-kubernetes-int-or-string` becomes `anyOf: [integer, string]`, `nullable` adds `null`,
  `format: int32/int64` becomes minimum/maximum;
- the root `metadata` (just `type: object` in a CRD; the API server checks ObjectMeta itself) is
  replaced with a strict subset of ObjectMeta, `apiVersion`/`kind` must match the CRD, and
  `status` is refused (a manifest to apply has none);
- `x-kubernetes-list-type: map/set` is enforced (no two items with the same keys), as the API
  server does. `x-kubernetes-validations` (CEL) cannot be evaluated here: the rules on fields we
  might set are re-implemented in `explicit_problems`.

jsonschema is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator

import yaml

from cluster.kubernetes_spec import (
    config_key_problem,
    dns1035_label_problem,
    dns1123_label_problem,
    dns1123_subdomain_problem,
    label_key_problem,
    label_value_problem,
    parse_quantity,
)

CRDS_ENV = "LLMLAUNCH_KUBERAY_CRDS"
# The kinds we render and validate; their CRDs are the files vendored in VENDORED_CRDS.
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
VENDORED_CRDS = Path(__file__).resolve().parent / "kuberay_crds"


class CRDsNotFound(FileNotFoundError):
    """The KubeRay CRD files are not where we looked."""


def crd_dir() -> Path:
    """The directory holding the KubeRay CRDs; CRDsNotFound names every place tried."""
    tried = []
    env = os.environ.get(CRDS_ENV)
    candidates = ([(Path(env).expanduser(), f"${CRDS_ENV}")] if env else []) + [
        (VENDORED_CRDS, "vendored with the package")]
    for path, why in candidates:
        if all((path / f).is_file() for f in CRD_FILES.values()):
            return path
        tried.append(f"{path} ({why})")
    if not env:
        tried.append(f"${CRDS_ENV} (not set)")
    raise CRDsNotFound(f"KubeRay CRDs ({', '.join(CRD_FILES.values())}) not found; looked in: "
                       + "; ".join(tried) + f". Set {CRDS_ENV} to a directory holding the KubeRay v1.7.0 CRDs.")


# --- strict schema ------------------------------------------------------------------------

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}

# The parts of ObjectMeta a manifest to apply may carry (server-set fields are refused).
_LABEL_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _LABEL_MAP,
        "annotations": _LABEL_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["apiVersion", "kind", "name", "uid"],
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                           "name": {"type": "string"}, "uid": {"type": "string"},
                           "controller": {"type": "boolean"}, "blockOwnerDeletion": {"type": "boolean"}}}},
    },
}


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: (_strict(v) if k in ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf",
                                     "not") else v) for k, v in node.items()}
    if isinstance(node.get("properties"), dict):
        node["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in node and "additionalProperties" not in node and not preserve:
        node["additionalProperties"] = False
    if node.get("x-kubernetes-embedded-resource") and "properties" in node:
        for key in ("apiVersion", "kind"):
            node["properties"].setdefault(key, {"type": "string"})
        node["properties"].setdefault("metadata", {"type": "object"})
    if "required" in node:
        props = node.get("properties", {})
        required = [r for r in node["required"] if "default" not in props.get(r, {})]
        if required:
            node["required"] = required
        else:
            del node["required"]
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if node.get("format") in _INT_RANGES:
        low, high = _INT_RANGES[node["format"]]
        node.setdefault("minimum", low)
        node.setdefault("maximum", high)
    return node


def load_strict_schema(crd_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `v1` schema of a CRD file, made strict (see the module doc)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: libyaml is 4x faster
    crd = yaml.load(Path(crd_path).read_text(encoding="utf-8"), Loader=loader)
    versions = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    if not versions:
        raise ValueError(f"{crd_path}: no v1 version in the CRD")
    schema = _strict(copy.deepcopy(versions[0]["schema"]["openAPIV3Schema"]))
    props = schema["properties"]
    props["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    props["kind"] = {"const": crd["spec"]["names"]["kind"]}
    props["metadata"] = copy.deepcopy(OBJECT_META)
    props.pop("status", None)
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


@functools.lru_cache(maxsize=None)
def _validator(path: str) -> Any:
    import jsonschema
    from jsonschema import ValidationError

    def list_type(validator, kind, instance, schema):
        if not validator.is_type(instance, "array"):
            return
        if kind == "set":
            for i, item in enumerate(instance):
                if item in instance[:i]:
                    yield ValidationError(f"duplicate item {item!r} in a set", path=(i,))
        elif kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            item_props = (schema.get("items") or {}).get("properties", {})
            seen: dict[tuple, int] = {}
            for i, item in enumerate(instance):
                if not isinstance(item, dict):
                    continue
                values = {k: item.get(k, item_props.get(k, {}).get("default")) for k in keys}
                key = json.dumps(values, sort_keys=True)
                if key in seen:
                    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                    yield ValidationError(f"duplicate entry: item {seen[key]} has the same {shown}", path=(i,))
                seen.setdefault(key, i)

    base = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    cls = jsonschema.validators.extend(base, {"x-kubernetes-list-type": list_type})
    return cls(load_strict_schema(path))


def validate(obj: dict[str, Any], kind: str | None = None) -> list[str]:
    """Strict KubeRay CRD schema errors of `obj` (a RayCluster / RayJob dict), each `$.json.path: message`."""
    kind = kind or obj.get("kind")
    if kind not in CRD_FILES:
        raise ValueError(f"no KubeRay CRD for kind {kind!r} (known: {', '.join(CRD_FILES)})")
    validator = _validator(str(crd_dir() / CRD_FILES[kind]))
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{e.json_path}: {e.message}" for e in errors]


# --- explicit checks ----------------------------------------------------------------------

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
RESTART_POLICIES = ("Always", "OnFailure", "Never")
MANAGED_BY_VALUES = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
# Object names: KubeRay makes Services from RayCluster/RayJob names (DNS-1035, length limits).
_NAME_RULES = {"RayCluster": lambda n: dns1035_label_problem(n, 53),
               "RayJob": lambda n: dns1035_label_problem(n, 47),
               "RayService": lambda n: dns1035_label_problem(n, 47),
               "Namespace": dns1123_label_problem}


def _walk(node: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _meta_problems(meta: Any, path: str, kind: str | None) -> list[str]:
    if not isinstance(meta, dict):
        return []
    out = []
    if "name" in meta:
        rule = _NAME_RULES.get(kind or "", dns1123_subdomain_problem)
        if problem := rule(meta["name"]):
            out.append(f"{path}.name: {meta['name']!r} {problem}")
    if "namespace" in meta and (problem := dns1123_label_problem(meta["namespace"])):
        out.append(f"{path}.namespace: {meta['namespace']!r} {problem}")
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            if problem := label_key_problem(key):
                out.append(f"{path}.{field}: key {key!r} {problem}")
            if field == "labels" and (problem := label_value_problem(value)):
                out.append(f"{path}.labels.{key}: {value!r} {problem}")
    return out


def _pod_spec_problems(spec: dict[str, Any], path: str) -> list[str]:
    out = []
    volumes = [v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)]
    for i, name in enumerate(volumes):
        if problem := dns1123_label_problem(name):
            out.append(f"{path}.volumes[{i}].name: {name!r} {problem}")
    for field in ("serviceAccountName", "priorityClassName"):
        if field in spec and (problem := dns1123_subdomain_problem(spec[field])):
            out.append(f"{path}.{field}: {spec[field]!r} {problem}")
    for key, value in (spec.get("nodeSelector") or {}).items():
        if problem := label_key_problem(key):
            out.append(f"{path}.nodeSelector: key {key!r} {problem}")
        if problem := label_value_problem(value):
            out.append(f"{path}.nodeSelector.{key}: {value!r} {problem}")
    for field in ("containers", "initContainers"):
        for i, c in enumerate(spec.get(field) or []):
            where = f"{path}.{field}[{i}]"
            if problem := dns1123_label_problem(c.get("name")):
                out.append(f"{where}.name: {c.get('name')!r} {problem}")
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in volumes:
                    out.append(f"{where}.volumeMounts[{j}].name: {m.get('name')!r} is not one of the pod's volumes")
            if c.get("imagePullPolicy", "IfNotPresent") not in PULL_POLICIES:
                out.append(f"{where}.imagePullPolicy: {c['imagePullPolicy']!r} is not one of {', '.join(PULL_POLICIES)}")
    if spec.get("restartPolicy", "Always") not in RESTART_POLICIES:
        out.append(f"{path}.restartPolicy: {spec['restartPolicy']!r} is not one of {', '.join(RESTART_POLICIES)}")
    return out


def dns1123_problems(obj: dict[str, Any]) -> list[str]:
    """Names and label syntax anywhere in `obj`: object/namespace names, labels and annotations
    (object and pod templates), container / volume / group names, node selectors, referenced
    Secrets, ConfigMaps, ServiceAccounts and PriorityClasses, ConfigMap / Secret keys."""
    out = _meta_problems(obj.get("metadata"), "$.metadata", obj.get("kind"))
    for path, node in _walk(obj):
        if not isinstance(node, dict) or path == "$":
            continue
        if path.endswith(".template") and isinstance(node.get("metadata"), dict):
            out += _meta_problems(node["metadata"], f"{path}.metadata", "Pod")
        if isinstance(node.get("containers"), list):
            out += _pod_spec_problems(node, path)
        if "groupName" in node and (problem := dns1123_label_problem(node["groupName"])):
            out.append(f"{path}.groupName: {node['groupName']!r} {problem}")
        for ref in ("secretKeyRef", "configMapKeyRef"):
            if isinstance(node.get(ref), dict):
                r = node[ref]
                if problem := dns1123_subdomain_problem(r.get("name")):
                    out.append(f"{path}.{ref}.name: {r.get('name')!r} {problem}")
                if problem := config_key_problem(r.get("key")):
                    out.append(f"{path}.{ref}.key: {r.get('key')!r} {problem}")
        if isinstance(node.get("configMap"), dict) and (problem := dns1123_subdomain_problem(node["configMap"].get("name"))):
            out.append(f"{path}.configMap.name: {node['configMap'].get('name')!r} {problem}")
        if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
            if problem := dns1123_subdomain_problem(node["secret"]["secretName"]):
                out.append(f"{path}.secret.secretName: {node['secret']['secretName']!r} {problem}")
    if obj.get("kind") in ("ConfigMap", "Secret"):
        for field in ("data", "stringData", "binaryData"):
            for key in obj.get(field) or {}:
                if problem := config_key_problem(key):
                    out.append(f"$.{field}: key {key!r} {problem}")
    for i, subject in enumerate(obj.get("subjects") or []):
        if subject.get("kind") == "ServiceAccount":
            if problem := dns1123_subdomain_problem(subject.get("name")):
                out.append(f"$.subjects[{i}].name: {subject.get('name')!r} {problem}")
    return out


def enum_problems(obj: dict[str, Any]) -> list[str]:
    """Enum-like strings the schemas leave free, and KubeRay's webhook / CEL rules on fields we set."""
    out = []
    for path, node in _walk(obj):
        if path.endswith(".tolerations") and isinstance(node, list):
            for i, t in enumerate(node):
                where = f"{path}[{i}]"
                op, effect = t.get("operator", "Equal"), t.get("effect", "")
                if op not in TOLERATION_OPERATORS:
                    out.append(f"{where}.operator: {op!r} is not one of {', '.join(TOLERATION_OPERATORS)}")
                if effect not in TOLERATION_EFFECTS:
                    out.append(f"{where}.effect: {effect!r} is not one of {', '.join(TOLERATION_EFFECTS[1:])} (or empty)")
                if op == "Exists" and t.get("value"):
                    out.append(f"{where}: operator Exists takes no value")
                if op == "Equal" and not t.get("key"):
                    out.append(f"{where}: operator Equal needs a key")
                if "tolerationSeconds" in t and effect != "NoExecute":
                    out.append(f"{where}.tolerationSeconds: only meaningful with effect NoExecute")
        elif isinstance(node, dict) and isinstance(node.get("emptyDir"), dict):
            medium = node["emptyDir"].get("medium", "")
            if medium not in ("", "Memory", "HugePages") and not str(medium).startswith("HugePages-"):
                out.append(f"{path}.emptyDir.medium: {medium!r} is not '', Memory or HugePages")
        elif path.endswith(".headGroupSpec") and isinstance(node, dict):
            if node.get("serviceType", "ClusterIP") not in SERVICE_TYPES:
                out.append(f"{path}.serviceType: {node['serviceType']!r} is not one of {', '.join(SERVICE_TYPES)}")
        elif path.endswith(".managedBy") and node not in MANAGED_BY_VALUES:
            out.append(f"{path}: {node!r} is not one of {', '.join(MANAGED_BY_VALUES)}")
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if obj.get("kind") == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            out.append(f"$.spec.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            out.append("$.spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            out.append("$.spec.activeDeadlineSeconds: must be positive")
        if "deletionStrategy" in spec:
            out.append("$.spec.deletionStrategy: needs KubeRay's RayJobDeletionPolicy feature gate")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            out.append("$.spec: one of rayClusterSpec or clusterSelector must be set")
        try:
            runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
            if not isinstance(runtime_env, dict):
                out.append("$.spec.runtimeEnvYAML: must be a YAML mapping")
        except yaml.YAMLError as e:
            out.append(f"$.spec.runtimeEnvYAML: not valid YAML: {e}")
    return out


def resource_problems(obj: dict[str, Any]) -> list[str]:
    """Container resources: quantities parse, GPU containers have requests == limits, every Ray
    pod has a memory-backed /dev/shm."""
    out = []
    for path, node in _walk(obj):
        if not (isinstance(node, dict) and isinstance(node.get("containers"), list)):
            continue
        for i, c in enumerate(node["containers"]):
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for name, q in (res.get(part) or {}).items():
                    try:
                        parse_quantity(q)
                    except ValueError as e:
                        out.append(f"{path}.containers[{i}].resources.{part}.{name}: {e}")
            if any(k.endswith("/gpu") for k in res.get("limits", {})) and res.get("requests") != res.get("limits"):
                out.append(f"{path}.containers[{i}].resources: a GPU container needs requests == limits")
        if path.endswith(".template.spec") and ("headGroupSpec" in path or "workerGroupSpecs" in path):
            shm = [v for v in node.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"]
            mounted = {m.get("name") for m in node["containers"][0].get("volumeMounts") or []
                       if m.get("mountPath") == "/dev/shm"}
            if not any(v.get("name") in mounted for v in shm):
                out.append(f"{path}: no memory-backed emptyDir mounted at /dev/shm in the Ray container")
    return out


def explicit_problems(obj: dict[str, Any]) -> list[str]:
    """Everything the schemas cannot catch: `dns1123_problems` + `enum_problems` + `resource_problems`."""
    return dns1123_problems(obj) + enum_problems(obj) + resource_problems(obj)


def problems(obj: dict[str, Any]) -> list[str]:
    """All offline problems of one rendered object: the strict CRD schema (KubeRay kinds) and the
    explicit checks. Core kinds get the explicit checks here; see `core_problems` for their schema."""
    return (validate(obj) if obj.get("kind") in CRD_FILES else []) + explicit_problems(obj)


def core_problems(obj: dict[str, Any], k8s_version: str = "1.33.0") -> list[str]:
    """A core object (ConfigMap, Secret, Role, ...) checked by `kubernetes-validate --strict`."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        return [f"{where}: {e.message}"]
    return []
