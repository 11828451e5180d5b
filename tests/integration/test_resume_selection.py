"""Which checkpoint `resume: auto` picks, against real storage (S3 server and a local dir):
only complete ones (manifest written last, every file it lists present), newest first,
never from a finished run."""

from __future__ import annotations

import json

import pytest

from trainers import checkpoint, storage

pytestmark = pytest.mark.integration


def make_checkpoint(run: str, step: int, created_at: float, *, manifest: bool = True, drop: str | None = None):
    ckpt = storage.join(run, "checkpoints", checkpoint.step_dir_name(step))
    files = {"latest": "x" * 5, f"step/{step}/model_states.pt": "w" * 40, f"step/{step}/rank1.pt": "r" * 30}
    for rel, body in files.items():
        if rel != drop:
            storage.write_text(storage.join(ckpt, rel), body)
    if manifest:
        storage.write_text(storage.join(ckpt, checkpoint.MANIFEST), json.dumps(
            {"step": step, "world_size": 2, "created_at": created_at, "files": {k: len(v) for k, v in files.items()}}))
    return ckpt


@pytest.fixture(params=["s3", "local"])
def base(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_env")
    return str(tmp_path / "runs")


def test_partial_checkpoints_are_never_chosen(base):
    run = storage.join(base, "exp", "20260101-000000-aaaa")
    complete = make_checkpoint(run, 10, created_at=100)
    make_checkpoint(run, 20, created_at=200, manifest=False)            # killed before the manifest
    make_checkpoint(run, 30, created_at=300, drop="step/30/rank1.pt")   # manifest but a rank's file lost
    assert checkpoint.complete_checkpoints(run) == [complete]
    assert checkpoint.find_resume(base, "exp") == complete


def test_newest_complete_checkpoint_across_runs(base):
    older = make_checkpoint(storage.join(base, "exp", "run-a"), 50, created_at=100)
    assert checkpoint.find_resume(base, "exp") == older
    newer = make_checkpoint(storage.join(base, "exp", "run-b"), 10, created_at=200)
    assert checkpoint.find_resume(base, "exp") == newer
    assert checkpoint.find_resume(base, "other-name") is None


def test_a_finished_lineage_is_never_resumed(base):
    """A interrupted, B resumed from it and finished: the next run starts fresh, never from A."""
    make_checkpoint(storage.join(base, "exp", "run-a"), 20, created_at=100)
    make_checkpoint(storage.join(base, "exp", "run-b"), 40, created_at=200)
    storage.write_text(storage.join(base, "exp", "run-b", checkpoint.RESULT), "{}")
    assert checkpoint.find_resume(base, "exp") is None


def test_truncated_file_makes_a_checkpoint_incomplete(base):
    run = storage.join(base, "exp", "run-a")
    ckpt = make_checkpoint(run, 10, created_at=100)
    storage.write_text(storage.join(ckpt, "step/10/rank1.pt"), "short")
    assert not checkpoint.is_complete(ckpt)
    assert checkpoint.find_resume(base, "exp") is None
