"""Multi-task fine-tuning end to end (real Ray, DeepSpeed, Ray Data): the mixture trained
on follows the tasks' weights, and every task's eval loss is reported, to the log, the
metrics file and Ray (result.json holds Ray's last report)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import output
from tests.integration.test_training import assert_ok, run_dir, train_metrics
from trainers import storage

pytestmark = pytest.mark.integration


def test_two_tasks_train_in_their_weights_and_report_each_eval(launch, tmp_path):
    # One whole epoch of a 64-sequence mixture: 4 steps of 16 sequences over 2 workers.
    proc = launch("configs/examples/multitask.yaml", f"checkpoint.storage={tmp_path / 'runs'}",
                  "data.mixture_rows=64", "train.eval_every=2")
    assert_ok(proc)
    log = output(proc)
    mixture = re.search(r"mixture \(weights\): chat (\d+) sequences \(80\.0%.*instruct (\d+) sequences \(20\.0%", log)
    assert mixture, log[-3000:]
    assert (int(mixture.group(1)), int(mixture.group(2))) == (51, 13)  # 0.8 x 64 = 51.2: largest remainder

    run = run_dir(proc)
    last = train_metrics(run)[-1]
    assert last["step"] == 4
    trained = last["rows/chat"] + last["rows/instruct"]
    assert trained == 64  # every sequence of the epoch, counted on both workers
    assert abs(last["rows/chat"] / trained - 0.8) <= 0.05 and abs(last["rows/instruct"] / trained - 0.2) <= 0.05

    evals = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()
             if "eval_loss" in line]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        # The overall loss is the tasks' losses weighted by their shares.
        assert e["eval_loss"] == pytest.approx(0.8 * e["eval_loss/chat"] + 0.2 * e["eval_loss/instruct"], abs=1e-5)
    assert evals[-1]["eval_loss/chat"] < evals[0]["eval_loss/chat"]
    assert re.search(r"step 4: eval loss [\d.]+ \(perplexity [\d.]+\)  loss/chat [\d.]+  loss/instruct [\d.]+", log)
    reported = json.loads(storage.read_text(storage.join(run, "result.json")))["metrics"]
    assert {"eval_loss/chat", "eval_loss/instruct", "rows/chat"} <= set(reported)
