"""trainers.ds_config: the ZeRO shorthand, user JSON files with HF-style "auto" values,
and the errors; plus the shipped configs/deepspeed/*.json against DeepSpeed's own rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainers.ds_config import DeepSpeedConfigError, deepspeed_config
from trainers.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def make_spec(deepspeed=None, *, train=None, model=None, workers=2):
    t = {"micro_batch_size": 4, "global_batch_size": 16, "lr": 3e-4, **(train or {})}
    if deepspeed is not None:
        t["deepspeed"] = str(deepspeed) if isinstance(deepspeed, Path) else deepspeed
    return parse_spec({
        "name": "ds", "method": "sft",
        "model": {"path": "org/model", **(model or {})},
        "data": {"train": [{"path": "s3://b/train.jsonl"}]},
        "train": t,
        "resources": {"workers": workers},
    })


def auto_keys(node, prefix=""):
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in auto_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def problems(spec, **kw) -> dict[str, str]:
    with pytest.raises(DeepSpeedConfigError) as info:
        deepspeed_config(spec, **kw)
    return dict(info.value.problems)


def write_json(tmp_path: Path, obj, name="ds.json") -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# ---------------------------------------------------------------- shorthand

def test_shorthand_stage2_cpu_exact():
    cfg = deepspeed_config(make_spec({"stage": 2}), use_gpu=False)
    assert cfg == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,  # 16 / (4 x 2 workers)
        "train_batch_size": 16,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def test_shorthand_default_is_stage2():
    assert deepspeed_config(make_spec(), use_gpu=False)["zero_optimization"]["stage"] == 2


def test_shorthand_stage0_has_no_zero_options():
    cfg = deepspeed_config(make_spec({"stage": 0}), use_gpu=True)
    assert cfg["zero_optimization"] == {"stage": 0}


def test_shorthand_stage1_on_gpu_overlaps_comm_and_uses_bf16():
    cfg = deepspeed_config(make_spec({"stage": 1}), use_gpu=True)
    assert cfg["zero_optimization"] == {"stage": 1, "contiguous_gradients": True, "overlap_comm": True}
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["fp16"] == {"enabled": False}


def test_shorthand_stage3_gathers_16bit_weights_and_defers_hidden_size_keys():
    spec = make_spec({"stage": 3})
    zero = deepspeed_config(spec, use_gpu=False)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["reduce_bucket_size"] == "auto"  # resolved on the workers
    assert zero["stage3_prefetch_bucket_size"] == "auto"
    assert zero["stage3_param_persistence_threshold"] == "auto"

    cfg = deepspeed_config(spec, use_gpu=False, hidden_size=64, total_steps=10)
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == 3686  # int(0.9 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert auto_keys(cfg) == []


@pytest.mark.parametrize("use_gpu", [False, True])
def test_shorthand_offload_optimizer(use_gpu):
    zero = deepspeed_config(make_spec({"stage": 2, "offload_optimizer": True}), use_gpu=use_gpu)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": use_gpu}
    assert "offload_param" not in zero


def test_shorthand_offload_params_stage3():
    zero = deepspeed_config(make_spec({"stage": 3, "offload_optimizer": True, "offload_params": True}),
                            use_gpu=True)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_shorthand_offload_params_needs_stage3():
    with pytest.raises(ValidationError, match="offload_params needs stage: 3"):
        make_spec({"stage": 2, "offload_params": True})


def test_batch_sizes_follow_spec():
    cfg = deepspeed_config(make_spec(train={"micro_batch_size": 2, "global_batch_size": 32}, workers=4), use_gpu=False)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (2, 4, 32)
    cfg = deepspeed_config(make_spec(train={"micro_batch_size": 3, "global_batch_size": None}, workers=5), use_gpu=False)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (3, 1, 15)


def test_gradient_clipping_from_spec():
    assert deepspeed_config(make_spec(train={"grad_clip": 0.25}), use_gpu=False)["gradient_clipping"] == 0.25


@pytest.mark.parametrize("dtype, bf16, fp16", [("auto", True, False), ("bfloat16", True, False),
                                                ("float16", False, True), ("float32", False, False)])
def test_precision_on_gpu(dtype, bf16, fp16):
    cfg = deepspeed_config(make_spec(model={"dtype": dtype}), use_gpu=True)
    assert (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) == (bf16, fp16)


def test_half_precision_is_disabled_on_cpu_with_auto_dtype():
    cfg = deepspeed_config(make_spec({"stage": 3, "offload_optimizer": True}, model={"dtype": "auto"}), use_gpu=False)
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}


@pytest.mark.parametrize("dtype, key", [("bfloat16", "bf16.enabled"), ("float16", "fp16.enabled")])
def test_half_precision_dtype_on_cpu_is_an_error(dtype, key):
    found = problems(make_spec(model={"dtype": dtype}), use_gpu=False)
    assert list(found) == [key]
    assert f"model.dtype {dtype}" in found[key] and "CPU" in found[key]


# ---------------------------------------------------------------- user JSON

FULL_AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW",
                  "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                             "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": 5e8},
}
SPEC_TRAIN = {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 0.5, "warmup_ratio": 0.1}


def test_json_auto_values_resolved_from_spec(tmp_path):
    spec = make_spec(write_json(tmp_path, FULL_AUTO), train=SPEC_TRAIN)
    cfg = deepspeed_config(spec, use_gpu=True)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 2, 16)
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["optimizer"] == {"type": "AdamW",
                                "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 5e8  # explicit values are kept
    # Known only on the workers: left "auto" (and no error) until total_steps / hidden_size arrive.
    assert cfg["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-4,
                                          "warmup_num_steps": "auto", "total_num_steps": "auto"}
    assert cfg["zero_optimization"]["reduce_bucket_size"] == "auto"


def test_json_scheduler_steps_resolved_once_total_steps_given(tmp_path):
    spec = make_spec(write_json(tmp_path, FULL_AUTO), train=SPEC_TRAIN)
    cfg = deepspeed_config(spec, use_gpu=True, total_steps=250)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 25
    assert cfg["scheduler"]["params"]["total_num_steps"] == 250
    assert cfg["zero_optimization"]["reduce_bucket_size"] == "auto"


def test_json_hidden_size_keys_resolved_once_hidden_size_given(tmp_path):
    obj = json.loads(json.dumps(FULL_AUTO))
    obj["zero_optimization"] = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}
    spec = make_spec(write_json(tmp_path, obj), train=SPEC_TRAIN)
    cfg = deepspeed_config(spec, use_gpu=True, hidden_size=100)
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (10_000, 9_000, 1_000)
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # added for stage 3
    cfg = deepspeed_config(spec, use_gpu=True, hidden_size=100, total_steps=10)
    assert auto_keys(cfg) == []
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 1


def test_json_missing_batch_keys_are_filled_and_matching_explicit_ones_accepted(tmp_path):
    spec = make_spec(write_json(tmp_path, {"train_batch_size": 16, "zero_optimization": {"stage": 1}}))
    cfg = deepspeed_config(spec, use_gpu=False)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 2, 16)
    assert "gradient_clipping" not in cfg  # not a batch key: not added


@pytest.mark.parametrize("key, value", [("train_micro_batch_size_per_gpu", 3), ("gradient_accumulation_steps", 4),
                                        ("train_batch_size", 32)])
def test_json_batch_value_disagreeing_with_spec_is_an_error(tmp_path, key, value):
    path = write_json(tmp_path, {**FULL_AUTO, key: value})
    with pytest.raises(DeepSpeedConfigError) as info:
        deepspeed_config(make_spec(path), use_gpu=False)
    assert info.value.source == str(path)
    assert list(dict(info.value.problems)) == [key]
    assert key in str(info.value) and f"is {value}" in str(info.value)


def test_json_all_batch_disagreements_reported_at_once(tmp_path):
    path = write_json(tmp_path, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                 "train_batch_size": 2})
    assert set(problems(make_spec(path), use_gpu=False)) == {
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"}


@pytest.mark.parametrize("kw", [{}, {"total_steps": 10, "hidden_size": 8}], ids=["launcher", "worker"])
def test_json_auto_the_spec_cannot_fill_is_an_error(tmp_path, kw):
    obj = {**FULL_AUTO, "zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"},
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "amsgrad": "auto"}}}
    found = problems(make_spec(write_json(tmp_path, obj)), use_gpu=False, **kw)
    assert set(found) == {"zero_optimization.allgather_bucket_size", "optimizer.params.amsgrad"}
    assert all("auto" in msg for msg in found.values())


def test_json_offload_param_needs_stage3(tmp_path):
    obj = {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}
    assert list(problems(make_spec(write_json(tmp_path, obj)), use_gpu=False)) == ["zero_optimization.offload_param"]


def test_json_bfloat16_dtype_on_cpu_is_an_error(tmp_path):
    found = problems(make_spec(write_json(tmp_path, FULL_AUTO), model={"dtype": "bfloat16"}), use_gpu=False)
    assert "bf16.enabled" in found


def test_json_invalid(tmp_path):
    path = write_json(tmp_path, '{\n  "train_batch_size": 16,\n  oops\n}')
    with pytest.raises(DeepSpeedConfigError) as info:
        deepspeed_config(make_spec(path), use_gpu=False)
    assert info.value.source == str(path)
    [(where, msg)] = info.value.problems
    assert where == "line 3" and "invalid JSON" in msg


def test_json_not_an_object(tmp_path):
    path = write_json(tmp_path, "[1, 2]")
    assert "must be a JSON object" in problems(make_spec(path), use_gpu=False)["(file)"]


def test_json_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(DeepSpeedConfigError) as info:
        deepspeed_config(make_spec(path), use_gpu=False)
    assert info.value.source == str(path)
    assert "not found" in dict(info.value.problems)["(file)"]
    assert str(path) in str(info.value)


def test_json_file_is_not_modified(tmp_path):
    path = write_json(tmp_path, FULL_AUTO)
    before = path.read_text()
    deepspeed_config(make_spec(path), use_gpu=True, total_steps=5, hidden_size=8)
    assert path.read_text() == before


# ---------------------------------------------------------------- shipped configs + DeepSpeed's rules

@pytest.fixture(scope="module")
def ds_check():
    pytest.importorskip("deepspeed")
    from trainers import ds_check

    return ds_check


def quickstart(ds_path: Path):
    from launcher.config import load_spec

    return load_spec(REPO / "configs" / "examples" / "quickstart.yaml", [f"train.deepspeed={ds_path.resolve()}"])


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_resolves_for_quickstart(path, ds_check):
    spec = quickstart(path)
    assert spec.train.deepspeed == str(path.resolve())
    launcher_side = deepspeed_config(spec, use_gpu=False)  # what `launch` checks before provisioning
    assert (launcher_side["train_micro_batch_size_per_gpu"], launcher_side["gradient_accumulation_steps"],
            launcher_side["train_batch_size"]) == (4, 2, 16)
    assert ds_check.check(launcher_side) is None
    for use_gpu in (False, True):
        cfg = deepspeed_config(spec, use_gpu=use_gpu, total_steps=30, hidden_size=64)
        assert auto_keys(cfg) == []
        assert cfg["bf16"]["enabled"] is use_gpu
        assert ds_check.check(cfg) is None


def test_check_rejects_unknown_zero_key(ds_check):
    cfg = deepspeed_config(quickstart(REPO / "configs" / "deepspeed" / "zero2.json"), use_gpu=False,
                           total_steps=30, hidden_size=64)
    assert ds_check.check(cfg) is None
    cfg["zero_optimization"]["reduce_bucket_sise"] = 5
    problem = ds_check.check(cfg)
    assert problem is not None and "reduce_bucket_sise" in problem


def test_check_accepts_shorthand_configs(ds_check):
    for zero in ({"stage": 0}, {"stage": 2, "offload_optimizer": True},
                 {"stage": 3, "offload_optimizer": True, "offload_params": True}):
        cfg = deepspeed_config(make_spec(zero), use_gpu=False, total_steps=10, hidden_size=32)
        assert ds_check.check(cfg) is None, zero


# ---------------------------------------------------------------- optimizer / scheduler / precision blocks

@pytest.mark.parametrize("drop", [(), ("scheduler",), ("optimizer",), ("optimizer", "scheduler")],
                         ids=["both", "optimizer-only", "scheduler-only", "neither"])
def test_json_every_optimizer_scheduler_combination_resolves(tmp_path, drop):
    obj = {k: v for k, v in FULL_AUTO.items() if k not in drop}
    cfg = deepspeed_config(make_spec(write_json(tmp_path, obj), train=SPEC_TRAIN), use_gpu=True,
                           total_steps=100, hidden_size=8)
    assert auto_keys(cfg) == []
    assert ("optimizer" in cfg, "scheduler" in cfg) == ("optimizer" not in drop, "scheduler" not in drop)


@pytest.mark.parametrize("key, value, field", [
    ("optimizer.params.lr", 5e-5, "train.lr"),
    ("optimizer.params.betas", [0.9, 0.99], "train.betas"),
    ("optimizer.params.weight_decay", 0.01, "train.weight_decay"),
    ("gradient_clipping", 2.0, "train.grad_clip"),
    ("scheduler.params.warmup_max_lr", 1e-3, "train.lr"),
])
def test_json_explicit_value_disagreeing_with_spec_is_an_error(tmp_path, key, value, field):
    obj = json.loads(json.dumps(FULL_AUTO))
    *parents, last = key.split(".")
    node = obj
    for part in parents:
        node = node[part]
    node[last] = value
    found = problems(make_spec(write_json(tmp_path, obj), train=SPEC_TRAIN), use_gpu=True)
    assert list(found) == [key]
    assert field in found[key] and '"auto"' in found[key]


def test_json_explicit_values_equal_to_spec_are_accepted(tmp_path):
    obj = json.loads(json.dumps(FULL_AUTO))
    obj["optimizer"]["params"].update(lr=1e-4, betas=[0.9, 0.95], weight_decay=0.1)
    obj["gradient_clipping"] = 0.5
    cfg = deepspeed_config(make_spec(write_json(tmp_path, obj), train=SPEC_TRAIN), use_gpu=True)
    assert cfg["optimizer"]["params"]["lr"] == 1e-4


def test_json_fp16_enabled_on_cpu_is_refused_naming_fp16(tmp_path):
    found = problems(make_spec(write_json(tmp_path, {"fp16": {"enabled": True}})), use_gpu=False)
    assert list(found) == ["fp16.enabled"] and "CPU" in found["fp16.enabled"]


def test_json_precision_disagreeing_with_model_dtype_on_gpu(tmp_path):
    path = write_json(tmp_path, {"bf16": {"enabled": True}, "fp16": {"enabled": "auto"}})
    found = problems(make_spec(path, model={"dtype": "float16"}), use_gpu=True)
    assert list(found) == ["bf16.enabled"] and "float16" in found["bf16.enabled"]
    cfg = deepspeed_config(make_spec(path, model={"dtype": "bfloat16"}), use_gpu=True)
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
