"""KubeRay manifests: every rendered RayCluster / RayJob validates against the official KubeRay
v1.7.0 CRD schema made strict, plus the checks a schema cannot make. No API server needed."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from cluster import crd_schema
from cluster import kubernetes_render as render
from cluster.kubernetes_spec import KubernetesCluster, Toleration, parse_quantity
from launcher.config import issues_from_validation_error, load_yaml_mapping

CLUSTERS = Path(__file__).resolve().parents[2] / "configs" / "clusters"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SPEC = {"name": "demo", "method": "sft", "model": {"path": "meta-llama/Llama-3.1-8B"}}
RUN_ID = "20261125-120000-abcd"
OWNER = "Alice Smith <alice@example.com>"


def _crds_or_skip() -> Path:
    try:
        return crd_schema.crd_dir()
    except crd_schema.CRDsNotFound as e:
        pytest.skip(f"KubeRay CRDs not available, strict CRD validation skipped: {e}")


@pytest.fixture(scope="module")
def crds() -> Path:
    return _crds_or_skip()


def shipped() -> list[Path]:
    return sorted(p for p in CLUSTERS.glob("*.yaml") if load_yaml_mapping(p).get("kind") == "kubernetes")


def load(path: Path) -> KubernetesCluster:
    data = load_yaml_mapping(path)
    data.setdefault("name", path.stem)
    return KubernetesCluster.model_validate(data)


def rayjob(defn: KubernetesCluster, **kw: Any) -> list[dict[str, Any]]:
    args = dict(spec_json=json.dumps(SPEC), run_name="demo", run_id=RUN_ID, owner=OWNER,
                env={"PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
    return render.render_rayjob(defn, **{**args, **kw})


def everything(defn: KubernetesCluster) -> list[dict[str, Any]]:
    return [render.render_raycluster(defn, OWNER), *rayjob(defn)]


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def matrix() -> list[Any]:
    cases = {}
    for autoscaling, groups, gpus, spot, volumes, tolerations in itertools.product(
            (True, False), (0, 1, 3), (0, 1, 8), (False, True), (False, True), (False, True)):
        if groups == 0 and (gpus or spot):
            continue  # nothing to vary without worker groups
        key = f"as={int(autoscaling)}-g{groups}-gpu{gpus}-spot{int(spot)}-vol{int(volumes)}-tol{int(tolerations)}"
        cases[key] = (autoscaling, groups, gpus, spot, volumes, tolerations)
    return [pytest.param(*v, id=k) for k, v in cases.items()]


def make(autoscaling=True, groups=1, gpus=8, spot=False, volumes=False, tolerations=False, **extra) -> KubernetesCluster:
    tol = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
           {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
            "tolerationSeconds": 300}] if tolerations else []
    data: dict[str, Any] = {
        "kind": "kubernetes", "name": "test", "namespace": "ml-training", "autoscaling": autoscaling,
        "env": {"AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://minio.storage:9000"},
        "head": {"cpu": "4", "memory": "16Gi", "tolerations": tol},
        "worker_groups": [
            {"name": f"group-{i}", "gpus": gpus, "gpu_type": {0: None, 1: "L4", 8: "H100"}[gpus],
             "cpu": 8 if i % 2 else "7500m", "memory": "64Gi", "replicas": 1, "min_replicas": 0, "max_replicas": 4,
             "spot": spot and i % 2 == 0, "tolerations": tol, "priority_class": "ml-high" if i == 2 else None,
             "node_selector": {"topology.kubernetes.io/zone": "us-east-1a"} if i == 1 else {}}
            for i in range(groups)],
        "labels": {"team": "ml-platform"},
    }
    if volumes:
        data["volumes"] = [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},
                           {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}]
        data["volume_mounts"] = [{"name": "hf-cache", "mountPath": "/home/ray/.cache/huggingface"},
                                 {"name": "scratch", "mountPath": "/scratch"}]
    data.update(extra)
    return KubernetesCluster.model_validate(data)


def assert_valid(obj: dict[str, Any], versions: tuple[str, ...] = K8S_VERSIONS, pods: bool = True) -> None:
    problems = crd_schema.problems(obj)
    if obj["kind"] not in crd_schema.CRD_FILES:
        for version in versions:
            problems += crd_schema.core_problems(obj, version)
    elif pods:
        # The pod templates are core PodTemplateSpecs: check them with the core schema too.
        for i, template in enumerate(pod_templates(obj)):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"},
                            "template": template}
            for version in versions:
                problems += crd_schema.core_problems(pod_template, version)
    assert problems == [], f"{obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(problems)


# --- every shipped definition and a matrix of options validate -----------------------------


def test_prod_is_shipped():
    assert CLUSTERS / "prod.yaml" in shipped()


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.stem)
def test_shipped_definitions_render_valid(crds, path):
    defn = load(path)
    for obj in everything(defn):
        assert_valid(obj)


@pytest.mark.parametrize("autoscaling,groups,gpus,spot,volumes,tolerations", matrix())
def test_matrix_renders_valid(crds, autoscaling, groups, gpus, spot, volumes, tolerations):
    defn = make(autoscaling, groups, gpus, spot, volumes, tolerations)
    objs = everything(defn)
    for obj in objs:
        # The core pod schema once per case (the RayJob's pods are the RayCluster's plus the spec volume).
        assert_valid(obj, versions=K8S_VERSIONS[:1], pods=obj["kind"] == "RayJob")
    cluster = objs[0]["spec"]
    assert cluster["enableInTreeAutoscaling"] is autoscaling
    assert ("autoscalerOptions" in cluster) is autoscaling
    assert len(cluster["workerGroupSpecs"]) == groups
    for group, spec in zip(defn.worker_groups, cluster["workerGroupSpecs"]):
        pod = spec["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        assert (pod.get("nodeSelector", {}).get("llmlaunch.io/capacity-type") == "spot") is group.spot
        tolerated = {t.get("key") for t in pod.get("tolerations", [])}
        assert ("llmlaunch.io/capacity-type" in tolerated) is group.spot
        assert ("nvidia.com/gpu" in tolerated) is bool(gpus)
        assert ("dedicated" in tolerated) is tolerations
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert ("/scratch" in mounts) is volumes


def test_no_worker_groups_still_lists_them():
    spec = render.render_raycluster(make(groups=0), OWNER)["spec"]
    assert spec["workerGroupSpecs"] == []  # the Ray autoscaler reads the key
    assert "num-cpus" not in spec["headGroupSpec"]["rayStartParams"]  # the head must then do the work


# --- the strict schema is strict ------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def raw_validator(crds: Path, kind: str) -> jsonschema.Draft202012Validator:
    """The CRD's schema as published (not strict)."""
    crd = yaml.load((crds / crd_schema.CRD_FILES[kind]).read_text(), Loader=yaml.CSafeLoader)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_strict_schemas_are_valid_json_schemas(crds, kind):
    jsonschema.Draft202012Validator.check_schema(crd_schema.load_strict_schema(crds / crd_schema.CRD_FILES[kind]))


@pytest.mark.parametrize("where", ["spec", "headGroupSpec", "podSpec", "container", "toleration", "workerGroup",
                                   "metadata", "emptyDir"])
def test_strict_schema_rejects_unknown_fields(crds, where):
    obj = render.render_raycluster(make(tolerations=True), OWNER)
    head = obj["spec"]["headGroupSpec"]
    target = {"spec": obj["spec"], "headGroupSpec": head, "podSpec": head["template"]["spec"],
              "container": head["template"]["spec"]["containers"][0],
              "toleration": head["template"]["spec"]["tolerations"][0],
              "workerGroup": obj["spec"]["workerGroupSpecs"][0], "metadata": obj["metadata"],
              "emptyDir": head["template"]["spec"]["volumes"][0]["emptyDir"]}[where]
    target["tolerationz"] = []
    errors = crd_schema.validate(obj)
    assert len(errors) == 1 and "'tolerationz' was unexpected" in errors[0], errors
    if where != "metadata":
        # The CRD as published accepts it: the API server would silently drop the field.
        assert not list(raw_validator(crds, "RayCluster").iter_errors(obj))


def test_strict_schema_also_covers_rayjobs(crds):
    job = rayjob(make())[0]
    job["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envv"] = []
    errors = crd_schema.validate(job)
    assert len(errors) == 2 and all("was unexpected" in e for e in errors), errors
    assert errors[0].startswith("$.spec: ")
    assert errors[1].startswith("$.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]: ")


def test_strict_schema_required_defaults_and_types(crds):
    obj = render.render_raycluster(make(), OWNER)
    group = obj["spec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]  # required in the CRD, but defaulted first
    assert crd_schema.validate(obj) == []
    del group["groupName"]  # required without a default
    assert any("'groupName' is a required property" in e for e in crd_schema.validate(obj))
    group["groupName"] = "g"
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 8  # int-or-string: an integer is fine
    assert crd_schema.validate(obj) == []
    limits["cpu"] = "eight"  # but not any string: a quantity
    assert any("resources.limits.cpu" in e for e in crd_schema.validate(obj))
    limits["cpu"] = "8"
    group["replicas"] = 2**31  # int32
    assert any("replicas" in e for e in crd_schema.validate(obj))
    group["replicas"] = 1
    obj["status"] = {"state": "ready"}
    obj["apiVersion"] = "ray.io/v1alpha1"
    errors = crd_schema.validate(obj)
    assert any(e.startswith("$.apiVersion") for e in errors) and any("'status' was unexpected" in e for e in errors)


def test_strict_schema_rejects_duplicate_list_map_keys(crds):
    obj = render.render_raycluster(make(), OWNER)
    env = obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": env[0]["name"], "value": "again"})
    errors = crd_schema.validate(obj)
    assert len(errors) == 1 and "duplicate entry" in errors[0] and ".env[" in errors[0], errors


def test_strict_schema_rules():
    schema = crd_schema._strict({
        "type": "object",
        "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "default": 1}, "b": {"type": "string"},
                       "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                "properties": {"x": {"type": "string"}}},
                       "q": {"x-kubernetes-int-or-string": True},
                       "n": {"type": "string", "nullable": True},
                       "i": {"type": "integer", "format": "int32"}},
    })
    assert schema["required"] == ["b"] and schema["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["open"]
    assert schema["properties"]["q"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert schema["properties"]["n"]["type"] == ["string", "null"]
    assert schema["properties"]["i"]["maximum"] == 2**31 - 1
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"b": "x", "open": {"anything": 1}, "q": 3, "n": None})
    assert not validator.is_valid({"b": "x", "extra": 1})


def test_missing_crds_named_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv(crd_schema.CRDS_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(crd_schema, "VENDORED_CRDS", tmp_path / "vendored")
    with pytest.raises(crd_schema.CRDsNotFound) as info:
        crd_schema.validate({"kind": "RayCluster"})
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "vendored") in message
    assert crd_schema.CRDS_ENV in message


def test_missing_crds_without_env_var_say_it_is_not_set(monkeypatch, tmp_path):
    monkeypatch.delenv(crd_schema.CRDS_ENV, raising=False)
    monkeypatch.setattr(crd_schema, "VENDORED_CRDS", tmp_path / "vendored")
    with pytest.raises(crd_schema.CRDsNotFound, match=r"vendored.*LLMLAUNCH_KUBERAY_CRDS \(not set\)"):
        crd_schema.crd_dir()


def test_crds_are_vendored_by_default(monkeypatch):
    monkeypatch.delenv(crd_schema.CRDS_ENV, raising=False)
    assert crd_schema.crd_dir() == crd_schema.VENDORED_CRDS == Path(crd_schema.__file__).resolve().parent / "kuberay_crds"


def test_crds_found_through_env_var(crds, monkeypatch, tmp_path):
    override = tmp_path / "override"
    override.mkdir()
    for name in crd_schema.CRD_FILES.values():
        (override / name).write_bytes((crds / name).read_bytes())
    monkeypatch.setenv(crd_schema.CRDS_ENV, str(override))
    monkeypatch.setattr(crd_schema, "VENDORED_CRDS", tmp_path / "vendored")
    assert crd_schema.crd_dir() == override


# --- what the schemas cannot catch ----------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"name": "Prod"}, "name"),
    ({"name": "1prod"}, "start with a lower-case letter"),
    ({"name": "p" * 41}, "at most 40"),
    ({"namespace": "ML_training"}, "namespace"),
    ({"labels": {"team": "x" * 64}}, "labels"),
    ({"labels": {"bad key!": "x"}}, "labels"),
    ({"labels": {"ray.io/node-type": "x"}}, "set by KubeRay"),
    ({"worker_groups": [{"name": "GPU_pool"}]}, "worker_groups.0.name"),
    ({"worker_groups": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"head": {"node_selector": {"pool": "cpu nodes"}}}, "head.node_selector"),
    ({"storage_secret": {"name": "S3_creds"}}, "storage_secret.name"),
    ({"worker_groups": [{"name": "g", "priority_class": "High"}]}, "priority_class"),
    ({"volumes": [{"name": "Cache", "emptyDir": {}}]}, "volumes[0].name"),
    ({"volumes": [{"name": "dshm", "emptyDir": {}}]}, "used by the launcher"),
    ({"volumes": [{"name": "c", "emptyDir": {}}], "volume_mounts": [{"name": "d", "mountPath": "/c"}]}, "must name one"),
    ({"volumes": [{"name": "c", "emptyDir": {}}], "volume_mounts": [{"name": "c", "mountPath": "/dev/shm"}]}, "/dev/shm"),
])
def test_definition_rejects_bad_names(change, message):
    data = {"kind": "kubernetes", "name": "prod", **change}
    with pytest.raises(ValidationError) as info:
        KubernetesCluster.model_validate(data)
    assert message in str(info.value)


@pytest.mark.parametrize("toleration,message", [
    ({"key": "a", "operator": "In"}, "operator"),
    ({"key": "a", "effect": "NoScheduling"}, "effect"),
    ({"key": "a", "operator": "Exists", "value": "b"}, "takes no value"),
    ({"operator": "Equal", "value": "b"}, "needs a key"),
    ({"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}, "NoExecute only"),
    ({"key": "a", "operator": "Equal", "valu": "b"}, "Extra inputs"),
])
def test_toleration_enums(toleration, message):
    with pytest.raises(ValidationError) as info:
        Toleration.model_validate(toleration)
    assert message in str(info.value)


@pytest.mark.parametrize("group,message", [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= replicas <= max_replicas"),
    ({"min_replicas": 0, "replicas": 5, "max_replicas": 2}, "min_replicas <= replicas <= max_replicas"),
    ({"cpu": "8 cores"}, "not a Kubernetes quantity"),
    ({"cpu": 0}, "greater than zero"),
    ({"memory": "64"}, "did you mean 64Gi"),
    ({"memory": "64GB"}, "not a Kubernetes quantity"),
    ({"memory": "16Gi", "shm_size": "32Gi"}, "larger than memory"),
    ({"gpu_type": "H100"}, "gpus is 0"),
    ({"gpus": 8, "gpu_type": "MI300X"}, "set gpu_product"),
    ({"gpus": 8, "gpu_type": "H100", "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100"}}, "nvidia.com/gpu.product"),
])
def test_worker_group_rules(group, message):
    with pytest.raises(ValidationError) as info:
        KubernetesCluster.model_validate({"kind": "kubernetes", "name": "prod",
                                          "worker_groups": [{"name": "g", **group}]})
    assert message in str(info.value)


def test_quantities():
    defn = make(head={"cpu": 0.5, "memory": "512Mi"})
    assert (defn.head.cpu, defn.head.memory) == ("0.5", "512Mi")
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("64Gi") == 64 * 2**30 and parse_quantity("1e3") == 1000
    with pytest.raises(ValueError):
        parse_quantity("1.5.0")


def test_autoscaling_off_needs_some_replicas():
    with pytest.raises(ValidationError, match="no worker would ever start"):
        KubernetesCluster.model_validate({"kind": "kubernetes", "name": "p", "autoscaling": False,
                                          "worker_groups": [{"name": "g", "max_replicas": 2}]})


@pytest.mark.parametrize("tamper,message", [
    (lambda o: o["metadata"].update(name="Prod"), "$.metadata.name"),
    (lambda o: o["metadata"].update(name="p" * 54), "at most 53"),
    (lambda o: o["metadata"]["labels"].update({"llmlaunch.io/owner": "alice@example.com"}), "llmlaunch.io/owner"),
    (lambda o: o["metadata"]["labels"].update({"-bad/key": "x"}), "key '-bad/key'"),
    (lambda o: head_pod(o)["containers"][0].update(name="Ray_Head"), "containers[0].name"),
    (lambda o: head_pod(o)["containers"][0]["volumeMounts"].append({"name": "nope", "mountPath": "/x"}),
     "not one of the pod's volumes"),
    (lambda o: head_pod(o)["containers"][0]["env"][-1]["valueFrom"]["secretKeyRef"].update(name="S3"),
     "secretKeyRef.name"),
    (lambda o: o["spec"]["workerGroupSpecs"][0].update(groupName="GPU_group"), "groupName"),
    (lambda o: head_pod(o).update(nodeSelector={"pool": "a b"}), "nodeSelector.pool"),
    (lambda o: head_pod(o).update(tolerations=[{"key": "a", "operator": "exists"}]), "operator: 'exists'"),
    (lambda o: head_pod(o).update(tolerations=[{"key": "a", "effect": "NoScheduling"}]), "effect: 'NoScheduling'"),
    (lambda o: o["spec"]["headGroupSpec"].update(serviceType="ExternalName"), "serviceType"),
    (lambda o: o["spec"].update(managedBy="me"), "managedBy"),
    (lambda o: head_pod(o)["volumes"][0]["emptyDir"].update(medium="memory"), "emptyDir.medium"),
    (lambda o: head_pod(o)["volumes"].pop(0), "no memory-backed emptyDir"),
    (lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]
     .update({"nvidia.com/gpu": "4"}), "requests == limits"),
])
def test_explicit_checks_catch_what_schemas_do_not(tamper, message):
    obj = render.render_raycluster(make(), OWNER)
    assert crd_schema.explicit_problems(obj) == []
    tamper(obj)
    problems = crd_schema.explicit_problems(obj)
    assert any(message in p for p in problems), problems


def head_pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["headGroupSpec"]["template"]["spec"]


@pytest.mark.parametrize("tamper,message", [
    (lambda j: j["spec"].update(submissionMode="K8sJob"), "submissionMode"),
    (lambda j: j["spec"].update(shutdownAfterJobFinishes=False), "needs shutdownAfterJobFinishes"),
    (lambda j: j["spec"].update(runtimeEnvYAML="[unclosed"), "runtimeEnvYAML"),
    (lambda j: j["metadata"].update(name="r" * 48), "at most 47"),
])
def test_explicit_rayjob_checks(tamper, message):
    job = rayjob(make())[0]
    assert crd_schema.explicit_problems(job) == []
    tamper(job)
    assert any(message in p for p in crd_schema.explicit_problems(job))


# --- secrets never appear -------------------------------------------------------------------

SENTINEL = "sentinel-SECRET-value-7f3a9c"


def test_no_secret_value_in_any_manifest(monkeypatch):
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(var, SENTINEL)
    objs = []
    for defn in [load(p) for p in shipped()] + [make(volumes=True, tolerations=True)]:
        objs += everything(defn)
        objs += render.render_admin(defn.namespace)
        objs.append(render.storage_secret_template(defn.namespace, defn.storage_secret))
    text = json.dumps(objs) + render.to_yaml(objs)
    assert SENTINEL not in text
    # Credentials reach the pods by reference only.
    for obj in objs:
        if obj["kind"] not in ("RayCluster", "RayJob"):
            continue
        for template in pod_templates(obj):
            for env in template["spec"]["containers"][0]["env"]:
                if env["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "llmlaunch-s3"


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "DB_PASSWORD",
                                  "WANDB_API_KEY", "AWS_SESSION_TOKEN"])
def test_secret_in_definition_env_is_refused_without_echoing_it(name):
    data = {"kind": "kubernetes", "name": "prod", "env": {"AWS_REGION": "us-east-1", name: SENTINEL}}
    with pytest.raises(ValidationError) as info:
        KubernetesCluster.model_validate(data)
    assert name in str(info.value) and SENTINEL not in str(info.value)
    issues = issues_from_validation_error(info.value, KubernetesCluster)
    assert issues and SENTINEL not in " ".join(str(i) for i in issues)


def test_secret_in_job_env_is_refused_without_echoing_it():
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY"):
        with pytest.raises(ValueError) as info:
            rayjob(make(), env={name: SENTINEL})
        assert name in str(info.value) and SENTINEL not in str(info.value)
    with pytest.raises(ValueError, match="by reference"):
        rayjob(make(), env={"LLMLAUNCH_SPEC": json.dumps(SPEC)})


def test_plain_names_are_not_mistaken_for_secrets():
    defn = make(env={"TOKENIZERS_PARALLELISM": "false", "AWS_REGION": "eu-west-1", "HF_HOME": "/cache"})
    assert set(defn.env) == {"TOKENIZERS_PARALLELISM", "AWS_REGION", "HF_HOME"}


# --- what every pod gets -------------------------------------------------------------------


@pytest.mark.parametrize("defn", [make(), make(groups=3, gpus=1, spot=True), make(groups=0)] +
                         [load(p) for p in shipped()], ids=lambda d: d.name + str(len(d.worker_groups)))
def test_every_pod_has_shm_resources_and_labels(defn):
    for obj in everything(defn):
        if obj["kind"] == "ConfigMap":
            continue
        for template in pod_templates(obj):
            pod = template["spec"]
            container = pod["containers"][0]
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert len(shm) == 1 and parse_quantity(shm[0]["emptyDir"]["sizeLimit"]) > 0
            assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in container["volumeMounts"]
            resources = container["resources"]
            assert resources["requests"] == resources["limits"]
            assert parse_quantity(shm[0]["emptyDir"]["sizeLimit"]) <= parse_quantity(resources["limits"]["memory"])
            labels = template["metadata"]["labels"]
            assert labels[render.MANAGED_BY] == "llmlaunch" and labels[render.LABEL_CLUSTER] == defn.name
            assert labels[render.LABEL_OWNER] == "Alice-Smith-alice-example.com"
            if obj["kind"] == "RayJob":
                assert labels[render.LABEL_RUN] == obj["metadata"]["name"]
        assert obj["metadata"]["labels"][render.LABEL_OWNER] == "Alice-Smith-alice-example.com"
        assert obj["metadata"]["annotations"][render.ANNOTATION_OWNER] == OWNER


def test_gpu_groups_request_exactly_their_gpus():
    defn = make(groups=3, gpus=8)
    for spec in render.render_raycluster(defn, OWNER)["spec"]["workerGroupSpecs"]:
        container = spec["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert spec["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        # Quoted as the Ray autoscaler parses rayStartParams["resources"].
        quoted = spec["rayStartParams"]["resources"]
        assert json.loads(quoted[1:-1].replace("\\", "")) == {"accelerator_type:H100": 1}


def test_dashboard_is_cluster_ip_unless_asked():
    assert render.render_raycluster(make(), OWNER)["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert rayjob(make())[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    for path in shipped():
        assert load(path).dashboard_service_type == "ClusterIP"
    explicit = make(dashboard_service_type="LoadBalancer")
    assert render.render_raycluster(explicit, OWNER)["spec"]["headGroupSpec"]["serviceType"] == "LoadBalancer"
    with pytest.raises(ValidationError):
        make(dashboard_service_type="ExternalName")


def test_service_account_and_priority_class():
    defn = make(groups=3, service_account="ray-s3-reader")
    groups = render.render_raycluster(defn, OWNER)["spec"]["workerGroupSpecs"]
    assert all(g["template"]["spec"]["serviceAccountName"] == "ray-s3-reader" for g in groups)
    assert groups[2]["template"]["spec"]["priorityClassName"] == "ml-high"
    assert "serviceAccountName" not in render.render_raycluster(make(), OWNER)["spec"]["headGroupSpec"]["template"]["spec"]


# --- the spec travels by reference ---------------------------------------------------------


def test_rayjob_passes_the_spec_by_configmap():
    spec_json = json.dumps({**SPEC, "marker": "only-in-the-configmap"})
    job, configmap = rayjob(make(groups=2), spec_json=spec_json)
    assert (job["kind"], configmap["kind"]) == ("RayJob", "ConfigMap")
    assert configmap["data"] == {render.SPEC_KEY: spec_json} and configmap["immutable"] is True
    assert "only-in-the-configmap" not in json.dumps(job)
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m trainers.entry"
    assert spec["jobId"] == f"demo-{RUN_ID}"  # the same id `launcher.submit` gives a run
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["submissionMode"] in crd_schema.SUBMISSION_MODES
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env_vars[render.SPEC_FILE_ENV] == f"{render.SPEC_DIR}/{render.SPEC_KEY}"
    assert env_vars[render.RUN_ID_ENV] == RUN_ID and env_vars["PYTHONUNBUFFERED"] == "1"
    assert render.SPEC_ENV not in env_vars
    for template in pod_templates(job):
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == render.SPEC_VOLUME)
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        mount = next(m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == render.SPEC_VOLUME)
        assert mount == {"name": render.SPEC_VOLUME, "mountPath": render.SPEC_DIR, "readOnly": True}
    assert configmap["metadata"]["labels"][render.LABEL_RUN] == job["metadata"]["name"]


def test_persistent_cluster_has_no_run_objects():
    cluster = render.render_raycluster(make(), OWNER)
    text = json.dumps(cluster)
    assert render.SPEC_VOLUME not in text and render.LABEL_RUN not in text


def test_ephemeral_defaults_reach_the_rayjob(crds):
    defn = make(ephemeral_defaults={"ttl_seconds_after_finished": 60, "active_deadline_seconds": 3600,
                                    "backoff_limit": 2})
    job = rayjob(defn)[0]
    assert_valid(job)
    assert (job["spec"]["ttlSecondsAfterFinished"], job["spec"]["activeDeadlineSeconds"],
            job["spec"]["backoffLimit"]) == (60, 3600, 2)


def test_oversized_or_malformed_spec_refused():
    with pytest.raises(ValueError, match="at most"):
        rayjob(make(), spec_json=json.dumps({"blob": "x" * 1_100_000}))
    with pytest.raises(ValueError, match="JSON object"):
        rayjob(make(), spec_json="not json")


@pytest.mark.parametrize("run_name,run_id", [
    ("demo", RUN_ID), ("Alpaca_ZeRO3 run", RUN_ID), ("42-llama", RUN_ID), ("x" * 80, RUN_ID),
    ("---", RUN_ID), ("demo", "My Run/ID with spaces and a very long tail 0123456789"),
])
def test_rayjob_names_are_valid(run_name, run_id):
    name = render.rayjob_name(run_name, run_id)
    assert crd_schema.dns1035_label_problem(name, 47) is None
    assert name == render.rayjob_name(run_name, run_id)
    job, configmap = rayjob(make(), run_name=run_name, run_id=run_id)
    assert crd_schema.dns1123_problems(job) == [] and crd_schema.dns1123_problems(configmap) == []


def test_owned_by_links_the_configmap_to_its_rayjob():
    job, configmap = rayjob(make())
    created = {**job, "metadata": {**job["metadata"], "uid": "0f7c1a52-1111-2222-3333-444455556666"}}
    owned = render.owned_by(configmap, created)
    assert owned["metadata"]["ownerReferences"] == [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": job["metadata"]["name"], "uid": created["metadata"]["uid"]}]
    assert "ownerReferences" not in configmap["metadata"]
    for version in K8S_VERSIONS:
        assert crd_schema.core_problems(owned, version) == []


@pytest.mark.parametrize("owner,expected", [
    ("alice", "alice"), ("alice@example.com", "alice-example.com"), ("DOMAIN\\bob", "DOMAIN-bob"),
    ("", "unknown"), ("@@@", "unknown"), ("a" * 100, "a" * 63),
])
def test_owner_label_sanitized(owner, expected):
    assert render.label_value(owner) == expected
    assert crd_schema.label_value_problem(expected) is None
