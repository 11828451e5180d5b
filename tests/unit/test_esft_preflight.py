"""`method: esft` on a model that is not a supported mixture of experts is exit 2 before
anything starts, naming the field and the architectures that are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def validate(*overrides: str):
    return subprocess.run([sys.executable, "-m", "launcher.cli", "validate", "configs/examples/esft.yaml", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_dense_model_is_refused_with_the_supported_list():
    proc = validate("model.path=tiny-llama")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "model.path: esft trains mixture-of-experts models; model_type 'llama'" in out
    assert "deepseek_v3, mixtral, qwen2_moe, qwen3_moe" in out and "Traceback" not in out


def test_the_shipped_moe_passes_and_peft_is_refused():
    assert validate().returncode == 0
    proc = validate("model.peft.r=8")
    assert proc.returncode == 2 and "model.peft: esft trains the selected experts" in proc.stdout + proc.stderr


def test_a_search_over_the_esft_section_validates(tmp_path):
    """`tune:` can search `esft.top_p` and `esft.score` like any field (a typo is exit 2)."""
    spec = (REPO / "configs/examples/esft.yaml").read_text()
    spec = spec.replace("path: tiny-qwen3-moe", f"path: {REPO}/configs/examples/tiny-qwen3-moe")
    spec = spec.replace("path: data/reverse.jsonl", f"path: {REPO}/configs/examples/data/reverse.jsonl")
    search = ("tune:\n  metric: eval_loss\n  mode: min\n  num_samples: 2\n  search_space:\n"
              "    esft.top_p: {choice: [0.2, 0.4]}\n    esft.score: {choice: [token, gate]}\n")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(spec + search)
    bad.write_text(spec + search.replace("esft.top_p", "esft.top_pp"))
    run = [sys.executable, "-m", "launcher.cli", "validate"]
    ok = subprocess.run([*run, str(good)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run([*run, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "tune.search_space.esft.top_pp" in wrong.stdout + wrong.stderr


def test_zero3_is_refused_before_anything_starts():
    """Under ZeRO-3 the split expert tensors fail in DeepSpeed's backward (measured: the
    first step of a 2-worker run); `launch validate` and `launch` refuse it, naming the field."""
    proc = validate("train.deepspeed.stage=3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "train.deepspeed: esft trains under ZeRO stages 0-2, not 3" in out and "Traceback" not in out
    assert validate("train.deepspeed.stage=1").returncode == 0
