"""Transfer learning end to end through real Ray, real DeepSpeed (gloo, 2 CPU workers) and
the session's S3 server: a parent run, then a child with `model.init_from` naming it. The
child starts where the parent ended (its step-0 evaluation, `train.eval_at_start`, is the
parent's final eval loss on the same eval rows); `model.freeze` and a `train.param_groups`
entry at `lr_scale: 0` leave their weights bit for bit as the parent exported them; its
spec.yaml names the parent. A parent that does not exist stops `launch` with exit 2 before
anything is submitted."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import REPO, output
from trainers import storage

pytestmark = pytest.mark.integration
QUICKSTART = "configs/examples/quickstart.yaml"
TRANSFER = REPO / "configs/examples/transfer.yaml"
FROZEN = "embed_tokens"           # the example's model.freeze
STILL = r"model\.layers\.0\."     # the child's param group at lr_scale 0


def run_dir(proc) -> str:
    return re.search(r"run directory (\S+)", output(proc)).group(1)


def assert_ok(proc) -> None:
    assert proc.returncode == 0, output(proc)[-4000:]


def metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]


def weights(run: str, dest) -> dict:
    """name -> tensor of the run's exported model, read with safetensors (every shard)."""
    from safetensors.torch import load_file

    storage.download_dir(storage.join(run, "model"), str(dest))
    tensors: dict = {}
    for path in sorted(dest.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    assert tensors, f"no safetensors in {run}/model"
    return tensors


def bitwise_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_a_child_run_starts_where_its_parent_ended(launch, s3_env, tmp_path):
    parent_proc = launch(QUICKSTART, f"checkpoint.storage={s3_env}", "name=xfer-parent", "train.max_steps=10",
                         "checkpoint.every_n_steps=5")
    assert_ok(parent_proc)
    parent = run_dir(parent_proc)
    parent_evals = [m for m in metrics(parent) if "eval_loss" in m]
    assert parent_evals and parent_evals[-1]["step"] == 10  # evaluated at its end

    child_spec = tmp_path / "child.yaml"
    child_spec.write_text(yaml.safe_dump({
        "defaults": [str(TRANSFER)],
        "name": "xfer-child",
        "model": {"init_from": "xfer-parent"},
        "train": {"max_steps": 6, "eval_every": 3, "eval_at_start": True,
                  "param_groups": [{"pattern": STILL, "lr_scale": 0.0}, {"pattern": "lm_head", "lr_scale": 0.5}]},
        "checkpoint": {"every_n_steps": 3},
    }))
    child_proc = launch(str(child_spec), f"checkpoint.storage={s3_env}")
    assert_ok(child_proc)
    child = run_dir(child_proc)
    assert f"model.init_from xfer-parent: starting from {parent}/model (step 10)" in output(child_proc)
    assert re.search(r"param groups: the rest x1: [\d,]+ parameters; .*layers.*x0: [\d,]+ parameters",
                     output(child_proc)), output(child_proc)[-3000:]

    # The run records its parent; its spec names the model it trained from.
    recorded = yaml.safe_load(storage.read_text(storage.join(child, "spec.yaml")))
    assert recorded["lineage"] == {"parent_run": parent, "parent_model": f"{parent}/model",
                                   "parent_name": "xfer-parent", "parent_step": 10, "init_from": "xfer-parent"}
    assert recorded["model"]["path"] == f"{parent}/model" and recorded["model"]["init_from"] is None

    # Step 0 is where the parent ended: the same weights on the same eval rows.
    start = [m for m in metrics(child) if m["step"] == 0 and "eval_loss" in m]
    assert len(start) == 1, metrics(child)
    assert abs(start[0]["eval_loss"] - parent_evals[-1]["eval_loss"]) <= 1e-5, (start, parent_evals[-1])
    child_train = [m for m in metrics(child) if "loss" in m]
    assert [m["step"] for m in child_train] == list(range(1, 7))

    # Frozen and lr-0 parameters are the parent's to the bit; the others trained.
    before, after = weights(parent, tmp_path / "parent"), weights(child, tmp_path / "child")
    assert before.keys() == after.keys()
    frozen = [n for n in before if re.search(FROZEN, n)]
    still = [n for n in before if re.search(STILL, n)]
    assert frozen and still
    for name in frozen + still:
        assert bitwise_equal(before[name], after[name]), name
    moved = [n for n in before if n not in frozen + still and not bitwise_equal(before[n], after[n])]
    assert "lm_head.weight" in moved and any(".layers.1." in n for n in moved), moved


def test_a_missing_parent_is_exit_2_before_anything_starts(launch, s3_env):
    proc = launch(str(TRANSFER), f"checkpoint.storage={s3_env}", "model.init_from=no-such-run")
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "model.init_from: no run named no-such-run" in output(proc)
    assert "submitted job" not in output(proc) and "Traceback" not in output(proc)
