"""The `tune:` section: every search-space path checked against the spec's schema and every
distribution's values against the field's own constraints, at `launch validate` (exit 2,
the YAML path, no traceback); trials' specs validated again as whole specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from trainers.spec import SftRun
from trainers.tune import capacity_concurrency, trial_spec
from trainers.tune_spec import Distribution, path_problem

REPO = Path(__file__).resolve().parents[2]
TUNE_LORA = REPO / "configs/examples/tune_lora.yaml"


def validate_spec(tmp_path, capsys, base: Path, **sections) -> tuple[int, str]:
    """`launch validate` of `base` with these sections merged over it (the data path made
    absolute: a defaults file's relative paths resolve against the top spec)."""
    spec = tmp_path / "sweep.yaml"
    data = {"train": [{"path": str(REPO / "configs/examples/data/messages.jsonl"), "format": "messages"}]}
    spec.write_text(yaml.safe_dump({"defaults": [str(base)], "data": data, **sections}))
    try:
        main(["validate", str(spec)])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def validate_with(tmp_path, capsys, tune: dict) -> tuple[int, str]:
    return validate_spec(tmp_path, capsys, TUNE_LORA, tune=tune)


def test_shipped_example_validates(tmp_path, capsys):
    code, err = validate_with(tmp_path, capsys, {})
    assert code == 0, err


@pytest.mark.parametrize("space, expected", [
    ({"train.lrr": {"loguniform": [1e-5, 1e-3]}},
     "tune.search_space.train.lrr: `lrr` is not a field of train; did you mean `tune.search_space.train.lr`?"),
    ({"trian.lr": {"loguniform": [1e-5, 1e-3]}}, "`trian` is not a field of the spec; did you mean "
                                                 "`tune.search_space.train`?"),
    ({"train.lr": {"loguniform": [-1, 1e-3]}}, "loguniform: bounds must be positive"),
    ({"train.warmup_ratio": {"uniform": [0.2, 0.1]}}, "must be below the upper bound"),
    ({"train.warmup_ratio": {"uniform": [0.1, 1.5]}}, "uniform value 1.5: Input should be less than 1"),
    ({"model.peft.r": {"choice": [0, 8]}}, "tune.search_space.model.peft.r: choice value 0: Input should be greater than 0"),
    ({"model.peft.r": {"choice": []}}, "List should have at least 1 item"),
    ({"model.path": {"uniform": [0, 1]}}, "tune.search_space.model.path: uniform value 0.0: Input should be a valid string"),
    ({"train.deepspeed.stage": {"choice": [2, 5]}}, "choice value 5: Input should be 0, 1, 2 or 3"),
    ({"train": {"choice": [1]}}, "`train` is a section; search one of its fields"),
    ({"train.weight_decay": {"choice": [0.0], "uniform": [0, 1]}}, "give exactly one of"),
    ({"name": {"choice": ["a", "b"]}}, "`name` cannot be searched"),
])
def test_bad_search_space_is_exit_2_naming_the_path(tmp_path, capsys, space, expected):
    code, err = validate_with(tmp_path, capsys, {"search_space": space})
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_optuna_cannot_search_a_grid(tmp_path, capsys):
    code, err = validate_with(tmp_path, capsys, {"search": "optuna", "search_space": {"model.peft.alpha": {"grid": [8, 16]}}})
    assert code == 2 and "optuna cannot search a grid" in err


def test_asha_needs_evaluations(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"defaults": [str(TUNE_LORA)], "train": {"eval_every": None},
                                    "data": {"train": [{"path": str(REPO / "configs/examples/data/messages.jsonl"),
                                                        "format": "messages"}]}}))
    with pytest.raises(SystemExit) as info:
        main(["validate", str(spec)])
    assert info.value.code == 2 and "set train.eval_every" in capsys.readouterr().err


def test_paths_walk_unions_and_optional_sections():
    assert path_problem(SftRun, "train.deepspeed.offload_optimizer") is None
    assert path_problem(SftRun, "model.peft.alpha") is None
    assert path_problem(SftRun, "model.peft.alhpa") == ("`alhpa` is not a field of model.peft", "model.peft.alpha")


def test_randint_includes_its_upper_bound_and_candidates_are_the_bounds():
    d = Distribution(randint=(1, 3))
    assert d.candidates() == [1, 3]
    from trainers.tune import ray_distribution

    dom = ray_distribution(d)
    assert (dom.lower, dom.upper) == (1, 4)  # Ray's upper bound is exclusive


def test_a_sampled_combination_the_spec_refuses_fails_that_trial_with_the_message():
    from launcher.config import load_spec

    base = load_spec(TUNE_LORA).model_dump(mode="json")
    assert trial_spec(base, {"train.lr": 1e-3}).train.lr == 1e-3
    with pytest.raises(ValueError, match="global_batch_size"):
        trial_spec(base, {"train.micro_batch_size": 3})  # 8 is no multiple of 3 x 1 worker


def test_concurrency_counts_each_trials_driver_cpu():
    from launcher.config import load_spec

    spec = load_spec(TUNE_LORA)  # 1 worker x 1 CPU, + half a CPU for the trial's driver
    assert capacity_concurrency(spec, {"CPU": 2}) == 1
    assert capacity_concurrency(spec, {"CPU": 9}) == 6
    spec.resources.gpus_per_worker = 1
    assert capacity_concurrency(spec, {"CPU": 64, "GPU": 3}) == 3


def test_a_multitask_weight_is_searched_through_its_task_name():
    from trainers.spec import MultitaskRun

    assert path_problem(MultitaskRun, "data.tasks.chat.weight") is None
    assert path_problem(MultitaskRun, "data.tasks.chat.wieght") == (
        "`wieght` is not a field of data.tasks.chat", "data.tasks.chat.weight")
    assert path_problem(MultitaskRun, "data.tasks.chat")[0] == "`data.tasks.chat` is a section; search one of its fields"


def test_preference_coefficients_are_searchable(tmp_path, capsys):
    from trainers.spec import DpoRun, RewardRun

    assert path_problem(DpoRun, "dpo.beta") is None
    assert path_problem(RewardRun, "reward.center_coefficient") is None
    assert path_problem(DpoRun, "dpo.betta")[1] == "dpo.beta"
    spec = tmp_path / "dpo_sweep.yaml"
    data = {"train": [{"path": str(REPO / "configs/examples/data/preference_chat.jsonl"), "format": "preference"}]}
    for values, expected in (([0.05, 0.2], 0), ([0.05, 0.0], 2)):  # 0 is outside beta's bounds (gt 0)
        tune = {"num_samples": 2, "metric": "eval_loss", "mode": "min",
                "search_space": {"dpo.beta": {"choice": values}}}
        spec.write_text(yaml.safe_dump({"defaults": [str(REPO / "configs/examples/dpo.yaml")], "data": data,
                                        "tune": tune}))
        try:
            main(["validate", str(spec)])
            code = 0
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == expected and (expected == 0 or "dpo.beta" in err), err
