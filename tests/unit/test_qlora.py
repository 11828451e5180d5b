"""QLoRA (`model.peft.quantize: 4bit`) in one process, without Ray or DeepSpeed: the base
loads as bitsandbytes NF4 with double quantization through trainers.models.load_model, only
the adapters train and the loss falls, an evaluation in between leaves the gradients as
they were, the export merges into the unquantized base; and what is refused before
anything starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests` is not a package root under plain `pytest`
    sys.path.insert(0, str(REPO))

from launcher import preflight  # noqa: E402
from launcher.errors import SpecError, UsageError  # noqa: E402
from trainers import quantize_check  # noqa: E402
from trainers.spec import parse_spec  # noqa: E402
from trainers.user_errors import JobUserError  # noqa: E402

MODEL_DIR = REPO / "configs" / "examples" / "tiny-llama"


def qlora_spec(**train) -> dict:
    return {"name": "qlora", "method": "sft",
            "model": {"path": str(MODEL_DIR), "peft": {"r": 8, "alpha": 16, "dropout": 0.0, "quantize": "4bit"}},
            "data": {"train": [{"path": str(REPO / "configs/examples/data/messages.jsonl"), "format": "messages"}]},
            "train": {"lr": 1e-2, **train}}


# ---------------------------------------------------------------- refused before anything starts

def test_quantize_is_off_by_default_and_4bit_parses():
    spec = qlora_spec()
    del spec["model"]["peft"]["quantize"]
    assert parse_spec(spec).model.peft.quantize is None
    assert parse_spec(qlora_spec()).model.peft.quantize == "4bit"
    with pytest.raises(ValueError, match="quantize"):
        parse_spec({**qlora_spec(), "model": {"path": "m", "peft": {"quantize": "8bit"}}})


def test_zero3_shorthand_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"model.peft.quantize 4bit works with ZeRO stages 0-2, not 3.*stage 2"):
        parse_spec(qlora_spec(deepspeed={"stage": 3}))
    for stage in (0, 1, 2):
        parse_spec(qlora_spec(deepspeed={"stage": stage}))


def test_zero3_deepspeed_json_is_refused_by_the_launcher_and_the_job(tmp_path):
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "zero_optimization": {"stage": 3}}))
    spec = parse_spec(qlora_spec(deepspeed=str(cfg)))
    with pytest.raises(SpecError) as e:
        preflight.check_spec(spec, "run.yaml")
    assert "model.peft.quantize: 4bit works with ZeRO stages 0-2, not 3" in e.value.message
    # The job sees the JSON's text (the launcher inlines it).
    inline = parse_spec(qlora_spec(deepspeed=cfg.read_text()))
    with pytest.raises(JobUserError, match="model.peft.quantize: 4bit works with ZeRO stages 0-2"):
        quantize_check.check_quantize(inline)
    quantize_check.check_quantize(parse_spec(qlora_spec()))  # stage 2: fine


def test_missing_bitsandbytes_is_named_by_the_launcher_and_the_job(monkeypatch):
    spec = parse_spec(qlora_spec())
    monkeypatch.setattr(quantize_check, "importable", lambda name: name != "bitsandbytes")
    with pytest.raises(JobUserError, match="model.peft.quantize: 4bit loads the base with bitsandbytes") as e:
        quantize_check.check_quantize(spec)
    assert "llmlaunch[train]" in e.value.hint
    monkeypatch.setattr("trainers.user_errors.missing_train_packages", lambda: [])
    with pytest.raises(UsageError, match="model.peft.quantize: 4bit loads the base with bitsandbytes") as e:
        preflight.check_train_packages(spec)
    assert e.value.exit_code == 2
    preflight.check_train_packages()  # no spec (or no quantize): bitsandbytes is not needed
    plain = qlora_spec()
    del plain["model"]["peft"]["quantize"]
    quantize_check.check_quantize(parse_spec(plain))


# ---------------------------------------------------------------- loading and training (CPU)

# Imported by the fixture: the checks above need neither torch nor bitsandbytes.
torch = bnb = None


@pytest.fixture(scope="module")
def qlora_model():
    global torch, bnb
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from trainers import models

    torch.manual_seed(0)
    return models.load_model(parse_spec(qlora_spec()), str(MODEL_DIR), "float32", {"zero_optimization": {"stage": 2}})


def batch():
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def test_base_is_nf4_with_double_quantization_and_only_adapters_train(qlora_model):
    from trainers import models

    linear4 = [(n, m) for n, m in qlora_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 14  # q, k, v, o, gate, up, down x 2 layers; lm_head stays unquantized
    for name, module in linear4:
        state = module.weight.quant_state
        assert state.quant_type == "nf4" and state.nested, name  # nested: double quantization
        assert module.weight.dtype == torch.uint8 and module.compute_dtype == torch.float32, name
        assert not module.weight.requires_grad, name
    trainable = [n for n, p in qlora_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(linear4)
    # Counted at their unpacked size: the same totals as the unquantized model with LoRA.
    assert models.parameter_counts(qlora_model) == (16_384, 155_968)


def test_adamw_on_the_adapters_lowers_the_loss(qlora_model):
    qlora_model.train()
    params = [p for p in qlora_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = qlora_model(**batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_an_evaluation_leaves_training_gradients_unchanged(qlora_model):
    """bitsandbytes 0.50 repacks 4-bit weights for inference at an eval-mode forward on
    AVX512-BF16 CPUs, and that layout backpropagates wrong gradients: load_model keeps it off."""

    def grads():
        qlora_model.train()
        qlora_model.zero_grad()
        qlora_model(**batch()).loss.backward()
        out = {n: p.grad.clone() for n, p in qlora_model.named_parameters() if p.requires_grad}
        qlora_model.zero_grad()
        return out

    before = grads()
    qlora_model.eval()
    with torch.no_grad():
        qlora_model(**batch())
    after = grads()
    for name, g in before.items():
        torch.testing.assert_close(after[name], g, msg=name)


def test_export_merges_the_adapter_into_the_unquantized_base(qlora_model, tmp_path):
    from trainers import checkpoint

    qlora_model.eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for n, p in qlora_model.named_parameters():
            if "lora_B" in n:  # B starts at zero: give the adapter something to merge
                p.normal_(0, 0.05, generator=gen)
        trained = qlora_model(**batch()).loss.item()
    adapter, merged_dir = tmp_path / "adapter", tmp_path / "model"
    qlora_model.save_pretrained(str(adapter), state_dict=qlora_model.state_dict())
    checkpoint._merge_adapter(str(MODEL_DIR), str(adapter), str(merged_dir), torch.float32)

    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        exported = merged(**batch()).loss.item()
    # The merged model differs from what trained by the base's 4-bit rounding only.
    assert exported == pytest.approx(trained, rel=0.02)


# ---------------------------------------------------------------- the CLI (launcher only)

def _validate(*args: str):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", "configs/examples/qlora.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_launch_validate_accepts_the_example_and_refuses_zero3(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAUNCH_HOME", str(tmp_path / "home"))
    ok = _validate()
    assert ok.returncode == 0 and ": ok (sft, 2 workers" in ok.stderr, ok.stderr
    refused = _validate("train.deepspeed.stage=3")
    assert refused.returncode == 2, refused.stderr
    assert "model.peft.quantize 4bit works with ZeRO stages 0-2, not 3" in refused.stderr
