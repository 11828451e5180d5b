"""k8s/: what an admin applies once. The files parse, validate with `kubernetes-validate --strict`,
and are exactly what `render_admin` / `storage_secret_template` produce, so they cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cluster import crd_schema
from cluster import kubernetes_render as render
from cluster.kubernetes_spec import KubernetesCluster
from launcher.config import load_yaml_mapping

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
NAMESPACE = "ml-training"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
APPLIED = ("namespace.yaml", "rbac.yaml")  # what kustomization.yaml applies


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_expected_files_exist():
    assert {p.name for p in K8S.iterdir()} >= {"namespace.yaml", "rbac.yaml", "storage-secret.example.yaml",
                                                "kustomization.yaml", "README.md"}


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(path, version):
    objects = docs(path.name)
    assert objects, f"{path.name} is empty"
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any problem
        assert crd_schema.explicit_problems(obj) == []
        assert obj["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "llmlaunch"}


def test_files_equal_render_admin():
    assert docs("namespace.yaml") + docs("rbac.yaml") == render.render_admin(NAMESPACE)
    assert docs("storage-secret.example.yaml") == [render.storage_secret_template(NAMESPACE)]


def test_render_admin_for_another_namespace_validates():
    objects = render.render_admin("team-nlp", "launcher-ci")
    assert [o["kind"] for o in objects] == ["Namespace", "ServiceAccount", "Role", "RoleBinding"]
    for obj in objects:
        assert crd_schema.core_problems(obj, K8S_VERSIONS[-1]) == []
        assert crd_schema.explicit_problems(obj) == []
    binding = objects[3]
    assert binding["roleRef"]["name"] == objects[2]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "launcher-ci", "namespace": "team-nlp"}]


def test_kustomization_applies_namespace_and_rbac_only():
    kustomization = load_yaml_mapping(K8S / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}
    assert tuple(kustomization["resources"]) == APPLIED
    assert all((K8S / r).is_file() for r in kustomization["resources"])
    assert "storage-secret.example.yaml" not in kustomization["resources"]  # placeholders are never applied


def test_storage_secret_example_holds_placeholders_only():
    (secret,) = docs("storage-secret.example.yaml")
    assert secret["kind"] == "Secret" and "data" not in secret
    assert secret["stringData"] and all(v.startswith("REPLACE-WITH-") for v in secret["stringData"].values())


def test_role_is_least_privilege():
    (role,) = [d for d in docs("rbac.yaml") if d["kind"] == "Role"]
    assert [d["kind"] for d in docs("rbac.yaml")] == ["ServiceAccount", "Role", "RoleBinding"]
    grants = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
              for group in rule["apiGroups"] for resource in rule["resources"]}
    assert grants == {
        ("ray.io", "rayclusters"): {"create", "get", "list", "watch", "patch", "delete"},
        ("ray.io", "rayjobs"): {"create", "get", "list", "watch", "patch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "services"): {"get", "list", "watch"},
        ("", "events"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "pods/portforward"): {"create", "get"},
        ("", "configmaps"): {"create", "get", "delete"},
    }
    text = (K8S / "rbac.yaml").read_text()
    assert "ClusterRole" not in text and "secrets" not in text and '"*"' not in text
    assert all("resourceNames" not in rule and "nonResourceURLs" not in rule for rule in role["rules"])
    # Every rule is explained, in the code and in the README.
    assert len(render.LAUNCHER_RULES) == len(role["rules"]) and all(why for _rule, why in render.LAUNCHER_RULES)
    readme = (K8S / "README.md").read_text()
    for _group, resource in grants:
        assert f"`{resource}`" in readme, f"k8s/README.md does not explain the rights on {resource}"


def test_files_agree_with_prod_definition():
    data = load_yaml_mapping(ROOT / "configs" / "clusters" / "prod.yaml")
    prod = KubernetesCluster.model_validate(data)
    (namespace,) = docs("namespace.yaml")
    assert namespace["metadata"]["name"] == prod.namespace == NAMESPACE
    (secret,) = docs("storage-secret.example.yaml")
    assert secret["metadata"]["name"] == prod.storage_secret.name
    assert set(secret["stringData"]) == set(prod.storage_secret.keys.values())


def test_readme_pins_the_operator_version_the_tests_use():
    readme = (K8S / "README.md").read_text()
    versions = set(re.findall(r"kuberay/kuberay-operator --version (\S+)", readme))
    assert versions == {render.KUBERAY_VERSION.lstrip("v")} == {"1.7.0"}
    assert "nvidia.com/gpu.product" in readme and "llmlaunch.io/capacity-type" in readme
    notes = (crd_schema.VENDORED_CRDS / "README.md").read_text()
    assert render.KUBERAY_VERSION in notes and "v1.7.0" in notes
