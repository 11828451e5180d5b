"""Population-based training, the parts that need no cluster: what the spec refuses before
anything starts, where a trial goes on from (its own newest checkpoint, or its donor's),
and the spec's optimizer values winning over a restored checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.unit.test_tune_spec import validate_spec
from trainers import checkpoint
from trainers.tune import start_point

REPO = Path(__file__).resolve().parents[2]
TUNE_PBT = REPO / "configs/examples/tune_pbt.yaml"


def validate(tmp_path, capsys, **sections) -> tuple[int, str]:
    return validate_spec(tmp_path, capsys, TUNE_PBT, **sections)


def pbt(**fields) -> dict:
    return {"scheduler": {"type": "pbt", "perturbation_interval": 4, "synch": True, "quantile_fraction": 0.5,
                          "resample_probability": 0.0, **fields}}


def test_shipped_pbt_example_validates(tmp_path, capsys):
    code, err = validate(tmp_path, capsys)
    assert code == 0, err


@pytest.mark.parametrize("sections, expected", [
    ({"checkpoint": {"every_n_steps": 3}},
     "perturbation_interval (4) must be a multiple of checkpoint.every_n_steps (3)"),
    ({"checkpoint": {"every_n_steps": 0}}, "must be a multiple of checkpoint.every_n_steps (0)"),
    ({"train": {"eval_every": 4}, "checkpoint": {"every_n_steps": 2}},
     "checkpoint.every_n_steps (2) must be a multiple of train.eval_every (4)"),
    ({"tune": pbt(mutations={"model.peft.r": {"choice": [4, 8]}})},
     "model.peft.r cannot change in the middle of a run"),
    ({"tune": pbt(mutations={"train.weight_decay": {"grid": [0.0, 0.1]}})}, "a mutation cannot be a grid"),
    ({"tune": pbt(mutations={"train.lrr": {"loguniform": [1e-5, 1e-2]}})},
     "tune.scheduler.mutations.train.lrr: `lrr` is not a field of train; did you mean "
     "`tune.scheduler.mutations.train.lr`?"),
    ({"tune": pbt(mutations={"train.warmup_ratio": {"uniform": [0.0, 1.5]}})},
     "tune.scheduler.mutations.train.warmup_ratio: uniform value 1.5: Input should be less than 1"),
    ({"tune": pbt(quantile_fraction=0.7)}, "quantile_fraction"),
])
def test_pbt_refuses_what_would_fail_later(tmp_path, capsys, sections, expected):
    code, err = validate(tmp_path, capsys, **sections)
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_pbt_needs_something_to_mutate():
    from pydantic import ValidationError

    from trainers.tune_spec import TuneSpec

    with pytest.raises(ValidationError, match="nothing to mutate"):
        TuneSpec.model_validate({"search_space": {"model.peft.r": {"choice": [4, 8]}}, **pbt()})


def test_pbt_mutates_the_search_space_less_model_paths_by_default():
    from launcher.config import load_spec

    spec = load_spec(TUNE_PBT)
    spec.tune.scheduler.mutations = None
    spec.tune.search_space["model.peft.r"] = spec.tune.search_space["train.lr"].model_copy(
        update={"grid": None, "choice": [4, 8]})
    assert list(spec.tune.mutations()) == ["train.lr"]
    assert spec.tune.paths() == ["train.lr", "model.peft.r"]


# ---------------------------------------------------------------- where a trial starts

def fake_checkpoint(run: Path, step: int, *, complete: bool = True) -> str:
    """A checkpoint directory as checkpoint.save leaves it: files, then the manifest."""
    ckpt = run / "checkpoints" / checkpoint.step_dir_name(step)
    ckpt.mkdir(parents=True)
    (ckpt / "weights.bin").write_bytes(b"x" * step)
    if complete:
        (ckpt / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": {"weights.bin": step}}))
    return str(ckpt)


class TuneCheckpoint:
    """What tune.get_checkpoint() hands the trial: a directory holding our pointer."""

    def __init__(self, tmp_path: Path, pointer: str):
        self.dir = tmp_path / "tune-ckpt"
        self.dir.mkdir()
        (self.dir / "pointer.json").write_text(json.dumps({"checkpoint": pointer}))

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.dir))


def test_a_fresh_trial_starts_from_nothing_and_a_restored_one_from_its_newest(tmp_path):
    own = tmp_path / "trials" / "a"
    assert start_point(str(own), None) == (None, None)
    fake_checkpoint(own, 2)
    newest = fake_checkpoint(own, 4)
    fake_checkpoint(own, 6, complete=False)  # cancelled while saving
    older = str(own / "checkpoints" / checkpoint.step_dir_name(2))
    # Tune's pointer may lag behind the trial's own newest complete checkpoint.
    assert start_point(str(own), TuneCheckpoint(tmp_path, older)) == (newest, None)


def test_an_exploited_trial_starts_from_its_donor_and_drops_its_own_line(tmp_path):
    own, donor = tmp_path / "trials" / "a", tmp_path / "trials" / "b"
    fake_checkpoint(own, 4)
    ckpt = fake_checkpoint(donor, 4)
    fake_checkpoint(donor, 2)
    assert start_point(str(own), TuneCheckpoint(tmp_path, ckpt)) == (ckpt, str(donor))
    assert not (own / "checkpoints").exists()  # its own checkpoints belong to the abandoned line


def test_a_donor_checkpoint_retention_removed_falls_back_to_its_newest(tmp_path):
    own, donor = tmp_path / "trials" / "a", tmp_path / "trials" / "b"
    gone = str(donor / "checkpoints" / checkpoint.step_dir_name(4))
    newest = fake_checkpoint(donor, 8)
    assert start_point(str(own), TuneCheckpoint(tmp_path, gone)) == (newest, str(donor))
    with pytest.raises(RuntimeError, match="has no complete checkpoint to copy"):
        start_point(str(own), TuneCheckpoint(tmp_path / "x" if (tmp_path / "x").mkdir() is None else None,
                                             str(tmp_path / "trials" / "c" / "checkpoints" / "step_00000004")))


# ---------------------------------------------------------------- the spec's values win

def test_restored_optimizer_and_schedule_take_the_specs_values():
    """A checkpoint saved at lr 1e-2 (warmup 2 steps, then constant), restored into a trial
    whose spec says lr 3e-3, weight decay 0.05: the next steps use 3e-3, by hand."""
    import torch
    from transformers import get_scheduler

    from launcher.config import load_spec
    from trainers.engine import apply_spec_hyperparameters

    def engine_at(lr: float):
        params = [torch.nn.Parameter(torch.ones(3))]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=4, num_training_steps=10)
        return SimpleNamespace(optimizer=opt, lr_scheduler=sched, params=params)

    saved = engine_at(1e-2)
    for _ in range(2):
        saved.params[0].grad = torch.ones(3)
        saved.optimizer.step()
        saved.lr_scheduler.step()
    restored = engine_at(3e-3)
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())
    restored.lr_scheduler.load_state_dict(saved.lr_scheduler.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 2 / 4)  # the checkpoint's

    spec = load_spec(TUNE_PBT)
    spec.train.lr, spec.train.weight_decay = 3e-3, 0.05
    apply_spec_hyperparameters(restored, spec)
    group = restored.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(3e-3 * 2 / 4) and group["weight_decay"] == 0.05
    restored.lr_scheduler.step()
    assert group["lr"] == pytest.approx(3e-3 * 3 / 4)
    restored.lr_scheduler.step()
    restored.lr_scheduler.step()
    assert group["lr"] == pytest.approx(3e-3)  # warmup over: the spec's lr itself
