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


def tune_rows(run: str, trial: str) -> list[dict]:
    """What the trial reported to Tune, from Tune's own result.json of the trial."""
    tune_dir = storage.join(run, "tune")
    [name] = [n for n in storage.list_dir(tune_dir) if n.startswith(f"trial_{trial}_")]
    return [json.loads(line) for line in storage.read_text(storage.join(tune_dir, name, "result.json")).splitlines()]


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
        # each trial trained on the data packed to its own length: 8 sequences a step
        first = next(m for m in tune_rows(run, r["trial"]) if "tokens_seen" in m)
        length = int(r["data.max_seq_len"])
        assert 0.9 * 8 * length <= first["tokens_seen"] / first["step"] <= 8 * length, (r, first)
    # the data was tokenized and packed once per length, before the trials, not per trial
    assert {int(r["data.max_seq_len"]) for r in rows} == {64, 128}, rows
    for length in (64, 128):
        assert output(proc).count(f"data (data.max_seq_len={length}): ") == 1
    best = [float(r["best_eval_loss"]) for r in rows]
    assert best == sorted(best)  # ranked by the metric
    # one line per trial event reached the user
    text = output(proc)
    assert text.count("started: train.lr=") == 6
    assert "stopped early by the scheduler at step" in text and "search results:" in text
    # When ASHA stops a trial, Tune ends the trial's actor and its TrainController reports the
    # workers' deaths: bookkeeping of a stop, hidden (launch logs --verbose shows it).
    assert "Traceback" not in text and "TrainController" not in text and "owner has died" not in text


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


def best_row(run: str) -> dict:
    return next(r for r in results(run) if r["status"] == "completed")


def test_best_yaml_is_a_plain_spec_with_the_best_values(search, s3_env, launch, tmp_path):
    _, run, _ = search
    best = best_row(run)
    text = storage.read_text(storage.join(run, "best.yaml"))
    spec = yaml.safe_load(text)
    assert "tune" not in spec
    assert spec["train"]["lr"] == pytest.approx(float(best["train.lr"]))
    assert spec["model"]["peft"]["r"] == int(best["model.peft.r"])
    path = tmp_path / "best.yaml"
    path.write_text(text)
    proc = launch("validate", str(path))
    assert proc.returncode == 0, output(proc)


TUNE_PBT = "configs/examples/tune_pbt.yaml"


def test_pbt_exploit_goes_on_from_the_donor_checkpoint_with_the_mutated_value(launch, s3_env):
    """configs/examples/tune_pbt.yaml: 2 trials (lr 1e-2 and 1e-5), synchronous PBT at step 4.
    The 1e-5 trial is far behind there; it must copy the other's step-4 checkpoint, go on
    from step 4 with the donor's lr times 0.8 or 1.2, and learn from there."""
    import re

    proc = launch(TUNE_PBT, f"checkpoint.storage={s3_env}", timeout=900)
    assert proc.returncode == 0, output(proc)[-5000:]
    run = run_dir(proc)
    rows = {r["trial"]: r for r in results(run)}
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows.values()), rows
    exploited = [t for t, r in rows.items() if r["exploits"]]
    assert len(exploited) == 1, rows
    trial = exploited[0]
    [event] = [json.loads(line) for line in
               storage.read_text(storage.join(run, "trials", trial, "exploits.jsonl")).splitlines()]
    donor = event["donor"]
    assert donor != trial and event["step"] == 4
    donor_lr = float(rows[donor]["train.lr"])
    assert donor_lr == pytest.approx(1e-2)  # the better trial is the one copied
    new_lr = event["config"]["train.lr"]
    assert new_lr in (pytest.approx(donor_lr * 0.8), pytest.approx(donor_lr * 1.2))
    assert float(rows[trial]["train.lr"]) == pytest.approx(new_lr)
    assert rows[trial]["exploits"] == f"step 4 from {donor}"

    # The trial's history: the donor's steps 1-4 (restored with its checkpoint), then its own
    # steps 5-6 at the mutated learning rate (the optimizer's restored lr does not win).
    mine, theirs = (_train_rows(storage.join(run, "trials", t)) for t in (trial, donor))
    assert [m["step"] for m in mine] == list(range(1, 7))
    assert [m["loss"] for m in mine[:4]] == [m["loss"] for m in theirs[:4]]
    assert all(m["lr"] == pytest.approx(new_lr) for m in mine[4:])
    # Its own evaluation at step 4, before the exploit, against its first after it.
    text = output(proc)
    before = float(re.search(rf"trial {trial} step 4: eval_loss ([\d.]+)", text).group(1))
    after = float(re.search(rf"trial {trial} step 6: eval_loss ([\d.]+)", text).group(1))
    assert after < before - 0.2, (before, after)  # lr 1e-5 alone moves it by about 1e-3
    assert f"trial {trial} exploited trial {donor}: goes on from its step 4 with train.lr=" in text
    assert "Traceback" not in text and "Exception ignored" not in text and "[PopulationBasedTraining]" not in text


def _train_rows(trial_run: str) -> list[dict]:
    rows = [json.loads(line) for line in storage.read_text(storage.join(trial_run, "metrics.jsonl")).splitlines()]
    return [m for m in rows if "loss" in m]


def test_a_cancelled_optuna_search_resumes_with_the_same_command(launch, s3_env):
    """Optuna (TPE) chooses, ASHA stops; the search is cancelled once its first trial has
    finished, and the same command finishes it: the first trial is not run again, the
    trial count is what the spec asks for, every value lies within its bounds."""
    import re
    import time

    from tests.integration.test_training import _wait_terminal

    args = [TUNE_LORA, f"checkpoint.storage={s3_env}", "name=tune-resume", "tune.search=optuna",
            "tune.num_samples=3", "train.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep=1"]
    first = launch(*args, "--detach")
    assert first.returncode == 0, output(first)
    job = re.search(r"submitted job (\S+);", output(first)).group(1)
    run = run_dir(first)
    deadline = time.monotonic() + 400
    while not [t for t in storage.list_dir(storage.join(run, "trials"))
               if storage.exists(storage.join(run, "trials", t, "model", "config.json"))]:
        assert time.monotonic() < deadline, "no trial finished within 400 s"
        time.sleep(1)
    assert launch("cancel", job).returncode == 0
    _wait_terminal(launch, job)
    finished = [t for t in storage.list_dir(storage.join(run, "trials"))
                if storage.exists(storage.join(run, "trials", t, "model", "config.json"))]
    assert not storage.exists(storage.join(run, "result.json"))

    second = launch(*args, timeout=900)  # the same command again
    text = output(second)
    assert second.returncode == 0, text[-5000:]
    assert f"run directory {run} (continuing its unfinished search)" in text
    assert "search: resuming from" in text
    for t in finished:
        # Not trained again: a trial that finished before Tune recorded it (the job is killed a
        # few seconds after the cancel) is restarted by Tune, finds its final checkpoint and
        # reports what that measured, without a step of training or a new evaluation.
        assert f"trial {t} step 2:" not in text, text[-5000:]
    rows = results(run)
    assert len(rows) == 3, rows
    assert {r["trial"] for r in rows} >= set(finished)
    lrs = [float(r["train.lr"]) for r in rows]
    assert all(1e-3 <= lr <= 3e-2 for lr in lrs) and len(set(lrs)) == 3
    assert all(int(r["model.peft.r"]) in (4, 8, 16) for r in rows)
    assert sum(r["status"] == "completed" for r in rows) >= 1


def test_running_best_yaml_reproduces_the_best_trials_final_eval_loss(search, s3_env, launch, tmp_path):
    """Training here is deterministic for a fixed seed and data order: the best trial, run
    again as a plain run from best.yaml, ends at the same eval loss."""
    _, run, _ = search
    best = best_row(run)
    path = tmp_path / "best.yaml"
    path.write_text(storage.read_text(storage.join(run, "best.yaml")))
    proc = launch(str(path), "name=tune-lora-best")
    assert proc.returncode == 0, output(proc)[-4000:]
    rows = [json.loads(line) for line in storage.read_text(storage.join(run_dir(proc), "metrics.jsonl")).splitlines()]
    final = [m["eval_loss"] for m in rows if "eval_loss" in m][-1]
    assert abs(final - float(best["last_eval_loss"])) < 1e-3, (final, best)
