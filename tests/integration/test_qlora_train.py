"""QLoRA end to end through real Ray, real DeepSpeed (gloo, 2 CPU workers, ZeRO-2) and a
real S3 server: the base trains in bitsandbytes 4-bit with an evaluation in between, the
adapter and the model merged into the unquantized base are exported, and a run resumes
from a QLoRA checkpoint (which holds the adapters only): the first run's own mid-run
checkpoint, so that one QLoRA run serves both tests."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import launch_cli, output
from tests.fixtures.s3 import make_bucket
from tests.integration.test_training import BASE_MODEL, assert_generates, assert_ok, download, load_model, run_dir, \
    train_metrics
from trainers import checkpoint, storage

pytestmark = pytest.mark.integration
pytest.importorskip("bitsandbytes")
QLORA = "configs/examples/qlora.yaml"


OPTIONS = ("train.max_steps=10", "train.eval_every=5", "checkpoint.every_n_steps=5")


@pytest.fixture(scope="module")
def qlora_run(launch_home, s3_server):
    """10 QLoRA steps with an evaluation and a checkpoint every 5, on the S3 server."""
    storage_uri = f"{make_bucket(s3_server, 'qlora-runs')}/runs"
    return launch_cli(launch_home, s3_server, QLORA, f"checkpoint.storage={storage_uri}", *OPTIONS), storage_uri


def test_qlora_trains_in_4bit_and_exports_the_adapter_merged_into_the_unquantized_base(qlora_run, s3_env, tmp_path):
    from peft import PeftModel

    proc, _ = qlora_run
    assert_ok(proc)
    run = run_dir(proc)
    # Counted at the unquantized size: the same model as the LoRA example's.
    counts = re.search(r"model: ([\d,]+) parameters, ([\d,]+) trainable; ZeRO stage 2", output(proc))
    assert counts and counts.groups() == ("155,968", "16,384"), output(proc)[-3000:]
    losses = [m["loss"] for m in train_metrics(run)]
    assert len(losses) == 10
    assert losses[-1] < losses[0], losses
    assert min(losses[5:]) < min(losses[:5]), losses  # still learning after the evaluation at step 5
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    evals = [m for m in rows if "eval_loss" in m]
    assert [m["step"] for m in evals] == [5, 10]

    # A checkpoint holds the adapters, not the (frozen, quantized) base.
    final = checkpoint.complete_checkpoints(run)[-1]
    manifest = json.loads(storage.read_text(storage.join(final, checkpoint.MANIFEST)))
    assert sum(manifest["files"].values()) < 2_000_000

    adapter_dir = download(storage.join(run, "adapter"), tmp_path / "adapter")
    merged_dir = download(storage.join(run, "model"), tmp_path / "model")
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())
    peft_model = PeftModel.from_pretrained(load_model(BASE_MODEL), adapter_dir).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at zero)

    merged = load_model(merged_dir).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # not 4-bit
    ids = torch.randint(10, 500, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, load_model(BASE_MODEL)(ids).logits)
    assert_generates(merged_dir)


def test_qlora_run_resumes_from_its_checkpoint(qlora_run, launch, s3_env):
    first, storage_uri = qlora_run
    assert_ok(first)
    ckpt = checkpoint.complete_checkpoints(run_dir(first))[0]
    assert ckpt.endswith("step_00000005")
    first_losses = {m["step"]: m["loss"] for m in train_metrics(run_dir(first))}

    second = launch(QLORA, f"checkpoint.storage={storage_uri}", "name=qlora-resume", *OPTIONS,
                    f"checkpoint.resume={ckpt}")
    assert_ok(second)
    assert "starting at step 5/10" in output(second)
    metrics = train_metrics(run_dir(second))
    assert [m["step"] for m in metrics] == list(range(1, 11))
    # The adapters came back: step 6 goes on from where step 5 left the loss, nearer to it
    # than to the untrained base's loss at step 1.
    start, end = first_losses[1], first_losses[5]
    assert end < start and abs(metrics[5]["loss"] - end) < abs(metrics[5]["loss"] - start), (first_losses, metrics)
