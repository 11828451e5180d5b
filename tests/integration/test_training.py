"""End to end through real Ray, real DeepSpeed (gloo, 2 CPU workers) and a real S3 server:
full fine-tuning with ZeRO-2 and ZeRO-3, LoRA, continued pre-training, resume after an
interruption, and the exported models."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import LAUNCH, REPO, output
from trainers import checkpoint, storage

pytestmark = pytest.mark.integration
QUICKSTART = "configs/examples/quickstart.yaml"
BASE_MODEL = REPO / "configs/examples/tiny-llama"


def run_dir(proc) -> str:
    return re.search(r"run directory (\S+)", output(proc)).group(1)


def train_metrics(run: str) -> list[dict]:
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    return [m for m in rows if "loss" in m]


def download(uri: str, dest) -> str:
    storage.download_dir(uri, str(dest))
    return str(dest)


def assert_ok(proc) -> None:
    assert proc.returncode == 0, output(proc)[-4000:]


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def assert_generates(model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                     tokenize=False, add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_full_finetune_zero2_model_and_data_from_s3(launch, s3_env, tmp_path):
    """The model, the data and the run all live in S3."""
    inputs = storage.join(s3_env.rsplit("/", 1)[0], "inputs")
    storage.upload_dir(str(BASE_MODEL), storage.join(inputs, "tiny-llama"))
    storage.write_text(storage.join(inputs, "chat.jsonl"),
                       (REPO / "configs/examples/data/messages.jsonl").read_text())
    proc = launch(QUICKSTART, f"checkpoint.storage={s3_env}", "name=ft-zero2", "train.max_steps=15",
                  "checkpoint.every_n_steps=5", "checkpoint.keep=2", f"model.path={inputs}/tiny-llama",
                  f"data.train[0].path={inputs}/chat.jsonl")
    assert_ok(proc)
    run = run_dir(proc)
    assert run.startswith(s3_env)
    assert "packing efficiency" in output(proc)

    losses = [m["loss"] for m in train_metrics(run)]
    assert len(losses) == 15
    assert losses[-1] < 0.8 * losses[0], losses

    # keep=2: the step-5 checkpoint was deleted once two newer ones were complete
    kept = [c.rsplit("/", 1)[1] for c in checkpoint.complete_checkpoints(run)]
    assert kept == ["step_00000010", "step_00000015"]
    result = json.loads(storage.read_text(storage.join(run, "result.json")))
    assert result["status"] == "completed" and result["total_steps"] == 15

    model_dir = download(storage.join(run, "model"), tmp_path / "model")
    trained, base = load_model(model_dir), load_model(BASE_MODEL)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) == len(base.state_dict())  # every weight was trained
    assert_generates(model_dir)


def test_zero3_with_deepspeed_json_exports_the_gathered_weights(launch, s3_env, tmp_path):
    """alpaca format, packing off, a real DeepSpeed JSON with "auto" values, ZeRO-3."""
    proc = launch("configs/examples/alpaca_zero3.yaml", f"checkpoint.storage={s3_env}", "train.max_steps=10")
    assert_ok(proc)
    run = run_dir(proc)
    assert "ZeRO stage 3" in output(proc)
    losses = [m["loss"] for m in train_metrics(run)]
    assert losses[-1] < losses[0]

    # The exported weights are the ZeRO-3 partitions gathered: the same as DeepSpeed's own
    # offline consolidation of the final checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    final = checkpoint.complete_checkpoints(run)[-1]
    ckpt_dir = download(final, tmp_path / "ckpt")
    reference = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=final.rsplit("/", 1)[1])
    exported = load_model(download(storage.join(run, "model"), tmp_path / "model")).state_dict()
    assert set(reference) <= set(exported)
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, msg=name)
    assert_generates(tmp_path / "model")


def test_lora_exports_adapter_and_merged_model(readme_lora_run, tmp_path):
    """The README's LoRA run (conftest.readme_lora_run): the adapter and the merged model."""
    from peft import PeftModel

    proc = readme_lora_run
    assert_ok(proc)
    run = run_dir(proc)
    assert re.search(r"model: [\d,]+ parameters, [\d,]+ trainable", output(proc))
    losses = [m["loss"] for m in train_metrics(run)]
    assert losses[-1] < losses[0]

    adapter_dir = download(storage.join(run, "adapter"), tmp_path / "adapter")
    merged_dir = download(storage.join(run, "model"), tmp_path / "model")
    peft_model = PeftModel.from_pretrained(load_model(BASE_MODEL), adapter_dir).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at zero)

    merged = load_model(merged_dir).eval()
    ids = torch.randint(10, 500, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, load_model(BASE_MODEL)(ids).logits)
    assert_generates(merged_dir)


CHAT_EXAMPLES = ["configs/examples/sft_sharegpt.yaml", "configs/examples/sft_prompt_completion.yaml"]


def test_each_chat_format_example_trains_end_to_end(launch, tmp_path):
    """The shipped example of each chat format, in one run of a few steps through the real
    path (one job: a run's start costs more than its steps here): every row of both passes
    the checks, tokenizes with its mask in Ray Data, and the run trains and exports."""
    import yaml

    datasets = []
    for example in CHAT_EXAMPLES:
        [ds] = yaml.safe_load((REPO / example).read_text())["data"]["train"]
        datasets.append({**ds, "path": str(REPO / "configs/examples" / ds["path"])})
    spec = tmp_path / "chat_formats.yaml"
    spec.write_text(yaml.safe_dump({"defaults": [str(REPO / CHAT_EXAMPLES[0])], "name": "chat-formats",
                                    "data": {"train": datasets}}))
    proc = launch(str(spec), f"checkpoint.storage={tmp_path / 'runs'}", "train.max_steps=6")
    assert_ok(proc)
    assert "bad row" not in output(proc)  # no row of either format was skipped
    tokens = int(re.search(r"([\d,]+) loss tokens", output(proc)).group(1).replace(",", ""))
    rows = sum(len((REPO / "configs/examples" / ds["path"]).read_text().splitlines()) for ds in
               (yaml.safe_load((REPO / e).read_text())["data"]["train"][0] for e in CHAT_EXAMPLES))
    assert tokens > rows  # each example has a few loss tokens at least
    losses = [m["loss"] for m in train_metrics(run_dir(proc))]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert_generates(download(storage.join(run_dir(proc), "model"), tmp_path / "model"))


def test_pretrain_on_local_storage_stops_early_with_a_checkpoint_and_a_model(launch, tmp_path):
    """The continued pre-training example (ZeRO-1, raw text) on local storage, with early
    stopping (one run for both: a run's start costs more than its steps here). Patience 1
    and a min_delta no loss can beat: the evaluation at step 2 does not improve on the one
    before training, so the run stops there, saves, and exports."""
    storage_dir = tmp_path / "runs"
    proc = launch("configs/examples/pretrain.yaml", f"checkpoint.storage={storage_dir}", "train.eval_every=2",
                  "train.eval_at_start=true", "train.early_stopping={patience: 1, min_delta: 100}")
    assert_ok(proc)
    log = output(proc)
    assert "early stopping at step 2: eval_loss has not improved on" in log and "(step 0) for 1 evaluations" in log
    run = run_dir(proc)
    assert run.startswith(str(storage_dir / "pretrain-text"))
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [m["step"] for m in rows if "eval_loss" in m] == [0, 2]
    assert [m["step"] for m in rows if "loss" in m] == [1, 2]
    assert [c.rsplit("/", 1)[-1] for c in checkpoint.complete_checkpoints(run)] == [checkpoint.step_dir_name(2)]
    result = json.loads(storage.read_text(storage.join(run, checkpoint.RESULT)))
    assert result["status"] == "completed" and result["metrics"]["stopped_early"] is True
    assert result["metrics"]["best_step"] == 0 and result["metrics"]["best_value"] == rows[0]["eval_loss"]
    assert_generates(download(storage.join(run, "model"), tmp_path / "model"))


def test_a_cancelled_run_resumes_and_a_lost_worker_restarts_in_the_job(launch, launch_home, s3_env):
    """Both ways a run goes on from its newest complete checkpoint. Across jobs: the run is
    cancelled, and the same command again resumes it from storage (`checkpoint.resume: auto`).
    In the job: during that second run a Ray Train worker is SIGKILLed (a spot node reclaimed)
    under `FailureConfig(max_failures)`, which the launcher sets from LLMLAUNCH_MAX_FAILURES (3 on
    an aws definition with spot workers; the run's own `env` sets 1 here); Ray Train restarts the
    worker group, the loop restores the checkpoint Ray Train holds, and the run finishes."""
    # Enough steps after the kill point for the worker to still be there when the launcher has
    # streamed the "checkpoint saved" line (about 15 steps a second here).
    steps = 120
    args = [QUICKSTART, f"checkpoint.storage={s3_env}", "name=resume", f"train.max_steps={steps}",
            "checkpoint.every_n_steps=10", "checkpoint.keep=5", "env.LLMLAUNCH_MAX_FAILURES=1"]
    first = launch(*args, "--detach")
    assert_ok(first)
    job = re.search(r"submitted job (\S+);", output(first)).group(1)
    run1 = run_dir(first)
    deadline = time.monotonic() + 300
    while not checkpoint.complete_checkpoints(run1):
        assert time.monotonic() < deadline, "no complete checkpoint within 300 s"
        time.sleep(0.5)
    assert_ok(launch("cancel", job))
    _wait_terminal(launch, job)
    assert not storage.exists(storage.join(run1, "result.json"))
    saved = [int(c.rsplit("_", 1)[1]) for c in checkpoint.complete_checkpoints(run1)]
    assert saved and max(saved) < steps

    # the same command again, attached; one worker is killed after its first new checkpoint
    second = subprocess.Popen([*LAUNCH, *args], cwd=REPO, env={**os.environ, "LLMLAUNCH_HOME": launch_home},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed = [], None
    for line in second.stdout:
        lines.append(line)
        saved_now = re.match(r"checkpoint saved: step (\d+)$", line.strip())
        if killed is None and saved_now and int(saved_now.group(1)) > max(saved):
            killed = _train_workers()
            assert len(killed) == 2, killed
            os.kill(max(killed), signal.SIGKILL)
    text = "".join(lines)
    assert second.wait(timeout=60) == 0 and killed, text[-4000:]
    resumed_at = int(re.search(r"resuming from \S+ \(step (\d+)\)", text).group(1))
    assert resumed_at == max(saved)
    starts = [int(s) for s in re.findall(rf"starting at step (\d+)/{steps}", text)]
    assert starts[0] == resumed_at and len(starts) == 2 and starts[1] > resumed_at, (starts, text[-4000:])

    run2 = re.search(r"run directory (\S+)", text).group(1)
    metrics = train_metrics(run2)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))  # history carried, no step repeated
    assert checkpoint.complete_checkpoints(run2)[-1].endswith(checkpoint.step_dir_name(steps))
    assert storage.exists(storage.join(run2, "model", "config.json"))
    first_run = {m["step"]: m["loss"] for m in train_metrics(run1)}
    # the loss continues where it stopped rather than starting over from the random init
    after = metrics[resumed_at]["loss"]
    assert after < 0.8 * first_run[1]
    assert abs(after - first_run[resumed_at]) < 0.25 * first_run[resumed_at]


def _train_workers() -> list[int]:
    """PIDs of the Ray Train workers running now (the tests run one job at a time)."""
    found = subprocess.run(["pgrep", "-f", "^ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def _wait_terminal(launch, job: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = json.loads(launch("status", "--json").stdout)["jobs"]
        if any(j["job"] == job and j["status"] in ("STOPPED", "FAILED", "SUCCEEDED") for j in jobs):
            return
        time.sleep(1)
    raise AssertionError(f"job {job} still running after {timeout_s}s")
