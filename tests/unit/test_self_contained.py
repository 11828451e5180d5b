"""The project stands on its own: the KubeRay CRDs it validates against are vendored in the
package (and ship in the wheel), and nothing it ships or runs reads a folder outside the repository
such as `<repo>/../shared/`."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import crd_schema
from cluster import kubernetes_render as render

ROOT = Path(__file__).resolve().parents[2]
VENDORED = ROOT / "cluster" / "kuberay_crds"
KUBERAY_VERSION = "v1.7.0"
# The vendored files, byte for byte: a changed or re-generated CRD must be a deliberate upgrade
# (new release's files, README.md, KUBERAY_VERSION, and these digests together).
SHA256 = {
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
    "LICENSE": "24a918b9cf6d1d0aa84f17384038bedbccdd51e815afdd9d1b49b13d4a7dd6d9",
}
# What KubeRay v1.7.0's CRDs carry: controller-gen's version stamp and spec fields a copy from an
# older release lacks.
CONTROLLER_GEN = "v0.16.5"
SPEC_FIELDS = {
    "RayCluster": {"authOptions", "historyServerOptions", "networkPolicy", "tlsOptions", "upgradeStrategy",
                   "managedBy", "headGroupSpec", "workerGroupSpecs"},
    "RayJob": {"deletionStrategy", "preRunningDeadlineSeconds", "submitterConfig", "managedBy", "rayClusterSpec",
               "runtimeEnvYAML", "submissionMode"},
}

SCANNED = ["launcher", "cluster", "trainers", "configs", ".ci", "pyproject.toml"]
# `../shared`, an absolute `/work/shared`, or a path built from a "shared" component.
OUTSIDE = re.compile(r"""\.\.[/\\]shared\b|/work/shared\b|["']shared["']""")


def test_vendored_crds_and_license_exist():
    for name in [*crd_schema.CRD_FILES.values(), "LICENSE", "README.md"]:
        assert (VENDORED / name).is_file(), f"cluster/kuberay_crds/{name} is missing"
    assert crd_schema.VENDORED_CRDS == VENDORED
    assert "Apache License" in (VENDORED / "LICENSE").read_text() and "Version 2.0" in (VENDORED / "LICENSE").read_text()
    notes = (VENDORED / "README.md").read_text()
    assert KUBERAY_VERSION in notes and "Apache" in notes and "ray-operator/config/crd/bases" in notes


def test_vendored_files_are_the_pinned_ones():
    for name, digest in SHA256.items():
        assert hashlib.sha256((VENDORED / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("kind", sorted(crd_schema.CRD_FILES))
def test_vendored_crds_are_kuberay_v1_7_0(kind):
    assert render.KUBERAY_VERSION == KUBERAY_VERSION
    crd = yaml.load((VENDORED / crd_schema.CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["annotations"]["controller-gen.kubebuilder.io/version"] == CONTROLLER_GEN
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    assert SPEC_FIELDS[kind] <= set(v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])


def test_crd_schema_uses_the_vendored_crds_by_default(monkeypatch):
    monkeypatch.delenv(crd_schema.CRDS_ENV, raising=False)
    assert crd_schema.crd_dir() == VENDORED


def test_the_wheel_ships_the_vendored_crds():
    tomllib = __import__("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch.fnmatch("cluster", pattern) for pattern in setuptools["packages"]["find"]["include"])
    patterns = setuptools["package-data"]["cluster"]
    for name in [*crd_schema.CRD_FILES.values(), "LICENSE", "README.md"]:
        assert any(fnmatch.fnmatch(f"kuberay_crds/{name}", p) for p in patterns), f"{name} is not package data"


def _project_files() -> list[str]:
    """Tracked files (and new, not ignored ones) under SCANNED."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *SCANNED],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})


def outside_reads(text: str) -> list[str]:
    """The lines of `text` that name a folder outside the repository."""
    return [line.strip() for line in text.splitlines() if OUTSIDE.search(line)]


def test_the_scan_sees_what_it_must():
    files = _project_files()
    assert "cluster/crd_schema.py" in files and "pyproject.toml" in files
    assert outside_reads('(_REPO.parent / "shared" / "kuberay", "<repo>/../shared/kuberay")')
    assert outside_reads("`$LLMLAUNCH_KUBERAY_CRDS`, then `<repo>/../shared/kuberay/`")
    assert outside_reads("os.path.join(root, 'shared', 'kuberay')")
    assert not outside_reads("a PVC for a shared model cache; shared-memory collectives")


def test_nothing_in_the_project_reads_outside_the_repository():
    found = {}
    for name in _project_files():
        data = (ROOT / name).read_bytes()
        if b"\0" in data:
            continue
        if hits := outside_reads(data.decode("utf-8", errors="replace")):
            found[name] = hits
    assert found == {}, f"files reading a folder outside the repository (e.g. ../shared): {found}"
