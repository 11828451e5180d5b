"""A launcher-only install (`pip install llmlaunch`, without `[train]`) says what it lacks
before starting anything, and a cluster image without the training packages is named by
the job in one line. The interpreter is made to lack the packages by
tests/fixtures/launcher_only/sitecustomize.py (their imports fail as if not installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABSENT = str(REPO / "tests/fixtures/launcher_only")


def run(args, tmp_path, **env):
    full = {**os.environ, "PYTHONPATH": ABSENT, "LLMLAUNCH_HOME": str(tmp_path / "home"), **env}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


def test_the_fixture_really_hides_the_packages(tmp_path):
    proc = run(["-c", "import transformers"], tmp_path)
    assert proc.returncode == 1 and "No module named 'transformers'" in proc.stderr


def test_local_run_without_train_extra_is_exit_2_before_any_head_starts(tmp_path):
    proc = run(["-m", "launcher.cli", "configs/examples/quickstart.yaml"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'llmlaunch[train]'" in proc.stderr
    assert "torch" in proc.stderr and "transformers" in proc.stderr and "Traceback" not in proc.stderr
    assert "starting a local Ray head" not in proc.stderr
    assert not (tmp_path / "home" / "local").exists()  # nothing was started


def test_validate_works_without_train_extra(tmp_path):
    """Validating specs is what a launcher-only laptop does; DeepSpeed's own check is skipped."""
    proc = run(["-m", "launcher.cli", "validate", "configs/examples/alpaca_zero3.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ": ok (" in proc.stderr


def test_job_names_the_image_that_lacks_the_packages(tmp_path):
    proc = run(["-m", "trainers.entry"], tmp_path, LLMLAUNCH_IMAGE="registry.example.com/ray:2.60-py311",
               LLMLAUNCH_SPEC="{}", LLMLAUNCH_RUN_ID="r")
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("LLMLAUNCH_ERROR ")]
    error = json.loads(line.split(" ", 1)[1])
    assert error["message"].startswith("the cluster image registry.example.com/ray:2.60-py311 lacks torch")
    assert error["hint"] == "install them in the image: pip install 'llmlaunch[train]'"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_rendered_pods_name_their_image_for_the_job():
    from cluster import kubernetes
    from launcher.clusters import load_cluster
    from trainers import user_errors

    definition = load_cluster(str(REPO / "configs/clusters/prod.yaml"))
    [cluster] = [d for d in kubernetes.render(definition) if d["kind"] == "RayCluster"]
    pods = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for group in pods:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env[user_errors.IMAGE_ENV] == definition.image
