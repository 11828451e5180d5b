"""The Ray job's entrypoint (`python -m trainers.entry`), run on the cluster.

Reads the spec from the job's environment, prepares the data once with Ray Data, picks
the checkpoint to resume from, and runs the method's loop in a TorchTrainer whose
checkpoints go to `<storage>/<name>/<run-id>/checkpoints/`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time

import yaml

from trainers import checkpoint, data, data_check, lineage, quantize_check, secrets_env, storage, user_errors
from trainers.spec import AnyRun, parse_spec
from trainers.user_errors import JobUserError

SPEC_ENV = "LLMLAUNCH_SPEC"
SPEC_FILE_ENV = "LLMLAUNCH_SPEC_FILE"
RUN_ID_ENV = "LLMLAUNCH_RUN_ID"
MAX_FAILURES_ENV = "LLMLAUNCH_MAX_FAILURES"  # FailureConfig(max_failures): the launcher sets it from the cluster


def main() -> int:
    try:
        return run_job()
    except user_errors.JobUserError as e:
        return user_errors.report(e)


def run_job() -> int:
    user_errors.check_train_packages()
    import ray

    secrets_env.load()
    spec = parse_spec(json.loads(_spec_text()))
    run_id = os.environ[RUN_ID_ENV]
    if not spec.checkpoint.storage:
        raise JobUserError("checkpoint.storage is empty", hint="submit runs with `launch`, which fills the default")
    # model.init_from: train from the parent's exported model (and tokenizer); spec.yaml records it.
    spec, origin = lineage.apply(spec)
    check_data(spec)
    quantize_check.check_quantize(spec)
    run = checkpoint.run_uri(spec.checkpoint.storage, spec.name, run_id)
    if spec.tune is not None and spec.checkpoint.resume == "auto":
        # The same command continues the search (the launcher said so if it could see the storage).
        run = checkpoint.find_unfinished_search(spec.checkpoint.storage, spec.name) or run
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    print(f"run {spec.name}/{run_id} -> {run}", flush=True)
    record = spec.model_dump(mode="json") | ({"lineage": origin} if origin else {})
    storage.write_text(storage.join(run, "spec.yaml"), yaml.safe_dump(record, sort_keys=False))

    resume_from = pick_resume(spec) if spec.tune is None else None  # trials resume from their own
    if resume_from and spec.method == "esft":
        from trainers import esft

        esft.check_resumable(resume_from)
    if spec.tune is not None:
        from trainers import tune

        summary = tune.run_search(spec, run, prepare_run)
        if summary is None:
            return 130  # interrupted (as by SIGINT): nothing marks the search finished
        summary.update(finished_at=time.time())
    elif spec.method == "ppo":  # its roles are Ray actor groups of its own, not a TorchTrainer
        from trainers import ppo

        prepared, _, total_steps = prepare_run(spec)
        metrics = ppo.run(spec, run, prepared, resume_from)
        summary = {"status": "completed", "run": run, "model": storage.join(run, "model"),
                   "total_steps": total_steps, "metrics": metrics, "finished_at": time.time()}
        if spec.model.peft is not None:
            summary["adapter"] = storage.join(run, "adapter")
    else:
        prepared, per_epoch, total_steps = prepare_run(spec)
        result = fit(spec, run, prepared, per_epoch, total_steps, resume_from)
        if prepared.bad_row_counter is not None:  # a stream's skipped rows are known once it has been read
            prepared.bad_rows = data.bad_row_counts(prepared.bad_row_counter)
            report_bad_rows(spec, prepared, after_run=True)
        summary = {"status": "completed", "run": run, "model": storage.join(run, "model"),
                   "total_steps": total_steps, "metrics": result.metrics, "finished_at": time.time()}
        if spec.model.peft is not None:
            summary["adapter"] = storage.join(run, "adapter")
    storage.write_text(storage.join(run, checkpoint.RESULT), json.dumps(summary, indent=1))
    if "model" in summary:
        print(f"done: model at {summary['model']}", flush=True)
    return 0


def prepare_run(spec: AnyRun, label: str = "") -> tuple[data.Prepared, int, int]:
    """The data tokenized and packed once with Ray Data, and what it makes of the steps:
    (prepared, optimizer steps per epoch, total steps)."""
    t0 = time.perf_counter()
    prepared = prepare_data(spec)
    if prepared.rows is None:  # data.streaming
        check_stream_capacity(spec)
        print(f"data{label}: streaming the training data (read, tokenized and packed as it trains; not counted up "
              f"front), {prepared.eval_rows} eval sequences prepared in {time.perf_counter() - t0:.1f}s", flush=True)
        return prepared, None, spec.train.max_steps
    if spec.method == "ppo":  # prompts alone: the policy writes the responses
        print(f"data{label}: {prepared.rows} train prompts, {prepared.eval_rows} eval; {prepared.tokens:,} prompt "
              f"tokens (at most {spec.data.max_seq_len} each); prepared in {time.perf_counter() - t0:.1f}s", flush=True)
        return prepared, None, spec.train.max_steps
    if prepared.packing_efficiency is None:  # comparisons: a prompt and its responses per row, unpacked
        print(f"data{label}: {prepared.rows} train prompts with their ranked responses (at most "
              f"{spec.data.max_seq_len} tokens each), {prepared.eval_rows} eval; {prepared.tokens:,} tokens, "
              f"{prepared.loss_tokens:,} response tokens; prepared in {time.perf_counter() - t0:.1f}s", flush=True)
    else:
        print(f"data{label}: {prepared.rows} train sequences of {spec.data.max_seq_len} tokens, {prepared.eval_rows} "
              f"eval; packing efficiency {prepared.packing_efficiency:.1%} (non-pad tokens), "
              f"{prepared.loss_tokens:,} loss tokens; prepared in {time.perf_counter() - t0:.1f}s", flush=True)
    if prepared.mixture:
        print(f"mixture{label} ({getattr(spec.data, 'mixing', 'replay')}): " + ", ".join(
            f"{name} {m['rows']} sequences ({m['share']:.1%}; {m['rows'] / m['sequences']:.2f} passes over its "
            f"{m['sequences']})" for name, m in prepared.mixture.items()), flush=True)
    if getattr(getattr(spec, "dpo", None), "precompute_reference", False):
        from trainers import reference_logps

        prepared = reference_logps.attach(spec, prepared)
    per_epoch = data.steps_per_epoch(prepared.rows, spec.resources.workers,
                                     spec.train.micro_batch_size, spec.grad_accum_steps)
    if per_epoch == 0:
        raise JobUserError(f"data.train: {prepared.rows} sequences are fewer than one optimizer step needs "
                           f"({spec.train.micro_batch_size * spec.grad_accum_steps * spec.resources.workers})",
                           hint="add data or lower train.global_batch_size / micro_batch_size")
    total_steps = spec.train.max_steps or max(1, math.ceil(per_epoch * spec.train.epochs))
    return prepared, per_epoch, total_steps


def check_stream_capacity(spec: AnyRun) -> None:
    """A stream is read and tokenized by Ray Data tasks while the workers train: with every
    CPU reserved by the workers none of those tasks could ever start, and the run would hang."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    reserved = spec.resources.workers * spec.resources.cpus_per_worker
    if cpus - reserved < 1:
        raise JobUserError(f"data.streaming: the workers reserve {reserved:g} of the cluster's {cpus:g} CPUs "
                           "(resources.workers x cpus_per_worker), leaving none for the Ray Data tasks that read "
                           "and tokenize the stream while they train",
                           hint="leave at least one CPU free (e.g. resources.cpus_per_worker: 0.5), add CPUs, or "
                                "prepare the data up front (data.streaming: false)")


def _spec_text() -> str:
    """The spec by value (`LLMLAUNCH_SPEC`, runs submitted through the Jobs API) or by
    reference (`LLMLAUNCH_SPEC_FILE`, a mounted ConfigMap: ephemeral Kubernetes runs)."""
    path = os.environ.get(SPEC_FILE_ENV)
    if path:
        with open(path) as f:
            return f.read()
    return os.environ[SPEC_ENV]


def check_data(spec: AnyRun) -> None:
    """The first rows of every dataset fit their format: the launcher checks what it can
    read; this catches datasets only the cluster can read, before anything is started."""
    problems = []
    for where, ds in spec.data.datasets():
        try:
            problems += [f"{where} (format {ds.format}): {p}"
                         for p in data_check.peek_problems(ds, spec.data.on_bad_rows == "skip")]
        except storage.StorageError as e:
            raise JobUserError(f"{where}.path: {e}", hint=e.hint) from None
    if problems:
        raise JobUserError("; ".join(problems), hint="fix the rows, or the dataset's `format` and field options")
    check_chat_template(spec)
    if spec.method == "ppo":
        from trainers import ppo

        ppo.check(spec)
    if spec.method == "esft":
        check_moe_architecture(spec)
    if spec.eval.fewshot is not None:  # read here, on the driver: its errors are one line, not a worker's traceback
        from trainers import fewshot

        fewshot.load(spec.eval.fewshot)


def check_moe_architecture(spec: AnyRun) -> None:
    """ESFT's architectures, for a hub or s3:// model the launcher could not read."""
    from transformers import AutoConfig

    from trainers import models, moe

    try:
        config = AutoConfig.from_pretrained(models.local_model_dir(spec.model.path, weights=False),
                                            trust_remote_code=spec.model.trust_remote_code)
    except Exception:  # unreachable model, no network: reported where the workers load it
        return
    try:
        moe.check_supported(config)
    except ValueError as e:
        raise JobUserError(f"model.path: {e}", hint="use method: sft (or LoRA) for this model") from None


def check_chat_template(spec: AnyRun) -> None:
    """Chat data has a chat template to be rendered with, before anything is started: the
    launcher could not tell for a hub or `s3://` model (this loads its tokenizer files)."""
    from trainers import chat_templates, models

    if spec.data.chat_template is not None:
        try:
            chat_templates.resolve(spec.data.chat_template)
        except chat_templates.TemplateError as e:
            raise JobUserError(str(e), hint="the launcher sends a jinja file's text: name a file it can read") from None
        return
    chat = data_check.chat_datasets(spec)
    if not chat:
        return
    has = chat_templates.model_dir_has_template(spec.model.path)
    if has is None:
        try:
            tok = models.load_tokenizer(models.local_model_dir(spec.model.path, weights=False),
                                        spec.model.trust_remote_code)
        except Exception:  # unreachable model, no network: reported where the data tasks load it
            return
        has = bool(tok.chat_template)
    if not has:
        raise JobUserError(*chat_templates.missing(spec.model.path, chat))


def prepare_data(spec: AnyRun) -> data.Prepared:
    """data.prepare, with a bad row reported as one line (file, line, what is wrong)
    rather than as a traceback through Ray Data's internals."""
    import logging

    # Ray Data logs a failed task's error and stack itself; the failure is reported below as
    # one line, or re-raised with its full traceback, so those records would only repeat it.
    quiet = _DropRecords("Exception occurred in user code", "Exception occurred in Ray Data or Ray Core",
                         "Full stack trace", "An exception was raised from a task")
    loggers = [logging.getLogger(n) for n in ("ray.data.exceptions",
                                              "ray.data._internal.execution.streaming_executor_state")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        prepared = data.prepare(spec)
    except Exception as e:
        message = data_check.message_from(e)
        if message is None:  # e.g. Arrow could not read the file: name the line if it is a bad row
            message = "; ".join(_scan_all(spec))
        if not message:
            raise
        raise JobUserError(message, hint="fix the row, or the dataset's `format` and field options") from None
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
    report_bad_rows(spec, prepared)
    return prepared


def report_bad_rows(spec: AnyRun, prepared: data.Prepared, after_run: bool = False) -> None:
    """The rows `data.on_bad_rows: skip` left out, each by file and line; more than
    `data.max_bad_rows` of them fail the run (a systematic problem, not a few rows), or,
    for a stream reported after its run, are a warning."""
    if not prepared.bad_rows:
        return
    total, cap = sum(prepared.bad_rows.values()), spec.data.max_bad_rows
    datasets = dict(spec.data.datasets())
    located = []
    for where, n in prepared.bad_rows.items():
        ds = datasets[where]
        located += [f"{where} (format {ds.format}): {p}"
                    for p in data_check.bad_rows(ds, data.bad_row_problem(ds, spec), min(n, cap + 1))]
    if total > cap and after_run:
        print(f"warning: the stream had {total} bad rows, more than data.max_bad_rows ({cap}); the first: "
              + "; ".join(located[:3]), flush=True)
        return
    if total > cap:
        raise JobUserError(f"{total} bad rows, more than data.max_bad_rows ({cap}); the first: "
                           + "; ".join(located[:3]),
                           hint="fix the rows (or the dataset's `format`), or raise data.max_bad_rows")
    print(f"data: skipped {total} bad row{'' if total == 1 else 's'} (data.on_bad_rows: skip):", flush=True)
    for line in located:
        print(f"  {line}", flush=True)


def _scan_all(spec: AnyRun) -> list[str]:
    found = []
    for where, ds in spec.data.datasets():
        try:
            problem = data_check.scan(ds, lambda row: data_check.row_problem(row, ds))
        except storage.StorageError:
            problem = None
        if problem:
            found.append(f"{where} (format {ds.format}): {problem}")
    return found


class _DropRecords:
    def __init__(self, *starts: str):
        self.starts = starts

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.starts)


def pick_resume(spec: AnyRun) -> str | None:
    mode = spec.checkpoint.resume
    if mode == "never":
        return None
    ckpt = checkpoint.find_resume(spec.checkpoint.storage, spec.name) if mode == "auto" else mode
    if ckpt is None:
        return None
    manifest_text = storage.read_text(storage.join(ckpt, checkpoint.MANIFEST))
    if manifest_text is None:
        raise JobUserError(f"checkpoint.resume: {ckpt} has no {checkpoint.MANIFEST}: it is not a complete checkpoint",
                           hint="name a checkpoint directory that has one, or use resume: auto")
    manifest = json.loads(manifest_text)
    if manifest["world_size"] != spec.resources.workers:
        raise JobUserError(f"checkpoint.resume: {ckpt} was saved by {manifest['world_size']} workers but "
                           f"resources.workers is {spec.resources.workers}",
                           hint="use the same worker count, or checkpoint.resume: never")
    print(f"resuming from {ckpt} (step {manifest['step']})", flush=True)
    return ckpt


def fit(spec: AnyRun, run: str, prepared: data.Prepared, per_epoch: int, total_steps: int, resume_from: str | None,
        *, trial: str | None = None, callbacks: list | None = None):
    """One training run: a TorchTrainer of the method's loop, checkpoints in `<run>/checkpoints`.
    A search runs each trial through here too (`trial`, Tune's report callback)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    method = importlib.import_module(f"trainers.{spec.method}")
    gpus = spec.resources.worker_gpus(ray.cluster_resources())
    resources = {"CPU": spec.resources.cpus_per_worker}
    if gpus:
        resources["GPU"] = gpus
    fs, run_path = storage.filesystem(run)
    datasets = {"train": prepared.train, **({"eval": prepared.eval} if prepared.eval is not None else {}),
                **prepared.task_evals}
    if hasattr(method, "extra_datasets"):  # what a method reads besides train and eval (ESFT's scoring sample)
        datasets.update(method.extra_datasets(spec, prepared))
    streamed = {"train": datasets["train"]} if prepared.rows is None else {}  # data.streaming
    shards = data.split_for_workers({k: v for k, v in datasets.items() if k not in streamed}, spec.resources.workers)
    trainer = TorchTrainer(
        train_loop_per_worker=method.train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_uri": run, "total_steps": total_steps,
                           "steps_per_epoch": per_epoch, "resume_from": resume_from,
                           "datasets": sorted(datasets), "shards": shards, "trial": trial,
                           "tasks": ({name: m["share"] for name, m in prepared.mixture.items()}
                                     if spec.method == "multitask" else {})},
        scaling_config=ScalingConfig(num_workers=spec.resources.workers, use_gpu=bool(gpus),
                                     resources_per_worker=resources, accelerator_type=spec.resources.accelerator_type),
        # Ray wants `bucket/prefix` with the filesystem, not `s3://bucket/prefix`.
        run_config=RunConfig(name="checkpoints", storage_path=run_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=int(os.environ.get(MAX_FAILURES_ENV, "0"))),
                             callbacks=callbacks or []),
        datasets=streamed,
    )
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
