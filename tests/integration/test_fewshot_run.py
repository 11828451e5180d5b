"""Few-shot evaluation in a real run (Ray Train, DeepSpeed ZeRO-2, 2 workers): k-shot
accuracy on held-out questions before training and after, reported in the log, the
metrics file and Ray's final report, from the shipped example. Its task is a fixed mapping
the training data teaches, so the accuracy after training must beat the accuracy before it
(0 for a random model)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import output
from tests.integration.test_training import assert_ok, run_dir
from trainers import storage

pytestmark = pytest.mark.integration


def test_fewshot_accuracy_rises_with_training_and_is_reported(launch, tmp_path):
    proc = launch("configs/examples/fewshot.yaml", f"checkpoint.storage={tmp_path / 'runs'}")
    assert_ok(proc)
    log = output(proc)
    assert "few-shot (1-shot, generate) before training: 0/4 correct (0.0%)" in log, log[-3000:]
    run = run_dir(proc)
    lines = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    final = next(m for m in lines if "fewshot_accuracy_after" in m)
    assert final["fewshot_accuracy_before"] == 0.0 and final["fewshot_total"] == 4
    assert final["fewshot_accuracy_after"] > final["fewshot_accuracy_before"], final
    assert final["fewshot_accuracy_gain"] == pytest.approx(final["fewshot_accuracy_after"])
    after = round(final["fewshot_accuracy_after"] * 4)
    assert (f"few-shot (1-shot, generate) after training: {after}/4 correct ({after / 4:.1%}); before 0.0%: "
            f"{100 * final['fewshot_accuracy_gain']:+.1f} points") in log
    reported = json.loads(storage.read_text(storage.join(run, "result.json")))["metrics"]
    assert reported["fewshot_accuracy_after"] == final["fewshot_accuracy_after"]
