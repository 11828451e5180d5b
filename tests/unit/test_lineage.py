"""`model.init_from`: which run it names and the errors when it names none, on the local
filesystem (trainers.storage treats a local directory as it treats s3://; the S3 server
runs in tests/integration/test_transfer.py), what the job trains from and records, and
the launcher's pre-flight refusing a missing parent before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.config import load_spec
from trainers import lineage, storage
from trainers.lineage import resolve_init_from
from trainers.user_errors import JobUserError

REPO = Path(__file__).resolve().parents[2]
TRANSFER = REPO / "configs/examples/transfer.yaml"


def make_run(base: Path, name: str, run_id: str, *, finished_at: float | None = None, model: bool = True,
             step: int = 30, lineage_of: str | None = None, checkpoint_step: int | None = None) -> str:
    run = base / name / run_id
    run.mkdir(parents=True)
    spec = {"name": name, "method": "sft"}
    if lineage_of:
        spec["lineage"] = {"parent_run": lineage_of}
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    if model:
        (run / "model").mkdir()
        (run / "model" / "config.json").write_text("{}")
    if finished_at is not None:
        (run / "result.json").write_text(json.dumps({
            "status": "completed", "run": str(run), "model": str(run / "model"), "total_steps": step,
            "metrics": {"step": step, "eval_loss": 1.25}, "finished_at": finished_at}))
    if checkpoint_step is not None:
        ckpt = run / "checkpoints" / f"step_{checkpoint_step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "latest").write_text("x")
        (ckpt / "manifest.json").write_text(json.dumps({"step": checkpoint_step, "world_size": 2,
                                                         "created_at": 1000.0 + checkpoint_step,
                                                         "files": {"latest": 1}}))
    return str(run)


def error(value: str, base) -> JobUserError:
    with pytest.raises(JobUserError) as info:
        resolve_init_from(value, str(base))
    assert info.value.message.startswith("model.init_from: ")
    assert info.value.hint
    return info.value


# ---------------------------------------------------------------- by name


def test_a_name_is_its_newest_finished_run_and_unfinished_ones_are_ignored(tmp_path):
    make_run(tmp_path, "base", "20260101-000000-aaaa", finished_at=100.0, step=20)
    newest = make_run(tmp_path, "base", "20260102-000000-bbbb", finished_at=200.0, step=30)
    make_run(tmp_path, "base", "20260103-000000-cccc", model=False)  # started later, still running
    make_run(tmp_path, "other", "20260104-000000-dddd", finished_at=300.0)
    parent = resolve_init_from("base", str(tmp_path))
    assert parent.run == newest and parent.model == storage.join(newest, "model")
    assert (parent.name, parent.run_id, parent.step) == ("base", "20260102-000000-bbbb", 30)
    assert parent.metrics["eval_loss"] == 1.25


def test_newest_means_finished_last(tmp_path):
    """A run started earlier that finished later (a long one) is the newest result."""
    make_run(tmp_path, "base", "20260101-000000-aaaa", finished_at=500.0)
    make_run(tmp_path, "base", "20260102-000000-bbbb", finished_at=200.0)
    assert resolve_init_from("base", str(tmp_path)).run_id == "20260101-000000-aaaa"


def test_a_name_without_a_finished_run_is_refused(tmp_path):
    make_run(tmp_path, "base", "20260103-000000-cccc", model=False)
    e = error("base", tmp_path)
    assert "no run named base" in e.message and "has finished" in e.message and "20260103-000000-cccc" in e.message
    e = error("nothing", tmp_path)
    assert f"no run named nothing in {tmp_path}" in e.message and "train it first" in e.hint


def test_a_finished_run_without_an_exported_model_is_refused(tmp_path):
    run = make_run(tmp_path, "search", "20260101-000000-aaaa", finished_at=1.0, model=False)
    e = error("search", tmp_path)
    assert run in e.message and "no exported model" in e.message


# ---------------------------------------------------------------- by run directory


def test_a_run_directory_is_that_run(tmp_path):
    older = make_run(tmp_path, "base", "20260101-000000-aaaa", finished_at=100.0, step=12)
    make_run(tmp_path, "base", "20260102-000000-bbbb", finished_at=200.0)
    for value in (older, older + "/", f"file://{older}"):
        parent = resolve_init_from(value, str(tmp_path / "elsewhere"))  # the storage plays no part
        assert parent.model == storage.join(parent.run, "model") and parent.step == 12
        assert (parent.name, parent.run_id) == ("base", "20260101-000000-aaaa")


def test_a_run_directory_without_model_or_result_is_refused_naming_the_field(tmp_path):
    running = make_run(tmp_path, "base", "20260101-000000-aaaa")  # model/ half uploaded, no result.json
    e = error(running, tmp_path)
    assert "has not finished (no result.json)" in e.message and running in e.message
    no_model = make_run(tmp_path, "base", "20260102-000000-bbbb", finished_at=1.0, model=False)
    e = error(no_model, tmp_path)
    assert "no exported model" in e.message and "config.json" in e.message
    e = error(str(tmp_path / "base" / "nope"), tmp_path)
    assert "no run at" in e.message


def test_a_checkpoint_is_refused_and_its_finished_run_suggested(tmp_path):
    run = make_run(tmp_path, "base", "20260101-000000-aaaa", finished_at=1.0, checkpoint_step=30)
    e = error(f"{run}/checkpoints/step_00000030", tmp_path)
    assert "is a checkpoint" in e.message and "not a Hugging Face model" in e.message
    assert f"init_from: {run}" in e.hint
    running = make_run(tmp_path, "base", "20260102-000000-bbbb", checkpoint_step=10)
    e = error(f"{running}/checkpoints/step_00000010/", tmp_path)
    assert "checkpoint.resume" in e.hint


# ---------------------------------------------------------------- the job: apply


def spec_for(tmp_path, *overrides: str):
    return load_spec(TRANSFER, [f"checkpoint.storage={tmp_path}", *overrides])


def test_apply_trains_from_the_parents_model_and_records_the_lineage(tmp_path, capsys):
    parent = make_run(tmp_path, "quickstart", "20260101-000000-aaaa", finished_at=1.0, step=30)
    spec = spec_for(tmp_path)
    assert spec.model.init_from == "quickstart"
    trained, record = lineage.apply(spec)
    assert trained.model.path == storage.join(parent, "model") and trained.model.init_from is None
    assert trained.model.freeze == spec.model.freeze and trained.train == spec.train
    assert spec.model.init_from == "quickstart"  # the given spec is left as it was
    assert record == {"parent_run": parent, "parent_model": storage.join(parent, "model"),
                      "parent_name": "quickstart", "parent_step": 30, "init_from": "quickstart"}
    assert "starting from" in capsys.readouterr().out


def test_apply_without_init_from_changes_nothing(tmp_path):
    spec = spec_for(tmp_path, "model.init_from=null")
    assert lineage.apply(spec) == (spec, None)


def test_a_resumed_run_keeps_the_parent_it_started_from(tmp_path):
    """A LoRA checkpoint holds the adapter only: when the name means a newer parent by now,
    the run that resumes still trains on the base it started with."""
    first = make_run(tmp_path, "quickstart", "20260101-000000-aaaa", finished_at=1.0)
    make_run(tmp_path, "quickstart-transfer", "20260102-000000-bbbb", model=False, lineage_of=first,
             checkpoint_step=5)  # the child, interrupted
    make_run(tmp_path, "quickstart", "20260103-000000-cccc", finished_at=2.0)  # a newer parent
    trained, record = lineage.apply(spec_for(tmp_path))
    assert record["parent_run"] == first and trained.model.path == storage.join(first, "model")
    _, fresh = lineage.apply(spec_for(tmp_path, "checkpoint.resume=never"))
    assert fresh["parent_run"].endswith("20260103-000000-cccc")


def unreadable_storage(spec):
    spec.checkpoint.storage = "s3:/one-slash"  # storage.StorageError: malformed URI
    return spec


def test_apply_reports_an_unreadable_storage_as_a_user_error(tmp_path):
    spec = unreadable_storage(spec_for(tmp_path))
    with pytest.raises(JobUserError, match="model.init_from: .*malformed URI"):
        lineage.apply(spec)


# ---------------------------------------------------------------- the spec and the launcher


def test_the_spec_refuses_what_names_no_run():
    from pydantic import ValidationError

    from trainers.spec import ModelSpec

    for bad in ("Quick Start", "under_score", ""):
        with pytest.raises(ValidationError, match="use a run name"):
            ModelSpec(path="m", init_from=bad)
    assert ModelSpec(path="m", init_from="s3://b/runs/n/20260101-000000-aaaa").init_from


def test_a_relative_run_directory_is_made_absolute_by_the_launcher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = spec_for(tmp_path, "model.init_from=runs/quickstart/20260101-000000-aaaa")
    assert spec.model.init_from == str(tmp_path / "runs/quickstart/20260101-000000-aaaa")
    assert spec_for(tmp_path).model.init_from == "quickstart"  # a name stays a name


def test_validate_does_not_need_the_parent(tmp_path, capsys):
    """`launch validate` is offline: the shipped example validates with no quickstart run anywhere."""
    from launcher.cli import main

    main(["validate", str(TRANSFER), f"checkpoint.storage={tmp_path}"])
    assert ": ok (" in capsys.readouterr().err


def test_preflight_refuses_a_missing_parent_with_exit_2(tmp_path):
    from launcher import preflight
    from launcher.errors import SpecError, StorageError

    spec = spec_for(tmp_path)
    with pytest.raises(SpecError) as info:
        preflight.check_init_from(spec, str(TRANSFER))
    assert info.value.exit_code == 2
    assert "model.init_from: no run named quickstart" in str(info.value) and "train it first" in info.value.hint

    parent = make_run(tmp_path, "quickstart", "20260101-000000-aaaa", finished_at=1.0)
    found, warning = preflight.check_init_from(spec, str(TRANSFER))
    assert found.run == parent and warning is None
    assert preflight.check_init_from(spec_for(tmp_path, "model.init_from=null"), "x") == (None, None)

    unreadable = unreadable_storage(spec_for(tmp_path))
    with pytest.raises(StorageError) as info:
        preflight.check_init_from(unreadable, "x")
    assert info.value.exit_code == 2 and "model.init_from" in info.value.message
    found, warning = preflight.check_init_from(unreadable, "x", remote=True)
    assert found is None and "cluster's storage Secret" in warning


def test_a_local_run_directory_is_refused_for_a_remote_cluster(tmp_path):
    from launcher import preflight
    from launcher.errors import SpecError

    spec = spec_for(tmp_path, f"model.init_from={tmp_path}/quickstart/20260101-000000-aaaa",
                    "checkpoint.storage=s3://bucket/runs", "model.path=org/model")
    with pytest.raises(SpecError, match="model.init_from: a remote cluster cannot read"):
        preflight.check_spec(spec, "x", remote=True)
