"""A hyperparameter search through the real path: `launch configs/examples/tune_lora.yaml`
with the run (and every trial's checkpoints) on the S3 server; ASHA over the learning rate
and the LoRA rank, 6 trials of 1 worker each, a few steps each."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from tests.conftest import output
from trainers import checkpoint, storage

pytestmark = pytest.mark.integration
TUNE_LORA = "configs/examples/tune_lora.yaml"


def run_dir(proc) -> str:
    import re

    return re.search(r"run directory (\S+)", output(proc)).group(1)


@pytest.fixture(scope="module")
def search(launch_home, s3_server, tmp_path_factory):
    """One ASHA search, shared by the tests below (a search is the expensive part); the tests
    read its storage with `s3_env`'s credentials."""
    import os
    import subprocess
    import uuid

    from tests.conftest import LAUNCH, REPO
    from tests.fixtures.s3 import make_bucket

    bucket = make_bucket(s3_server, f"tune-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, "LLMLAUNCH_HOME": launch_home, **s3_server.env()}
    proc = subprocess.run([*LAUNCH, TUNE_LORA, f"checkpoint.storage={bucket}/runs"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    (tmp_path_factory.mktemp("log") / "search.log").write_text(output(proc))  # kept for a failing test's reader
    assert proc.returncode == 0, output(proc)[-5000:]
    return proc, run_dir(proc), env


def results(run: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(storage.join(run, "tune", "results.csv")))))


def test_asha_search_completes_and_stops_trials_early(search, s3_env):
    proc, run, _ = search
    assert run.startswith("s3://")
    rows = results(run)
    assert len(rows) == 6
    steps = [int(r["steps"]) for r in rows]
    assert any(s < 8 for s in steps), rows  # stopped early by ASHA, below max_t
    assert sum(r["status"] == "completed" for r in rows) >= 1
    for r in rows:
        assert 1e-3 <= float(r["train.lr"]) <= 3e-2 and int(r["model.peft.r"]) in (4, 8, 16)
        assert r["status"] == ("completed" if int(r["steps"]) == 8 else "stopped early")
    best = [float(r["best_eval_loss"]) for r in rows]
    assert best == sorted(best)  # ranked by the metric
    # one line per trial event reached the user
    text = output(proc)
    assert text.count("started: train.lr=") == 6
    assert "stopped early by the scheduler at step" in text and "search results:" in text
    # Known, not yet hidden (issue 18): when ASHA stops a trial, Tune ends the trial's actor, and
    # the trial's TrainController then logs its workers' deaths with a traceback. Nothing else may.
    ours = [line for line in text.splitlines() if not line.startswith("(TrainController pid=")]
    assert "Traceback" not in "\n".join(ours)
    controller = "\n".join(line for line in text.splitlines() if line.startswith("(TrainController pid="))
    assert "Traceback" not in controller or "because its owner has died" in controller


def test_every_trial_checkpoints_in_s3_and_the_best_is_exported(search, s3_env):
    _, run, _ = search
    rows = results(run)
    for r in rows:
        done = checkpoint.complete_checkpoints(storage.join(run, "trials", r["trial"]))
        steps = [int(c.rsplit("_", 1)[1]) for c in done]
        # every_n_steps 4, keep 1. ASHA's stop arrives asynchronously: a trial it stopped at its
        # step-2 report may already have trained on to its step-4 checkpoint.
        assert len(steps) <= 1 and all(s in (4, 8) for s in steps), (r, steps)
        if int(r["steps"]) >= 4:
            assert steps and steps[0] >= int(r["steps"]) - int(r["steps"]) % 4, (r, steps)
        if r["status"] == "completed":
            assert steps == [8]
    best = rows[0]
    assert storage.exists(storage.join(run, "trials", best["trial"], "model", "config.json"))
    assert storage.exists(storage.join(run, "adapter", "adapter_config.json"))  # the best trial's, copied
    assert storage.exists(storage.join(run, "model", "config.json"))
    assert storage.exists(storage.join(run, "tune", "trials.png"))
    summary = json.loads(storage.read_text(storage.join(run, "result.json")))
    assert summary["best_trial"] == best["trial"] and summary["trials"] == 6


def test_best_yaml_is_a_plain_spec_with_the_best_values(search, s3_env, launch, tmp_path):
    _, run, _ = search
    best = results(run)[0]
    text = storage.read_text(storage.join(run, "best.yaml"))
    spec = yaml.safe_load(text)
    assert "tune" not in spec
    assert spec["train"]["lr"] == pytest.approx(float(best["train.lr"]))
    assert spec["model"]["peft"]["r"] == int(best["model.peft.r"])
    path = tmp_path / "best.yaml"
    path.write_text(text)
    proc = launch("validate", str(path))
    assert proc.returncode == 0, output(proc)
