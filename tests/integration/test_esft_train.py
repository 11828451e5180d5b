"""ESFT end to end: `launch configs/examples/esft.yaml` through real Ray (2 CPU workers) and
real DeepSpeed (ZeRO-2, gloo, AdamW with weight decay 0.1) on the shipped tiny Qwen3-MoE:
the three stages, what they write, what training touched (bitwise), the delta, and a
resume that keeps the selection."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import launch_cli, output
from tests.integration.test_training import assert_ok, download, load_model, run_dir
from trainers import checkpoint, moe, storage

pytestmark = pytest.mark.integration
ESFT = "configs/examples/esft.yaml"
BASE = "configs/examples/tiny-qwen3-moe"


@pytest.fixture(scope="module")
def esft_run(launch_home, s3_server):
    proc = launch_cli(launch_home, s3_server, ESFT, s3=False)
    assert_ok(proc)
    return proc, run_dir(proc)


def test_esft_scores_selects_and_trains_only_the_selected_experts(esft_run, launch, tmp_path):
    proc, run = esft_run
    log = output(proc)
    selection = json.loads(storage.read_text(storage.join(run, "esft", "selection.json")))
    scores = json.loads(storage.read_text(storage.join(run, "esft", "scores.json")))
    for name in ("scores-token.png", "scores-gate.png"):
        assert storage.exists(storage.join(run, "esft", name))
    # Stage 1 read the sample (4096 tokens) and both tables are per-layer distributions.
    assert scores["tokens"] == 4096 and scores["layers"] == [0, 1]
    for table in (scores["token"], scores["gate"]):
        assert [round(sum(row), 6) for row in table] == [1.0, 1.0]
    # Stage 2 is the threshold rule on the written scores.
    assert selection["experts"] == moe.select_experts(scores["token"], 0.2)
    chosen = selection["experts"]
    assert 0 < sum(map(len, chosen)) < 16
    share = re.search(r"esft: training (\d+) of 16 routed experts .*: ([\d,]+) of ([\d,]+) parameters", log)
    assert share and int(share.group(1)) == sum(map(len, chosen)), log[-3000:]
    per_expert = 3 * 64 * 32  # gate, up and down projections of one expert (hidden 64, intermediate 32)
    assert int(share.group(2).replace(",", "")) == per_expert * sum(map(len, chosen))

    # Stage 3 learned the task.
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    evals = [m["eval_loss"] for m in rows if "eval_loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.2, evals

    assert_only_selected_moved_and_delta_is_export(run, chosen, launch, tmp_path)


def assert_only_selected_moved_and_delta_is_export(run: str, chosen: list[list[int]], launch, tmp_path) -> None:
    """Only the selected experts moved; the rest of the model is bitwise the base. The delta
    applied to the base is the exported model."""
    trained = load_model(download(storage.join(run, "model"), tmp_path / "model")).state_dict()
    base = load_model(BASE).state_dict()
    assert set(trained) == set(base)
    for key, before in base.items():
        after = trained[key]
        layer = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.", key)
        if layer is None:
            assert torch.equal(after, before), key
            continue
        for e in range(before.shape[0]):
            if e in chosen[int(layer.group(1))]:
                assert not torch.equal(after[e], before[e]), (key, e)
            else:
                assert torch.equal(after[e], before[e]), (key, e)

    delta = storage.join(run, "esft", "experts.safetensors")
    applied = launch("apply-delta", delta, "--out", str(tmp_path / "applied"), s3=False)
    assert applied.returncode == 0, output(applied)
    ids = torch.randint(10, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_model(tmp_path / "model")(input_ids=ids).logits
        b = load_model(tmp_path / "applied")(input_ids=ids).logits
    assert torch.equal(a, b)


def test_esft_resume_keeps_the_selection(esft_run, launch):
    _, run = esft_run
    first = json.loads(storage.read_text(storage.join(run, "esft", "selection.json")))
    mid = [c for c in checkpoint.complete_checkpoints(run) if c.rstrip("/").endswith("step_00000010")]
    assert mid, checkpoint.complete_checkpoints(run)
    proc = launch(ESFT, "name=esft-resume", f"checkpoint.resume={mid[0]}", "train.max_steps=12", s3=False)
    assert_ok(proc)
    log = output(proc)
    assert "esft: the selection of" in log and "starting at step 10/12" in log, log[-3000:]
    resumed = json.loads(storage.read_text(storage.join(run_dir(proc), "esft", "selection.json")))
    assert resumed["experts"] == first["experts"] and resumed["resumed_from"] == mid[0]
