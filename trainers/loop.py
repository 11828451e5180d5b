"""The loop every method shares: `setup`, `train`, `save`, `export`, as plain functions.

A method file (`sft.py`, `multitask.py`, ...) holds only what is its own: what one
optimizer step computes from its micro-batches (a `step_fn` returning a `StepOut`) and what
an evaluation measures (a `validate_fn` returning metrics). Everything else lives here once:
resume, the log window and its reduction over ranks, the eval and checkpoint cadence,
early stopping, the reports Ray (and so Tune) reads, progress lines, and the export.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from trainers import checkpoint, data, models, secrets_env
from trainers.ds_config import deepspeed_config, precision
from trainers.engine import apply_spec_hyperparameters, build_engine, init_distributed, quiet_workers
from trainers.spec import AnyRun, parse_spec

PROGRESS = "LLMLAUNCH_PROGRESS "  # prefix of the JSON lines the CLI turns into a progress bar


@dataclass
class Session:
    """What a worker's run holds from setup to export."""

    spec: AnyRun
    config: dict[str, Any]  # the TorchTrainer's train_loop_config (trainers.entry.fit)
    rank: int
    world: int
    model_dir: str
    tokenizer: Any
    dtype: str
    engine: Any
    state: checkpoint.TrainState
    tags: dict[str, Any]  # {"trial": id} in a search: on every metrics line
    shards: dict[str, Any] = field(default_factory=dict)
    ds_config: dict[str, Any] = field(default_factory=dict)  # the DeepSpeed config the engine was built with

    @property
    def run(self) -> str:
        return self.config["run_uri"]

    @property
    def total_steps(self) -> int:
        return self.config["total_steps"]

    @property
    def lora(self) -> bool:
        return self.spec.model.peft is not None

    @property
    def device(self):
        return self.engine.device

    def shard(self, name: str):
        """This worker's shard of a dataset the job gave the trainer, or None."""
        if name not in self.config["datasets"]:
            return None
        if name not in self.shards:
            self.shards[name] = data.worker_shard(self.config, name, self.rank)
        return self.shards[name]


@dataclass
class StepOut:
    """What one optimizer step measured.

    `metrics`: device tensors averaged over the log window and the ranks (loss, accuracy).
    `tokens`: non-pad tokens trained on (throughput). `counts`: numbers summed over the
    ranks and the whole run, resumes included (rows per task)."""

    metrics: dict[str, Any]
    tokens: int
    counts: dict[str, int] = field(default_factory=dict)


def setup(config: dict[str, Any], *, load_model: Callable = models.load_model) -> Session:
    """Spec, seed, tokenizer, DeepSpeed engine and the state to go on from (a checkpoint's)."""
    import ray.train
    import torch
    import torch.distributed as dist

    secrets_env.load()
    quiet_workers()
    spec = parse_spec(config["spec"])
    rank = ray.train.get_context().get_world_rank()
    use_gpu = torch.cuda.is_available()
    torch.manual_seed(spec.train.seed + rank)

    model_dir = models.local_model_dir(spec.model.path)
    tokenizer = models.load_tokenizer(model_dir, spec.model.trust_remote_code, spec.data.chat_template)
    dtype = precision(spec, use_gpu)
    ds_config = deepspeed_config(spec, use_gpu=use_gpu, total_steps=config["total_steps"],
                                 hidden_size=models.hidden_size(model_dir, spec.model.trust_remote_code))
    init_distributed()
    model = load_model(spec, model_dir, dtype, ds_config, pad_token_id=tokenizer.pad_token_id)
    engine = build_engine(model, spec, ds_config, config["total_steps"])
    trainable, total = models.parameter_counts(engine.module)
    state = checkpoint.restore(engine, config.get("resume_from"), spec.model.peft is not None)
    if state is None:
        state = checkpoint.TrainState(0, 0, 0, [])
    else:
        apply_spec_hyperparameters(engine, spec)  # a PBT trial goes on from its donor with its own values
    if rank == 0:
        print(f"model: {total:,} parameters, {trainable:,} trainable; ZeRO stage "
              f"{ds_config['zero_optimization']['stage']}; {dtype}; starting at step "
              f"{state.step}/{config['total_steps']}", flush=True)
    tags = {"trial": config["trial"]} if config.get("trial") else {}
    return Session(spec, config, rank, dist.get_world_size(), model_dir, tokenizer, dtype, engine, state, tags,
                   ds_config=ds_config)


def train(s: Session, step_fn: Callable[[Session, list[dict]], StepOut],
          validate_fn: Callable[[Session], dict[str, float] | None], *, collate=None) -> None:
    """Optimizer steps from the state's step to the last one (or an early stop), with the
    spec's log, eval and checkpoint cadence. `validate_fn` returns reduced eval metrics
    (`eval_loss`, ...) or None when there is nothing to evaluate. `collate`: a method whose
    rows are not fixed-length sequences builds its micro-batches (see data.micro_batches)."""
    spec, state = s.spec, s.state
    t = spec.train
    s.engine.train()
    if t.eval_at_start and state.step == 0:
        start = _evaluate(s, validate_fn)
        if start is not None:
            _early_stop(s, start)  # the baseline the first evaluations must beat
    _fewshot_before(s)
    window = _Window()
    for step, micro in data.micro_batches(s.shard("train"), micro_batch_size=t.micro_batch_size,
                                          grad_accum=spec.grad_accum_steps, start_step=state.step,
                                          total_steps=s.total_steps, steps_per_epoch=s.config["steps_per_epoch"],
                                          shuffle_buffer=_local_shuffle(spec), seed=t.seed + s.rank,
                                          steps_per_fetch=data.fetch_steps(t.micro_batch_size * spec.grad_accum_steps,
                                                                           spec.data.max_seq_len,
                                                                           s.config["steps_per_epoch"]),
                                          collate=collate):
        window.add(step_fn(s, micro))
        state.step = step + 1
        state.epoch = step // s.config["steps_per_epoch"] if s.config["steps_per_epoch"] else 0  # a stream: uncounted
        done = state.step == s.total_steps

        if state.step % t.log_every == 0 or done:
            _log(s, window.reduce(s.device, state))
            window = _Window()
        evaluated = None
        if done or (t.eval_every and state.step % t.eval_every == 0):
            evaluated = _evaluate(s, validate_fn)
        stop = evaluated is not None and _early_stop(s, evaluated)
        if done or stop:
            _fewshot_after(s)  # before the last save: Ray's final report (and Tune) carries it

        every = spec.checkpoint.every_n_steps
        save_now = (every and state.step % every == 0) or done or stop
        if save_now or evaluated is not None:
            latest = {"step": state.step}  # this step's train and eval metrics, for Ray (and Tune)
            for m in state.metrics:
                if m["step"] == state.step:
                    latest.update(m)
            if stop:
                best = state.early_stopping
                latest.update(stopped_early=True, best_step=best["best_step"], best_value=best["best"])
            if save_now:
                if window.counts:  # counts since the last log line must not be lost on resume
                    window.reduce_counts(s.device, state)
                save(s, latest)
            else:  # metrics only: a search compares its trials at every evaluation
                import ray.train

                ray.train.report(latest)
        if stop:
            break


def save(s: Session, metrics: dict[str, Any]) -> None:
    """A complete checkpoint of this step (manifest last) and the metrics so far."""
    checkpoint.save(s.engine, s.state, s.run, metrics, keep=s.spec.checkpoint.keep, lora=s.lora)
    if s.rank == 0:
        checkpoint.write_metrics(s.run, s.state.metrics)
        print(f"checkpoint saved: step {s.state.step}", flush=True)


def export(s: Session) -> None:
    """The trained model in Hugging Face format at `<run>/model` (LoRA: merged, and the adapter)."""
    import torch.distributed as dist

    reward = s.spec.method == "reward"
    checkpoint.export(s.engine, s.tokenizer, s.run, s.model_dir, models.torch_dtype(s.dtype), s.lora,
                      auto_class=models.model_class(s.spec),
                      load_kwargs={"num_labels": 1, "pad_token_id": s.tokenizer.pad_token_id} if reward else None)
    if s.rank == 0:
        print(f"model exported to {s.run}/model", flush=True)
    dist.barrier()


def emit(s: Session, metrics: dict[str, Any]) -> None:
    """Record a metrics line (checkpointed with the state) and print it on rank 0."""
    line = {"step": s.state.step, **metrics, **s.tags}
    s.state.metrics.append(line)
    if s.rank == 0:
        print(PROGRESS + json.dumps(line), flush=True)


def eval_loss_metrics(loss: float | None, prefix: str = "eval") -> dict[str, float]:
    """`eval_loss` and `eval_perplexity` of a mean token loss (none when nothing was scored)."""
    if loss is None:
        return {}
    return {f"{prefix}_loss": round(loss, 6), f"{prefix}_perplexity": round(math.exp(min(loss, 50)), 4)}


# ---------------------------------------------------------------- internals

def _evaluate(s: Session, validate_fn) -> dict[str, float] | None:
    metrics = validate_fn(s)
    s.engine.train()
    if not metrics:
        return None
    emit(s, metrics)
    return metrics


def _early_stop(s: Session, metrics: dict[str, float]) -> bool:
    """Patience over evaluations: stop once `patience` evaluations in a row did not improve
    the best value by more than `min_delta`. The count travels in checkpoints."""
    es = s.spec.train.early_stopping
    if es is None or es.metric not in metrics:
        return False
    value, best = metrics[es.metric], s.state.early_stopping.get("best")
    better = best is None or (value < best - es.min_delta if es.mode == "min" else value > best + es.min_delta)
    if better:
        s.state.early_stopping = {"best": value, "best_step": s.state.step, "bad_evals": 0}
        return False
    s.state.early_stopping["bad_evals"] += 1
    if s.state.early_stopping["bad_evals"] < es.patience:
        return False
    if s.rank == 0:
        print(f"early stopping at step {s.state.step}: {es.metric} has not improved on "
              f"{s.state.early_stopping['best']:.6g} (step {s.state.early_stopping['best_step']}) "
              f"for {es.patience} evaluations", flush=True)
    return True


def _fewshot_before(s: Session) -> None:
    """k-shot accuracy of the model the run starts from, once (a resumed run has it in its state)."""
    spec = s.spec.eval.fewshot
    if spec is None or any("fewshot_accuracy_before" in m for m in s.state.metrics):
        return
    from trainers import fewshot

    before = fewshot.evaluate(s.engine.module, s.tokenizer, spec, rank=s.rank, world_size=s.world, device=s.device)
    s.state.metrics.append({"step": s.state.step, "fewshot_accuracy_before": before["fewshot_accuracy"],
                            "fewshot_total": before["fewshot_total"], **s.tags})
    if s.rank == 0:
        print(f"few-shot ({spec.k}-shot, {spec.mode}) before training: {before['fewshot_correct']}/"
              f"{before['fewshot_total']} correct ({before['fewshot_accuracy']:.1%})", flush=True)
    s.engine.train()


def _fewshot_after(s: Session) -> None:
    spec = s.spec.eval.fewshot
    if spec is None:
        return
    from trainers import fewshot

    before = next(m for m in s.state.metrics if "fewshot_accuracy_before" in m)
    after = fewshot.evaluate(s.engine.module, s.tokenizer, spec, rank=s.rank, world_size=s.world, device=s.device)
    result = fewshot.compare({"fewshot_accuracy": before["fewshot_accuracy_before"]}, after)
    s.state.metrics.append({"step": s.state.step, **result, **s.tags})
    if s.rank == 0:
        print(f"few-shot ({spec.k}-shot, {spec.mode}) after training: {after['fewshot_correct']}/"
              f"{after['fewshot_total']} correct ({after['fewshot_accuracy']:.1%}); before "
              f"{result['fewshot_accuracy_before']:.1%}: {100 * result['fewshot_accuracy_gain']:+.1f} points",
              flush=True)
    s.engine.train()


class _Window:
    """Sums of a log window's step measurements, reduced over ranks in one all-reduce."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.steps = 0
        self.tokens = 0
        self.counts: dict[str, int] = {}
        self.start = time.perf_counter()

    def add(self, out: StepOut) -> None:
        for k, v in out.metrics.items():
            # Kept on the device: no GPU sync per step.
            self.sums[k] = self.sums[k] + v.detach().float() if k in self.sums else v.detach().float()
        for k, n in out.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        self.steps += 1
        self.tokens += out.tokens

    def reduce(self, device, state: checkpoint.TrainState) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        names, counts = sorted(self.sums), sorted(self.counts)
        t = torch.stack([self.sums[k].double().reshape(()) for k in names]
                        + [torch.tensor(float(x), dtype=torch.float64, device=device)
                           for x in [self.tokens] + [self.counts[k] for k in counts]])
        dist.all_reduce(t)  # on the engine's device: nccl reduces only GPU tensors
        world, n = dist.get_world_size(), len(names)
        elapsed = time.perf_counter() - self.start
        tokens = int(t[n])
        state.tokens_seen += tokens
        for k, x in zip(counts, t[n + 1:].tolist()):
            state.counters[k] = state.counters.get(k, 0) + int(x)
        self.counts = {}
        return ({k: round(float(t[i]) / world / self.steps, 6) for i, k in enumerate(names)}
                | {"tokens_per_s": round(tokens / elapsed, 1), "tokens_seen": state.tokens_seen})

    def reduce_counts(self, device, state: checkpoint.TrainState) -> None:
        import torch
        import torch.distributed as dist

        names = sorted(self.counts)
        t = torch.tensor([float(self.counts[k]) for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        for k, x in zip(names, t.tolist()):
            state.counters[k] = state.counters.get(k, 0) + int(x)
        self.counts = {}


def _log(s: Session, window: dict[str, Any]) -> None:
    emit(s, {"epoch": s.state.epoch, **{k: v for k, v in window.items() if k not in ("tokens_per_s", "tokens_seen")},
             "lr": s.engine.get_lr()[0], "tokens_per_s": window["tokens_per_s"],
             "tokens_seen": window["tokens_seen"], "total_steps": s.total_steps, **s.state.counters})


def _local_shuffle(spec: AnyRun) -> int | None:
    """Rows of the local shuffle buffer: a stream is not shuffled up front."""
    return spec.data.shuffle_buffer if spec.data.streaming and spec.data.shuffle else None
