"""From a wheel install, not only from an editable checkout: the shipped cluster
definitions and examples come with the wheel (<prefix>/share/llmlaunch/configs) and
`--cluster prod` finds them. The wheel is built from the tracked files and installed
with `pip install --prefix`; the launcher then runs from that copy, outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(src)],
                   check=True, capture_output=True, cwd=work)
    [wheel] = (work / "dist").glob("llmlaunch-*.whl")
    prefix = work / "prefix"
    # --ignore-installed: otherwise pip uninstalls the checkout's own (editable) llmlaunch first.
    subprocess.run([*pip, "install", "--no-deps", "--ignore-installed", "--prefix", str(prefix), str(wheel)], check=True,
                   capture_output=True, cwd=work)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(work / "home"), "LLMLAUNCH_HOME": str(work / "lh")}
    env.pop("LLMLAUNCH_CLUSTERS", None)
    return prefix, env


def run(env, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_launcher_runs_from_the_installed_copy(installed, tmp_path):
    prefix, env = installed
    proc = run(env, "-c", "import cluster, launcher; print(cluster.__file__)", cwd=tmp_path)
    assert proc.stdout.strip().startswith(str(prefix)), proc.stdout + proc.stderr


def test_shipped_examples_validate_from_a_wheel_install(installed, tmp_path):
    prefix, env = installed
    examples = prefix / "share/llmlaunch/configs/examples"
    assert (examples / "tiny-llama" / "model.safetensors").is_file()
    proc = run(env, "-m", "launcher.cli", "validate", str(examples / "quickstart.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ": ok (" in proc.stderr


def test_cluster_by_name_from_a_wheel_install(installed, tmp_path):
    prefix, env = installed
    spec = prefix / "share/llmlaunch/configs/examples/prod_sft.yaml"
    proc = run(env, "-m", "launcher.cli", "render", str(spec), "--cluster", "prod", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "kind: RayCluster" in proc.stdout


def test_unknown_cluster_names_where_to_put_one(installed, tmp_path):
    prefix, env = installed
    proc = run(env, "-m", "launcher.cli", "status", "nosuch", cwd=tmp_path)
    assert proc.returncode == 2
    assert "~/.config/llmlaunch/clusters/nosuch.yaml" in proc.stderr
    assert str(prefix / "share/llmlaunch/configs/clusters/prod.yaml") in proc.stderr
