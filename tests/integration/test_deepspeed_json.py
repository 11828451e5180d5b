"""DeepSpeed JSONs as users hold them (HF style "auto" everywhere, Axolotl's optimizer-only
zero1, scheduler-only, both, ZeRO-Offload with our optimizer), each built into a real
DeepSpeed engine (one gloo process) that takes optimizer steps: who built the optimizer
and the schedule, and the learning rate at every step against the values computed by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration
JSONS = REPO / "tests/fixtures/deepspeed"
LR, STEPS, WARMUP_RATIO = 1e-3, 4, 0.25


def spec(deepspeed) -> dict:
    return {"name": "probe", "method": "sft", "model": {"path": str(REPO / "configs/examples/tiny-llama")},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "train": {"lr": LR, "warmup_ratio": WARMUP_RATIO, "lr_schedule": "cosine", "micro_batch_size": 2,
                      "deepspeed": deepspeed}}


def spec_cosine(step: int) -> float:
    """transformers' cosine schedule with linear warmup, by hand: int(0.25 * 4) = 1 warmup step."""
    warmup = int(WARMUP_RATIO * STEPS)
    if step < warmup:
        return LR * step / warmup
    progress = (step - warmup) / (STEPS - warmup)
    return LR * 0.5 * (1 + math.cos(math.pi * progress))


CASES = {
    "shorthand": {"stage": 2},
    "hf_auto": str(JSONS / "hf_auto.json"),
    "optimizer_only": str(JSONS / "optimizer_only.json"),
    "scheduler_only": str(JSONS / "scheduler_only.json"),
    "both_explicit": str(JSONS / "both_explicit.json"),
    "offload_client_optimizer": str(JSONS / "offload_client_optimizer.json"),
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict[str, dict]:
    cases = [{"id": k, "steps": STEPS, "spec": spec(v)} for k, v in CASES.items()]
    path = tmp_path_factory.mktemp("ds") / "cases.json"
    path.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-m", "tests.fixtures.ds_engine_probe", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    results = {r["id"]: r for r in (json.loads(line[6:]) for line in proc.stdout.splitlines()
                                    if line.startswith("PROBE "))}
    assert set(results) == set(CASES), proc.stdout[-2000:] + proc.stderr[-4000:]
    return results


def result(probed, case) -> dict:
    r = probed[case]
    assert "error" not in r, r["error"]
    assert r["losses"][-1] < r["losses"][0], r["losses"]  # the optimizer really steps
    return r


HAND = [spec_cosine(s) for s in range(STEPS)]


@pytest.mark.parametrize("case, optimizer", [
    ("shorthand", "torch.optim.adamw.AdamW"),
    ("optimizer_only", "deepspeed.ops.adam.fused_adam.FusedAdam"),  # built by DeepSpeed from the JSON
    ("offload_client_optimizer", "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam"),  # ours, for ZeRO-Offload
])
def test_spec_schedule_when_the_json_has_no_scheduler(probed, case, optimizer):
    r = result(probed, case)
    assert r["optimizer"] == optimizer
    assert r["scheduler"] == "torch.optim.lr_scheduler.LambdaLR"  # transformers' get_scheduler
    assert r["lrs"] == pytest.approx(HAND, abs=1e-12)
    assert r["lrs"] == pytest.approx([0.0, 1e-3, 0.75e-3, 0.25e-3])


def test_optimizer_only_json_gets_the_spec_values(probed):
    r = result(probed, "optimizer_only")
    assert r["config"]["optimizer"]["params"] == {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert "scheduler" not in r["config"]


def test_hf_auto_json_deepspeed_builds_both(probed):
    r = result(probed, "hf_auto")
    assert r["optimizer"] == "deepspeed.ops.adam.fused_adam.FusedAdam"
    assert r["scheduler"] == "deepspeed.runtime.lr_schedules.WarmupLR"
    assert r["config"]["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 1}
    # By hand: DeepSpeed's WarmupLR stretches warmup to max(2, warmup_num_steps) = 2 steps and
    # warms up logarithmically: iteration i gets LR * log(i + 1) / log(2), then stays at LR.
    # The lr read before step s is iteration s - 1's (min_lr before the first step).
    assert r["lrs"] == pytest.approx([0.0, LR * math.log(1) / math.log(2), LR, LR])


def test_scheduler_only_json_runs_on_our_optimizer(probed):
    r = result(probed, "scheduler_only")
    assert r["optimizer"] == "torch.optim.adamw.AdamW"
    assert r["scheduler"] == "deepspeed.runtime.lr_schedules.WarmupDecayLR"
    params = r["config"]["scheduler"]["params"]
    assert (params["warmup_num_steps"], params["total_num_steps"], params["warmup_max_lr"]) == (1, STEPS, LR)
    # By hand: warmup is stretched to max(2, 1) = 2 iterations, linear: iteration i < 2 gets
    # LR * i / 2, then LR * (4 - i) / (4 - 2). The lr read before step s is iteration s - 1's.
    assert r["lrs"] == pytest.approx([0.0, 0.0, LR / 2, LR])
    assert r["final_lr"] == pytest.approx(LR / 2)  # iteration 3


def test_both_explicit_json(probed):
    r = result(probed, "both_explicit")
    assert r["optimizer"] == "torch.optim.adamw.AdamW"  # "torch_adam": true
    assert r["scheduler"] == "deepspeed.runtime.lr_schedules.WarmupCosineLR"
    assert r["config"]["zero_optimization"]["stage"] == 3
    assert max(r["lrs"]) == pytest.approx(LR)


@pytest.mark.parametrize("name", sorted(p.name for p in JSONS.glob("*.json")))
def test_launch_validate_runs_deepspeeds_own_check(name):
    """`launch validate` is the offline check the docs recommend: it runs DeepSpeed's own
    validation of the resolved JSON too (a subprocess; the CLI never imports deepspeed)."""
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", "configs/examples/quickstart.yaml",
                           f"train.deepspeed={JSONS / name}", f"train.lr={LR}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    if name == "fp16.json":
        assert proc.returncode == 2, proc.stderr
        assert "fp16.enabled" in proc.stderr and "CPU" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_launch_validate_reports_what_deepspeed_rejects(tmp_path):
    bad = json.loads((JSONS / "optimizer_only.json").read_text())
    bad["zero_optimization"]["reduce_bucket_sise"] = 5  # a typo DeepSpeed refuses, we do not know
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(bad))
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", "configs/examples/quickstart.yaml",
                           f"train.deepspeed={path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "DeepSpeed rejects this config" in proc.stderr and "reduce_bucket_sise" in proc.stderr
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
