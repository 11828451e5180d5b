"""`method: ppo` without Ray: the spec's rules, the roles and their seats, prompt data, the
order prompts are drawn in, the launcher's checks of the reward, and the progress lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from launcher import preflight
from launcher.errors import SpecError
from launcher.output import describe
from tests.conftest import REPO
from trainers import rl_placement
from trainers.spec import parse_spec

EXAMPLES = REPO / "configs/examples"


def spec(**ppo):
    base = {"name": "rl", "method": "ppo", "model": {"path": str(EXAMPLES / "tiny-llama")},
            "data": {"train": [{"path": str(EXAMPLES / "data/prompts.jsonl"), "format": "prompt"}]},
            "train": {"max_steps": 4}, "resources": {"workers": 2},
            "ppo": {"reward_fn": "rewards:letter_e", **ppo}}
    return base


def errors(data) -> str:
    with pytest.raises(ValidationError) as e:
        parse_spec(data)
    return str(e.value)


def test_the_spec_names_what_is_wrong():
    assert "set exactly one of ppo.reward_model" in errors(spec(reward_model="runs/rm"))
    assert "use module:function" in errors(spec(reward_fn="rewards.letter_e"))
    assert "samples_per_prompt: grpo compares" in errors(spec(advantage="grpo", samples_per_prompt=1))
    assert "must be a multiple of resources.workers" in errors(spec(prompts_per_iteration=3))
    assert "ppo.mini_batches (3) must divide" in errors(spec(mini_batches=3))  # 4 prompts x 4 samples
    data = spec()
    data["train"] = {}
    assert "ppo counts iterations: set train.max_steps" in errors(data)
    data = spec()
    data["data"]["train"][0]["format"] = "messages"
    assert "data.train[0].format is 'messages'; use prompt" in errors(data)
    assert parse_spec(spec()).ppo.advantage == "gae"


def test_roles_follow_the_advantage_the_reward_and_lora():
    assert rl_placement.roles(parse_spec(spec())) == ["actor", "critic", "reference"]
    assert rl_placement.roles(parse_spec(spec(advantage="grpo"))) == ["actor", "reference"]
    assert rl_placement.roles(parse_spec(spec(advantage="rloo", kl_coef=0))) == ["actor"]
    with_model = spec(reward_model="runs/rm")
    del with_model["ppo"]["reward_fn"]
    assert rl_placement.roles(parse_spec(with_model)) == ["actor", "critic", "reference", "reward"]
    lora = spec()
    lora["model"]["peft"] = {"r": 4}
    assert rl_placement.roles(parse_spec(lora)) == ["actor", "critic"]  # the reference: adapters off


def test_colocated_roles_share_bundles_spread_ones_do_not():
    s = parse_spec(spec())
    assert rl_placement.bundles(s, 1) == [{"CPU": 1.0, "GPU": 1.0}] * 2
    seats = rl_placement.seats(s, 1)
    assert [(x.role, x.rank, x.bundle) for x in seats] == [
        ("actor", 0, 0), ("actor", 1, 1), ("critic", 0, 0), ("critic", 1, 1), ("reference", 0, 0), ("reference", 1, 1)]
    assert {(x.cpus, x.gpus) for x in seats} == {(1 / 3, 1 / 3)}
    spread = parse_spec(spec(placement="spread"))
    assert len(rl_placement.bundles(spread, 0)) == 6 and rl_placement.needs(spread, 0) == {"CPU": 6.0}
    assert [x.bundle for x in rl_placement.seats(spread, 0)] == list(range(6))
    assert {(x.cpus, x.gpus) for x in rl_placement.seats(spread, 0)} == {(1.0, 0.0)}


def test_prompts_are_drawn_in_a_seeded_permutation_per_pass():
    from trainers.ppo import prompt_order

    first_pass = prompt_order(10, 0, 5, seed=3) + prompt_order(10, 1, 5, seed=3)
    assert sorted(first_pass) == list(range(10))  # every prompt once per pass
    assert prompt_order(10, 1, 5, seed=3) == prompt_order(10, 1, 5, seed=3)  # the position is the iteration
    assert sorted(prompt_order(10, 2, 5, seed=3) + prompt_order(10, 3, 5, seed=3)) == list(range(10))
    assert prompt_order(10, 2, 5, seed=3) + prompt_order(10, 3, 5, seed=3) != first_pass


def test_prompt_rows_are_checked_and_tokenized_as_the_policy_continues_them():
    from trainers import data, data_check, models
    from trainers.spec import DatasetSpec

    ds = DatasetSpec(path="p.jsonl", format="prompt")
    assert data_check.row_problem({"prompt": "  "}, ds) == "field `prompt` is an empty prompt"
    assert "ends with an assistant turn" in data_check.row_problem(
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, ds)
    assert "must be a string or a list of chat turns" in data_check.row_problem({"prompt": 3}, ds)
    tok = models.load_tokenizer(str(EXAMPLES / "tiny-llama"))
    assert data.tokenize_prompt({"prompt": "Say hi."}, ds, tok) == [tok.bos_token_id] + tok.encode(
        "Say hi.", add_special_tokens=False)
    chat = data.tokenize_prompt({"prompt": [{"role": "user", "content": "Say hi."}]}, ds, tok)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                       add_generation_prompt=True)
    assert chat == tok(rendered, add_special_tokens=False)["input_ids"]


def test_launcher_checks_the_reward_function_before_anything_starts(tmp_path):
    (tmp_path / "rules.py").write_text("def score(prompts):\n    return [0.0] * len(prompts)\n")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    for ref, message in [("rules:score", "must take two arguments"), ("broken:score", "importing `broken`"),
                         ("absent:score", "no module `absent`")]:
        s = parse_spec(spec(reward_fn=ref))
        with pytest.raises(SpecError) as e:
            preflight.check_spec(s, str(tmp_path / "run.yaml"))
        assert "ppo.reward_fn" in str(e.value) and message in str(e.value), str(e.value)
    s = parse_spec(spec(reward_model=str(tmp_path / "no-run"), reward_fn=None))
    with pytest.raises(SpecError, match="ppo.reward_model"):
        preflight.check_spec(s, str(tmp_path / "run.yaml"))


def test_a_reward_module_file_travels_as_a_package_of_its_name():
    s = parse_spec(spec())
    [shipped] = preflight.user_modules(s, str(EXAMPLES / "grpo.yaml"))
    out = subprocess.run([sys.executable, "-c", "import rewards, sys; print(rewards.letter_e([''], ['eek'])[0])"],
                         cwd=str(__import__("pathlib").Path(shipped).parent), capture_output=True, text=True)
    assert out.returncode == 0 and float(out.stdout) == pytest.approx(2 / 3), out.stderr


def test_cli_validate_exits_2_naming_the_reward_function(tmp_path):
    text = (EXAMPLES / "grpo.yaml").read_text().replace("rewards:letter_e", "rewards:no_such_function")
    (tmp_path / "grpo.yaml").write_text(text.replace("tiny-llama", str(EXAMPLES / "tiny-llama"))
                                        .replace("data/", str(EXAMPLES / "data") + "/"))
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(tmp_path / "grpo.yaml")],
                          cwd=REPO, capture_output=True, text=True)
    # rewards.py is not beside this copy of the spec, so the module is not found either
    assert proc.returncode == 2 and "ppo.reward_fn" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_progress_lines_show_the_reward_and_the_kl():
    line = {"step": 3, "total_steps": 12, "loss": -0.04, "lr": 0.01, "tokens_per_s": 1500.0, "reward_mean": 0.25,
            "reward_std": 0.06, "kl": 1.5}
    assert describe(line) == "step 3/12  loss -0.0400  reward 0.2500 (std 0.060)  kl 1.5000  lr 1.00e-02  1,500 tok/s"
    ev = {"step": 6, "eval_reward": 0.31, "eval_reward_std": 0.05, "eval_sample": {"reward": 0.3}}
    assert describe(ev) == "step 6: eval  reward 0.31  reward_std 0.05"
    assert json.dumps(ev)


@pytest.mark.parametrize("example", ["grpo.yaml", "ppo.yaml"])
def test_examples_render_for_prod_with_remote_paths(example):
    import yaml

    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "render", f"configs/examples/{example}", "--cluster",
                           "prod", "model.path=s3://models/tiny-llama", "data.train.0.path=s3://data/prompts.jsonl",
                           "data.eval.0.path=s3://data/heldout.jsonl", "checkpoint.storage=s3://runs"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [d["kind"] for d in yaml.safe_load_all(proc.stdout)] == ["RayCluster"]
    local = subprocess.run([sys.executable, "-m", "launcher.cli", "render", f"configs/examples/{example}", "--cluster",
                            "prod"], cwd=REPO, capture_output=True, text=True)
    assert local.returncode == 2 and "model.path: a remote cluster cannot read this machine's files" in local.stderr


def test_a_search_over_ppo_knobs_is_valid_and_sized_by_the_roles_bundles():
    from trainers.tune import capacity_concurrency
    from trainers.tune_spec import search_space_problems

    data = spec(placement="spread")
    data["data"]["eval"] = [{"path": str(EXAMPLES / "data/prompts_heldout.jsonl"), "format": "prompt"}]
    data["tune"] = {"metric": "eval_reward", "mode": "max", "num_samples": 2,
                    "search_space": {"ppo.kl_coef": {"grid": [0.01, 0.1]}, "ppo.clip": {"uniform": [0.1, 0.3]}}}
    s = parse_spec(data)
    assert search_space_problems(s.model_dump(mode="json"), type(s)) == []
    # spread: 3 roles x 2 workers x 1 CPU, plus the trial's driver (half a CPU)
    assert capacity_concurrency(s, {"CPU": 13.0}) == 2 and capacity_concurrency(s, {"CPU": 12.9}) == 1
    data["tune"]["search_space"] = {"ppo.kl_coeff": {"grid": [0.01, 0.1]}}
    problems = search_space_problems(data | {"tune": data["tune"]}, type(s))
    assert problems and "ppo.kl_coef" in str(problems), problems


def test_a_reward_function_that_returns_the_wrong_count_is_the_users_error():
    import torch

    from trainers import generation, models, ppo
    from trainers.user_errors import JobUserError

    tok = models.load_tokenizer(str(EXAMPLES / "tiny-llama"))
    ids, mask = generation.left_pad([[0, 40, 41], [0, 42]], tok.pad_token_id)
    responses = torch.tensor([[43, 44], [45, tok.eos_token_id]])
    r_mask = generation.response_mask(responses, tok.eos_token_id)
    ro = generation.Rollout(torch.cat([ids, responses], 1), torch.cat([mask, r_mask], 1), r_mask,
                            torch.tensor([0, 1]), ids.shape[1])
    no_kl = parse_spec(spec(advantage="rloo", kl_coef=0))
    rollouts = {"refs": [None], "local": [ro], "old_logp": [torch.zeros(2, 2)]}
    scored = ppo.score(no_kl, ppo.Groups({}, None), rollouts, lambda p, r: [len(x) for x in r], tok)
    assert scored[0]["scores"].tolist() == [float(len(x)) for x in ppo.decode(tok, ro)[1]]
    with pytest.raises(JobUserError, match="ppo.reward_fn: returned 1 scores for 2 responses"):
        ppo.score(no_kl, ppo.Groups({}, None), rollouts, lambda p, r: [0.0], tok)
