"""QLoRA vs LoRA on one GPU: memory and step time of the same model, LoRA on a bf16 base
against LoRA on the 4-bit (NF4, double-quantized) base, both built by
`trainers.models.load_model` as a worker builds them.

The model is a random Llama of `--hidden/--layers/--heads/--intermediate` (default about
1.2B parameters) made with `tests/fixtures/tiny_models.build_tiny_llama` and the shipped
tokenizer: nothing is downloaded. Each variant runs in its own process (a clean CUDA
allocator): load, `--warmup` then `--steps` AdamW steps on random tokens (micro-batch
`--batch` x `--seq-len`), reporting the weights' memory after load, the peak memory and
the median step time. A benchmark, not a test. Usage:

    python bench/qlora_gpu.py                         # on a GPU machine
    python bench/qlora_gpu.py --smoke                 # CPU, a tiny model, float32 (checks it runs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(out: str, args) -> None:
    from transformers import AutoTokenizer

    from tests.fixtures.tiny_models import build_tiny_llama

    tok = AutoTokenizer.from_pretrained(REPO / "configs/examples/tiny-llama")
    build_tiny_llama(out, tok, hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                     kv_heads=max(1, args.heads // 4), intermediate_size=args.intermediate)


def variant(model_dir: str, quantize: bool, args) -> dict:
    import torch

    from trainers import models
    from trainers.spec import parse_spec

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    device = torch.device("cuda" if cuda else "cpu")
    spec = parse_spec({"name": "bench", "method": "sft", "data": {"train": [{"path": "x.jsonl"}]},
                       "model": {"path": model_dir, "peft": {"r": 16, "alpha": 32, "dropout": 0.0,
                                                             "quantize": "4bit" if quantize else None}}})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = models.load_model(spec, model_dir, dtype, {}).to(device)
    if cuda:  # what DeepSpeed's bf16 does at initialize: float params (peft upcast some) to bf16
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
    load_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    weights = torch.cuda.memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(10, 500, (args.batch, args.seq_len), device=device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    trainable, total = models.parameter_counts(model)
    return {"variant": "qlora-4bit" if quantize else "lora-bf16" if cuda else "lora-fp32",
            "params": total, "trainable": trainable, "load_s": round(load_s, 2),
            "weights_gib": None if weights is None else round(weights / 2**30, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "step_ms": round(1000 * statistics.median(times), 1), "loss_first_last": [losses[0], losses[-1]],
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps (CPU check)")
    p.add_argument("--variant", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.heads, args.intermediate = 128, 2, 4, 256
        args.batch, args.seq_len, args.warmup, args.steps = 2, 64, 1, 3
    if args.variant:  # a child: one variant, one JSON line
        print("BENCH " + json.dumps(variant(args.model_dir, args.variant == "qlora", args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        build(tmp, args)
        rows = []
        for name in ("lora", "qlora"):
            cmd = [sys.executable, __file__, "--variant", name, "--model-dir", tmp] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
            if proc.returncode or not line:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[0][6:]))
    for r in rows:
        print(json.dumps(r))
    lora, qlora = rows
    if lora["peak_gib"]:
        print(f"qlora/lora: weights {qlora['weights_gib'] / lora['weights_gib']:.3f}, "
              f"peak memory {qlora['peak_gib'] / lora['peak_gib']:.3f}, step time {qlora['step_ms'] / lora['step_ms']:.3f}")
    else:
        print(f"qlora/lora step time {qlora['step_ms'] / lora['step_ms']:.3f} (CPU: no memory figures)")


if __name__ == "__main__":
    main()
