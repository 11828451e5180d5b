"""ESFT against full fine-tuning and LoRA on one tiny MoE and one synthetic task, side by
side in one run: the shape of the ESFT paper's comparison (Wang et al. 2024, table 2) at
toy scale.

The tiny Qwen3-MoE (tests/fixtures/tiny_moe.py) is first trained on all seven synthetic
tasks (tests/fixtures/tiny_models.py) so that it has a "general ability" to lose; each
method then fine-tunes a copy of that base on one task (reversing a word) for the same
steps with the same optimizer (AdamW, weight decay 0.1). Reported per method: trainable
parameters, the training state they need (trainable weights, gradients and AdamW's two
moments in float32, counted from the tensors that exist), the task's held-out eval loss,
and the held-out loss on the other six tasks (forgetting: its rise over the base).

    python bench/esft_vs_lora.py [--steps 150] [--base-steps 300]

Plain PyTorch in one process on CPU: the method's math and what it trains is what is
compared here, not the Ray/DeepSpeed path (tests/integration/test_esft_train.py runs that).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.fixtures.tiny_models import _task  # noqa: E402
from tests.fixtures.tiny_moe import build_tiny_moe  # noqa: E402
from trainers import esft_params, moe  # noqa: E402

TASK = 1  # reverse a word
SEQ = 48


def encode(tokenizer, rows, device="cpu"):
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}{tokenizer.eos_token}" for r in rows]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def rows_of(kinds, n, seed):
    rng = random.Random(seed)
    return [_task(rng, rng.choice(kinds)) for _ in range(n)]


def batches(data, batch, seed):
    g = torch.Generator().manual_seed(seed)
    n = data["input_ids"].shape[0]
    while True:
        for idx in torch.randperm(n, generator=g).split(batch):
            if len(idx) == batch:
                yield {k: v[idx] for k, v in data.items()}


@torch.no_grad()
def eval_loss(model, data):
    model.eval()
    out = model(**data).loss.item()
    model.train()
    return out


def train(model, data, steps, lr, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    it = batches(data, 16, seed)
    model.train()
    for _ in range(steps):
        loss = model(**next(it)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    state = sum(p.numel() * p.element_size() for p in params)  # weights
    state += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
                 and t.dim() > 0)
    return sum(p.numel() for p in params), state


def esft_model(base, task, score: str, top_p: float):
    model = copy.deepcopy(base)
    stats = moe.RoutingStats(model)
    with torch.no_grad():
        for i in range(0, task["input_ids"].shape[0], 16):
            b = {k: v[i:i + 16] for k, v in task.items()}
            stats.set_batch(moe.sample_ids(b["input_ids"], b["attention_mask"]))
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    stats.remove()
    selection = moe.select_experts(stats.scores()[score], top_p)
    esft_params.make_selected_trainable(model, selection)
    return model, selection


def lora_model(base, r=8):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per method")
    ap.add_argument("--base-steps", type=int, default=300, help="general training of the base first")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_moe(tmp, "qwen3_moe")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        base = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    general = [k for k in range(7) if k != TASK]
    mixed = encode(tokenizer, rows_of(list(range(7)), 2048, 1))
    task_train, task_eval = encode(tokenizer, rows_of([TASK], 512, 2)), encode(tokenizer, rows_of([TASK], 128, 3))
    general_eval = encode(tokenizer, rows_of(general, 256, 4))
    train(base, mixed, args.base_steps, args.lr)
    for p in base.parameters():
        p.requires_grad_(True)
    before = (eval_loss(base, task_eval), eval_loss(base, general_eval))
    total = sum(p.numel() for p in base.parameters())
    print(f"tiny qwen3_moe: {total:,} parameters, 2 MoE layers x 8 experts (top-2); base trained {args.base_steps} "
          f"steps on all 7 tasks; fine-tuning on task {TASK} (reverse a word): {args.steps} steps, batch 16 x {SEQ} "
          f"tokens, AdamW lr {args.lr:g} wd 0.1")
    print(f"base: task eval loss {before[0]:.4f}, general eval loss {before[1]:.4f}\n")
    print(f"{'method':<12}{'trainable':>11}{'share':>8}{'train state':>13}{'task loss':>11}{'general loss':>14}"
          f"{'forgetting':>12}  experts/layer")
    variants = [("full", lambda: (copy.deepcopy(base), None)), ("lora r=8", lambda: (lora_model(base), None)),
                ("esft-token", lambda: esft_model(base, task_train, "token", 0.2)),
                ("esft-gate", lambda: esft_model(base, task_train, "gate", 0.1))]
    for name, make in variants:
        model, selection = make()
        trainable, state = train(model, task_train, args.steps, args.lr, seed=7)
        task_loss, general_loss = eval_loss(model, task_eval), eval_loss(model, general_eval)
        print(f"{name:<12}{trainable:>11,}{trainable / total:>8.1%}{state / 2**20:>10.2f} MiB{task_loss:>11.4f}"
              f"{general_loss:>14.4f}{general_loss - before[1]:>+12.4f}  "
              f"{[len(x) for x in selection] if selection else '-'}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
