"""The preference family end to end (real Ray, DeepSpeed ZeRO-2, 2 CPU workers) on
synthetic comparisons with a learnable rule (the preferred answer says its sources were
checked): a reward model, a K=4 ranking, and DPO with LoRA."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from tests.conftest import REPO, output
from tests.integration.test_training import assert_ok, download, run_dir, train_metrics
from trainers import storage

pytestmark = pytest.mark.integration
BASE_MODEL = REPO / "configs/examples/tiny-llama"


def metrics(run: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]


def held_out_pairs(n: int = 32) -> list[tuple[str, str, str]]:
    """New prompts (words the training data never paired) with the rule's two answers."""
    rng = random.Random(99)
    words = ["mango", "forest", "window", "candle", "silver", "garden"]
    pairs = []
    for _ in range(n):
        a, b = rng.sample(words, 2)
        prompt = f"Write a short note about the {a} and the {b}."
        base = f"The {a} is near the {b}."
        pairs.append((prompt, base + " Sources checked.", base + " " + rng.choice(["Maybe.", "Not sure."])))
    return pairs


def test_reward_model_learns_the_rule_and_exports_a_sequence_classifier(launch, tmp_path):
    proc = launch("configs/examples/reward.yaml", f"checkpoint.storage={tmp_path / 'runs'}")
    assert_ok(proc)
    run = run_dir(proc)
    evals = [m for m in metrics(run) if "eval_accuracy" in m]
    assert evals[-1]["eval_accuracy"] >= 0.9, evals
    assert evals[-1]["eval_margin"] > 0
    assert re.search(r"step 40: eval loss [\d.]+  accuracy [\d.]+  margin", output(proc))

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = download(storage.join(run, "model"), tmp_path / "model")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    right = 0
    with torch.no_grad():
        for prompt, chosen, rejected in held_out_pairs():
            scores = [model(**tok(prompt + " " + answer, return_tensors="pt")).logits[0, 0] for answer in (chosen, rejected)]
            right += int(scores[0] > scores[1])
    assert right / len(held_out_pairs()) >= 0.9, right

    # The exported model is the reward model of a PPO run: a reward group of its own scores
    # the responses, and the critic starts from it.
    ppo = launch("configs/examples/ppo.yaml", f"checkpoint.storage={tmp_path / 'runs'}", "ppo.reward_fn=null",
                 f"ppo.reward_model={run}", "train.max_steps=2", "train.eval_at_start=false")
    assert_ok(ppo)
    assert "reward: 2 workers" in output(ppo) and re.search(r"reward: .*, 0 trainable", output(ppo))
    sample = next(m for m in metrics(run_dir(ppo)) if "eval_sample" in m)["eval_sample"]
    with torch.no_grad():  # the logged reward is this model's score of the logged sample
        score = model(input_ids=torch.tensor([sample["prompt_ids"] + sample["response_ids"]])).logits[0, 0]
    assert float(score) == pytest.approx(sample["reward"], abs=1e-4), (float(score), sample)


def test_ranking_encodes_each_response_once_per_step(launch, tmp_path):
    proc = launch("configs/examples/ranking.yaml", f"checkpoint.storage={tmp_path / 'runs'}")
    assert_ok(proc)
    run = run_dir(proc)
    last = train_metrics(run)[-1]
    prompts = last["step"] * 8  # global_batch_size prompts per step
    # 4 responses per prompt, each encoded once; all 6 of its ordered pairs trained.
    assert last["sequences"] == 4 * prompts and last["pairs"] == 6 * prompts, last
    evals = [m for m in metrics(run) if "eval_accuracy" in m]
    assert evals[-1]["eval_accuracy"] >= 0.9 and evals[-1]["eval_kendall_tau"] > 0.5, evals


def _preference_logratio(model_dir, tok, pairs) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected) of the answer tokens after the prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = 0.0
    with torch.no_grad():
        for prompt, chosen, rejected in pairs:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            p = tok(text, add_special_tokens=False)["input_ids"]
            logps = []
            for answer in (chosen, rejected):
                ids = torch.tensor([p + tok(answer, add_special_tokens=False)["input_ids"]])
                logits = model(ids).logits[0, :-1].log_softmax(-1)
                targets = ids[0, 1:]
                logps.append(logits[len(p) - 1:].gather(-1, targets[len(p) - 1:, None]).sum())
            total += float(logps[0] - logps[1])
    return total / len(pairs)


def test_dpo_with_lora_raises_the_margin_without_a_second_copy(launch, tmp_path):
    proc = launch("configs/examples/dpo.yaml", f"checkpoint.storage={tmp_path / 'runs'}")
    assert_ok(proc)
    log = output(proc)
    held = re.search(r"reference: the policy with its adapters disabled \(no second copy\); ([\d,]+) parameters", log)
    total = re.search(r"model: ([\d,]+) parameters", log)
    assert held and total and held.group(1) == total.group(1), log[-3000:]  # the policy's own, nothing more
    run = run_dir(proc)
    evals = [m for m in metrics(run) if "eval_rewards/margins" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] + 0.1, evals
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9, evals

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE_MODEL)
    pairs = held_out_pairs(12)
    before = _preference_logratio(BASE_MODEL, tok, pairs)
    after = _preference_logratio(download(storage.join(run, "model"), tmp_path / "model"), tok, pairs)
    assert after > before + 1.0, (before, after)


def test_full_dpo_frozen_copy_and_precomputed_reference_train_the_same(launch, tmp_path):
    """Full fine-tuning DPO two ways: a frozen copy of the starting model as reference, and the
    reference's log-probs precomputed once with Ray Data. The same data, seed and steps must
    give the same losses and rewards (two independent reference paths agree), and the
    precomputed run holds no second copy."""
    common = ("model.peft=null", "train.max_steps=4", "train.eval_every=2", "checkpoint.every_n_steps=4",
              "train.lr=1e-4")
    runs = {}
    for how in ("false", "true"):
        proc = launch("configs/examples/dpo.yaml", *common, f"dpo.precompute_reference={how}",
                      f"checkpoint.storage={tmp_path / how}")
        assert_ok(proc)
        runs[how] = (output(proc), metrics(run_dir(proc)))
    copy_log, pre_log = runs["false"][0], runs["true"][0]
    total = int(re.search(r"model: ([\d,]+) parameters", copy_log).group(1).replace(",", ""))
    held_copy = int(re.search(r"reference: a frozen copy of the starting model; ([\d,]+) parameters", copy_log)
                    .group(1).replace(",", ""))
    held_pre = int(re.search(r"reference: log-probs precomputed over the data \(no second copy\); ([\d,]+) "
                             r"parameters", pre_log).group(1).replace(",", ""))
    assert held_copy == 2 * total and held_pre == total, (held_copy, held_pre, total)
    assert re.search(r"reference: log-probs of the starting model precomputed over \d+ train and \d+ eval", pre_log)
    keys = ("loss", "rewards/chosen", "rewards/margins", "eval_loss", "eval_rewards/margins")
    a, b = runs["false"][1], runs["true"][1]
    assert [m["step"] for m in a] == [m["step"] for m in b]
    compared = 0
    for x, y in zip(a, b):
        for k in keys:
            if k in x:
                assert y[k] == pytest.approx(x[k], abs=2e-4), (k, x, y)
                compared += 1
    assert compared >= 8, a
    assert any(m.get("eval_rewards/margins", 0) != 0 for m in a if m["step"] > 0)  # the policy moved
