"""Few-shot evaluation in a real run (Ray Train, DeepSpeed ZeRO-2, 2 workers): k-shot
accuracy on held-out questions before training and after, reported in the log, the
metrics file and Ray's final report. The task is a fixed mapping the training data teaches,
so the accuracy after training must beat the accuracy before it (0 for a random model)."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from tests.conftest import REPO, output
from tests.integration.test_training import assert_ok, run_dir
from trainers import fewshot, storage
from trainers.spec import FewshotSpec

pytestmark = pytest.mark.integration
COLOURS = {"red": "apple", "yellow": "banana", "green": "lime", "purple": "grape"}


def rows(colours) -> list[dict]:
    return [{"question": c, "answer": COLOURS[c]} for c in colours]


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def test_fewshot_accuracy_rises_with_training_and_is_reported(launch, tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", rows(COLOURS))
    held = write_jsonl(tmp_path / "held.jsonl", rows(reversed(COLOURS)))
    spec = FewshotSpec(path=held, pool=pool, k=1, max_new_tokens=3)
    # Training rows: the k-shot prompts the evaluation writes, completed with the answer.
    rng = random.Random(0)
    train = [{"prompt": fewshot.build_prompt(row, [rng.choice(rows(COLOURS))], spec), "completion": " " + row["answer"]}
             for row in rows([rng.choice(list(COLOURS)) for _ in range(512)])]
    run_spec = yaml.safe_load((REPO / "configs/examples/quickstart.yaml").read_text())
    run_spec.update(name="fewshot-colours")
    run_spec["model"]["path"] = str(REPO / "configs/examples/tiny-llama")
    run_spec["data"] = {"train": [{"path": write_jsonl(tmp_path / "train.jsonl", train), "format": "prompt_completion"}],
                        "max_seq_len": 64}
    run_spec["train"].update(max_steps=80, lr=1e-2)
    run_spec["eval"] = {"fewshot": spec.model_dump(mode="json")}
    path = tmp_path / "fewshot.yaml"
    path.write_text(yaml.safe_dump(run_spec))

    proc = launch(str(path), f"checkpoint.storage={tmp_path / 'runs'}")
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
