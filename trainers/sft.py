"""Supervised fine-tuning: full-parameter or LoRA, causal LM loss on the label tokens
(assistant turns / responses for instruction data, every token for raw text).

`train_loop_per_worker` runs on every Ray Train worker; read it top to bottom.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from trainers import checkpoint, data, models, secrets_env
from trainers.ds_config import deepspeed_config, precision
from trainers.engine import apply_spec_hyperparameters, build_engine, init_distributed, quiet_workers
from trainers.eval import evaluate
from trainers.spec import parse_spec

PROGRESS = "LLMLAUNCH_PROGRESS "  # prefix of the JSON lines the CLI turns into a progress bar


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    secrets_env.load()
    quiet_workers()
    spec = parse_spec(config["spec"])
    run, total_steps, steps_per_epoch = config["run_uri"], config["total_steps"], config["steps_per_epoch"]
    rank = ray.train.get_context().get_world_rank()
    use_gpu = torch.cuda.is_available()
    lora = spec.model.peft is not None
    torch.manual_seed(spec.train.seed + rank)
    trial = {"trial": config["trial"]} if config.get("trial") else {}  # a trial of a search: tag its lines

    # ---- model, tokenizer, engine
    model_dir = models.local_model_dir(spec.model.path)
    tokenizer = models.load_tokenizer(model_dir, spec.model.trust_remote_code, spec.data.chat_template)
    dtype = precision(spec, use_gpu)
    hidden = _hidden_size(model_dir, spec.model.trust_remote_code)
    ds_config = deepspeed_config(spec, use_gpu=use_gpu, total_steps=total_steps, hidden_size=hidden)
    init_distributed()
    model = models.load_model(spec, model_dir, dtype, ds_config)
    engine = build_engine(model, spec, ds_config, total_steps)
    trainable, total = models.parameter_counts(engine.module)
    state = checkpoint.restore(engine, config.get("resume_from"), lora)
    if state is None:
        state = checkpoint.TrainState(0, 0, 0, [])
    else:
        apply_spec_hyperparameters(engine, spec)  # a PBT trial goes on from its donor with its own values
    if rank == 0:
        print(f"model: {total:,} parameters, {trainable:,} trainable; ZeRO stage "
              f"{ds_config['zero_optimization']['stage']}; {dtype}; starting at step {state.step}/{total_steps}",
              flush=True)

    # ---- train
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if config["has_eval"] else None
    engine.train()
    window_start, window_tokens = time.perf_counter(), 0
    attention = data.attn_implementation(engine.module)
    for step, micro in data.micro_batches(train_shard, micro_batch_size=spec.train.micro_batch_size,
                                          grad_accum=spec.grad_accum_steps, start_step=state.step,
                                          total_steps=total_steps, steps_per_epoch=steps_per_epoch):
        # Kept on the device and counted before the copy: no GPU sync per micro-batch.
        loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
        for batch in micro:
            window_tokens += int(batch["attention_mask"].sum())
            loss = engine(**data.model_inputs(batch, engine.device, attention)).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            loss_sum += loss.detach().float()
        state.step = step + 1
        state.epoch = step // steps_per_epoch
        done = state.step == total_steps

        if state.step % spec.train.log_every == 0 or done:
            loss_avg, tokens = _reduce_window(loss_sum / len(micro), window_tokens, engine.device)
            elapsed = time.perf_counter() - window_start
            state.tokens_seen += tokens
            metrics = {"step": state.step, "epoch": state.epoch, "loss": round(loss_avg, 6),
                       "lr": engine.get_lr()[0], "tokens_per_s": round(tokens / elapsed, 1),
                       "tokens_seen": state.tokens_seen, "total_steps": total_steps, **trial}
            state.metrics.append(metrics)
            if rank == 0:
                print(PROGRESS + json.dumps(metrics), flush=True)
            window_start, window_tokens = time.perf_counter(), 0

        evaluated = False
        if eval_shard is not None and (done or (spec.train.eval_every and state.step % spec.train.eval_every == 0)):
            eval_loss = evaluate(engine, eval_shard, spec.train.micro_batch_size)
            if eval_loss is not None:
                evaluated = True
                state.metrics.append({"step": state.step, "eval_loss": round(eval_loss, 6),
                                      "eval_perplexity": round(math.exp(min(eval_loss, 50)), 4), **trial})
                if rank == 0:
                    print(PROGRESS + json.dumps(state.metrics[-1]), flush=True)
            engine.train()

        every = spec.checkpoint.every_n_steps
        save_now = (every and state.step % every == 0) or done
        if save_now or evaluated:
            latest = {"step": state.step}  # this step's train and eval metrics, for Ray (and Tune)
            for m in state.metrics:
                if m["step"] == state.step:
                    latest.update(m)
            if save_now:
                checkpoint.save(engine, state, run, latest, keep=spec.checkpoint.keep, lora=lora)
                if rank == 0:
                    checkpoint.write_metrics(run, state.metrics)
                    print(f"checkpoint saved: step {state.step}", flush=True)
            else:  # metrics only: a search compares its trials at every evaluation
                ray.train.report(latest)

    # ---- export
    checkpoint.export(engine, tokenizer, run, model_dir, models.torch_dtype(dtype), lora)
    if rank == 0:
        print(f"model exported to {run}/model", flush=True)
    dist.barrier()


def _hidden_size(model_dir: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return getattr(cfg, "hidden_size", None)


def _reduce_window(loss, tokens: int, device) -> tuple[float, int]:
    """(mean loss over ranks, tokens summed over ranks) in one all-reduce."""
    import torch
    import torch.distributed as dist

    t = torch.stack([loss.double().reshape(()), torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    dist.all_reduce(t)  # on the engine's device: nccl reduces only GPU tensors
    return float(t[0]) / dist.get_world_size(), int(t[1])
