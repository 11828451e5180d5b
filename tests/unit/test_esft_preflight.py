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
