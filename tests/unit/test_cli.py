"""The real `launch` CLI in a subprocess (`python -m launcher.cli` and the installed console
script): exit codes, messages without tracebacks, dry runs that start nothing, import cost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = "configs/examples/quickstart.yaml"
CONSOLE_SCRIPT = Path(sys.executable).parent / "launch"
HEAVY = ("torch", "deepspeed", "ray.train", "transformers")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private LLMLAUNCH_HOME (and no user cluster definitions) for the subprocess."""
    path = tmp_path / "llmlaunch-home"
    monkeypatch.setenv("LLMLAUNCH_HOME", str(path))
    monkeypatch.setenv("LLMLAUNCH_CLUSTERS", str(tmp_path / "no-clusters"))
    return path


def launch(*args: str, cmd=None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = cmd or [sys.executable, *extra, "-m", "launcher.cli"]
    proc = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_help(home):
    proc = launch("--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: launch" in proc.stdout
    for command in ("run", "validate", "schema", "logs", "cancel"):
        assert command in proc.stdout


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="console script not installed next to this interpreter")
@pytest.mark.parametrize("args, stream, text", [(("--help",), "stdout", "Usage: launch"),
                                                (("validate", QUICKSTART), "stderr", ": ok (sft, 2 workers")])
def test_installed_console_script(home, args, stream, text):
    proc = launch(*args, cmd=[str(CONSOLE_SCRIPT)])
    assert proc.returncode == 0, proc.stderr
    assert text in getattr(proc, stream)


def test_validate_quickstart(home):
    proc = launch("validate", QUICKSTART)
    assert proc.returncode == 0, proc.stderr
    assert f"{QUICKSTART}: ok (sft, 2 workers, 2 gradient accumulation steps" in proc.stderr
    assert str(home / "runs") in proc.stderr  # default storage under LLMLAUNCH_HOME


def test_validate_reports_every_mistake_with_path_and_suggestion(home, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(textwrap.dedent("""
        name: bad
        method: sft
        model:
          path: org/model
          dtyp: float32
        data:
          train:
            - path: s3://bucket/train.jsonl
          packin: true
        train:
          micro_batch_sise: 4
    """))
    proc = launch("validate", str(spec))
    assert proc.returncode == 2, proc.stderr
    assert str(spec) in proc.stderr
    assert "3 problems" in proc.stderr
    for path, suggestion in [("model.dtyp", "dtype"), ("data.packin", "packing"),
                             ("train.micro_batch_sise", "micro_batch_size")]:
        [line] = [ln for ln in proc.stderr.splitlines() if f"{path}:" in ln]
        assert f"did you mean `{suggestion}`?" in line
    assert proc.stdout == ""


def test_missing_spec_file(home, tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = launch("validate", str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "not found" in proc.stderr


def test_bad_override(home):
    proc = launch("validate", QUICKSTART, "train.lr=abc")
    assert proc.returncode == 2
    [line] = [ln for ln in proc.stderr.splitlines() if "train.lr" in ln]
    assert "abc" in line


def test_schema_is_json_with_the_sections(home):
    proc = launch("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    members = schema.get("oneOf") or schema.get("anyOf") or [schema]
    assert members
    for member in members:
        if "$ref" in member:
            member = schema["$defs"][member["$ref"].rsplit("/", 1)[1]]
        assert {"model", "data", "train"} <= set(member["properties"])


def test_default_command_dry_run_prints_resolved_deepspeed_and_starts_nothing(home):
    proc = launch(QUICKSTART, "--dry-run")  # no `run`: the default command
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    assert out["spec"]["name"] == "quickstart"
    assert out["cluster"]["kind"] == "local"
    ds = out["deepspeed"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert ds["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(ds)
    assert not (home / "local" / "head.json").exists()
    assert not (home / "local").exists()


def test_unknown_cluster(home):
    proc = launch("--cluster", "nosuch", QUICKSTART, "--dry-run")
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr
    assert proc.stdout == ""


def test_deepspeed_json_disagreeing_with_spec(home, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": "auto",
                              "train_batch_size": "auto", "zero_optimization": {"stage": 2}}))
    for args in (("validate", QUICKSTART), (QUICKSTART, "--dry-run")):
        proc = launch(*args, f"train.deepspeed={ds}")
        assert proc.returncode == 2, (args, proc.stderr)
        [line] = [ln for ln in proc.stderr.splitlines() if "train_micro_batch_size_per_gpu" in ln]
        assert "is 3" in line and "4" in line and str(ds) in line


def imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name)
    return names


def is_heavy(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAVY)


@pytest.mark.parametrize("args, must_import", [
    # (`-m launcher.cli` runs the module as __main__: importtime lists its package and typer)
    (("--help",), {"launcher", "typer"}),
    (("validate", QUICKSTART), {"typer", "launcher.config", "launcher.preflight", "trainers.spec",
                                "trainers.ds_config"}),
])
def test_import_cost(home, args, must_import):
    proc = launch(*args, extra=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = imported(proc.stderr)
    assert must_import <= names, must_import - names  # the command really ran (and the parse works)
    assert sorted(n for n in names if is_heavy(n)) == []


def test_import_cost_parser_sees_heavy_imports():
    """The check above can fail: the same parse does see torch when it is imported."""
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True, text=True)
    assert "torch" in imported(proc.stderr) and any(is_heavy(n) for n in imported(proc.stderr))
