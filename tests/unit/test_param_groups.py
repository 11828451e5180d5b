"""`train.param_groups`: which parameters go in which optimizer group at what learning rate
(the first matching pattern wins), that a group at scale 0 does not move under real AdamW
steps (weight decay included), that the scales survive a restore
(`apply_spec_hyperparameters` with the spec's real schedule, `engine.spec_schedule`), and
what the spec and the DeepSpeed config refuse. Plain torch: no DeepSpeed engine."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launcher.config import load_spec
from trainers.engine import apply_spec_hyperparameters, param_groups, spec_schedule
from trainers.spec import ParamGroupSpec

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs/examples/quickstart.yaml"
TRANSFER = REPO / "configs/examples/transfer.yaml"


def groups(*pairs) -> list[ParamGroupSpec]:
    return [ParamGroupSpec(pattern=p, lr_scale=s) for p, s in pairs]


class Tiny(torch.nn.Module):
    """Names like a decoder's: embed_tokens, layers.N.*, lm_head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(16, 4)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
        self.lm_head = torch.nn.Linear(4, 16, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.lm_head(h)


def names_by_group(model, built) -> list[tuple[str | None, float, float, list[str]]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [(g["pattern"], g["lr_scale"], g["lr"], [name_of[id(p)] for p in g["params"]]) for g in built]


# ---------------------------------------------------------------- grouping


def test_first_matching_pattern_wins_and_the_rest_train_at_lr():
    model = Tiny()
    built = param_groups(model.named_parameters(), groups((r"layers\.0\.", 0.0), (r"layers\.\d\.weight", 0.5),
                                                          ("weight", 2.0)), lr=1e-3)
    assert names_by_group(model, built) == [
        (None, 1.0, 1e-3, ["layers.1.bias", "layers.2.bias"]),  # the rest come first: the reported lr
        (r"layers\.0\.", 0.0, 0.0, ["layers.0.weight", "layers.0.bias"]),
        (r"layers\.\d\.weight", 0.5, 5e-4, ["layers.1.weight", "layers.2.weight"]),  # not again below
        ("weight", 2.0, 2e-3, ["embed_tokens.weight", "lm_head.weight"]),
    ]


def test_frozen_parameters_are_in_no_group_and_empty_groups_are_left_out():
    model = Tiny()
    model.embed_tokens.weight.requires_grad_(False)
    built = param_groups(model.named_parameters(), groups(("embed_tokens", 0.1), ("nothing-matches", 3.0),
                                                          (".", 1.0)), lr=0.1)
    assert [(g["pattern"], len(g["params"])) for g in built] == [(".", 7)]  # `.` matches every name
    assert all(p.requires_grad for g in built for p in g["params"])


def test_without_param_groups_one_group_holds_every_trainable_parameter():
    model = Tiny()
    [group] = param_groups(model.named_parameters(), [], lr=3e-3)
    assert group["params"] == list(model.parameters())
    assert (group["lr"], group["lr_scale"], group["pattern"]) == (3e-3, 1.0, None)


# ---------------------------------------------------------------- scale 0 does not move


def test_a_zero_scale_group_is_bitwise_unchanged_by_adamw_and_the_others_move():
    """Decoupled weight decay is p *= 1 - lr * wd, and the Adam update is scaled by lr: at
    lr 0 both leave the tensor as it was, to the bit. Weight decay is on to prove it."""
    model = Tiny()
    built = param_groups(model.named_parameters(), groups((r"layers\.1\.", 0.0), ("lm_head", 0.1)), lr=1e-2)
    opt = torch.optim.AdamW(built, lr=1e-2, weight_decay=0.1)
    sched = spec_schedule(opt, spec=load_spec(QUICKSTART), total_steps=20)  # warmup, then cosine
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 16, (4, 6))
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for name, param in model.named_parameters():
        frozen = name.startswith("layers.1.")
        assert param.grad is not None and param.grad.abs().sum() > 0, name  # it had gradients to follow
        same = torch.equal(param.view(torch.int32), before[name].view(torch.int32))  # bit for bit
        assert same == frozen, name
    assert [g["lr"] for g in opt.param_groups][1] == 0.0


# ---------------------------------------------------------------- a restore keeps the scales


def engine_at(spec, total_steps=10):
    model = Tiny()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), spec.train.param_groups, spec.train.lr),
                            lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    return SimpleNamespace(optimizer=opt, lr_scheduler=spec_schedule(opt, spec=spec, total_steps=total_steps),
                           model=model)


def step(engine, n=1):
    for _ in range(n):
        for p in engine.model.parameters():
            p.grad = torch.ones_like(p)
        engine.optimizer.step()
        engine.lr_scheduler.step()


def test_a_restore_keeps_each_groups_scale_at_the_specs_lr():
    """Saved at lr 1e-2, restored into a spec at 4e-3 (as a PBT trial is): every group runs at
    the new lr times its own scale, now and for the rest of the schedule."""
    over = ["train.param_groups=[{pattern: 'layers\\.0\\.', lr_scale: 0.0}, {pattern: lm_head, lr_scale: 0.25}]",
            "train.lr_schedule=linear", "train.warmup_ratio=0.2"]
    saved_spec = load_spec(QUICKSTART, [*over, "train.lr=1e-2"])
    saved = engine_at(saved_spec)
    step(saved, 4)
    spec = load_spec(QUICKSTART, [*over, "train.lr=4e-3"])
    restored = engine_at(spec)
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())
    restored.lr_scheduler.load_state_dict(saved.lr_scheduler.state_dict())
    assert [g["lr"] for g in restored.optimizer.param_groups] == pytest.approx([1e-2 * 0.75, 0.0, 2.5e-3 * 0.75])

    apply_spec_hyperparameters(restored, spec)
    groups_ = restored.optimizer.param_groups
    assert [g["lr_scale"] for g in groups_] == [1.0, 0.0, 0.25]
    assert restored.lr_scheduler.base_lrs == pytest.approx([4e-3, 0.0, 1e-3])
    assert [g["lr"] for g in groups_] == pytest.approx([4e-3 * 0.75, 0.0, 1e-3 * 0.75])  # step 4 of 10, linear
    step(restored)
    assert [g["lr"] for g in groups_] == pytest.approx([4e-3 * 5 / 8, 0.0, 1e-3 * 5 / 8])
    assert restored.lr_scheduler.get_last_lr() == [g["lr"] for g in groups_]


def test_the_specs_scale_wins_over_the_checkpoints():
    base = ["train.lr=1e-2", "train.lr_schedule=constant", "train.warmup_ratio=0"]
    saved = engine_at(load_spec(QUICKSTART, [*base, "train.param_groups=[{pattern: lm_head, lr_scale: 0.5}]"]))
    step(saved, 2)
    spec = load_spec(QUICKSTART, [*base, "train.param_groups=[{pattern: lm_head, lr_scale: 0.1}]"])
    restored = engine_at(spec)
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())
    restored.lr_scheduler.load_state_dict(saved.lr_scheduler.state_dict())
    assert restored.optimizer.param_groups[1]["lr_scale"] == 0.5  # the checkpoint's
    apply_spec_hyperparameters(restored, spec)
    assert [g["lr"] for g in restored.optimizer.param_groups] == pytest.approx([1e-2, 1e-3])


def test_a_checkpoint_from_before_param_groups_restores_at_scale_1():
    spec = load_spec(QUICKSTART, ["train.lr=2e-3"])
    model = Tiny()
    old = torch.optim.AdamW(model.parameters(), lr=1e-2)  # no lr_scale/pattern keys in its groups
    engine = SimpleNamespace(optimizer=old, lr_scheduler=spec_schedule(old, spec=spec, total_steps=10))
    apply_spec_hyperparameters(engine, spec)
    assert engine.lr_scheduler.base_lrs == [2e-3] and old.param_groups[0]["lr_scale"] == 1.0


# ---------------------------------------------------------------- what is refused


def test_the_spec_refuses_bad_patterns_and_negative_scales(tmp_path, capsys):
    from launcher.cli import main

    def validate(groups_yaml: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as info:
            main(["validate", str(QUICKSTART), f"train.param_groups={groups_yaml}"])
        return info.value.code, capsys.readouterr().err

    code, err = validate("[{pattern: '(', lr_scale: 1}]")
    assert code == 2 and "train.param_groups[0].pattern" in err and "not a valid regular expression" in err
    code, err = validate("[{pattern: x, lr_scale: -1}]")
    assert code == 2 and "train.param_groups[0].lr_scale" in err
    code, err = validate("[{pattern: x}]")
    assert code == 2 and "lr_scale" in err


def test_a_deepspeed_scheduler_block_is_refused_with_param_groups(tmp_path):
    from trainers.ds_config import DeepSpeedConfigError, deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR", '
                  '"params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto"}}}')
    plain = load_spec(QUICKSTART, [f"train.deepspeed={ds}"])
    assert deepspeed_config(plain, use_gpu=False)["scheduler"]["params"]["warmup_max_lr"] == plain.train.lr
    grouped = load_spec(QUICKSTART, [f"train.deepspeed={ds}", "train.param_groups=[{pattern: lm_head, lr_scale: 0.1}]"])
    with pytest.raises(DeepSpeedConfigError) as info:
        deepspeed_config(grouped, use_gpu=False)
    assert info.value.problems[0][0] == "scheduler" and "param_groups" in info.value.problems[0][1]


def test_eval_at_start_needs_eval_data():
    from launcher.errors import SpecError

    assert load_spec(TRANSFER).train.eval_at_start
    with pytest.raises(SpecError, match="train.eval_at_start needs eval data"):
        load_spec(TRANSFER, ["data.eval_fraction=0"])
