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

from trainers import checkpoint, data, secrets_env, storage
from trainers.spec import AnyRun, parse_spec

SPEC_ENV = "LLMLAUNCH_SPEC"
SPEC_FILE_ENV = "LLMLAUNCH_SPEC_FILE"
RUN_ID_ENV = "LLMLAUNCH_RUN_ID"


def main() -> int:
    import ray

    secrets_env.load()
    spec = parse_spec(json.loads(_spec_text()))
    run_id = os.environ[RUN_ID_ENV]
    if not spec.checkpoint.storage:
        raise SystemExit("checkpoint.storage is empty: submit runs with `launch`, which fills the default")
    run = checkpoint.run_uri(spec.checkpoint.storage, spec.name, run_id)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    print(f"run {spec.name}/{run_id} -> {run}", flush=True)
    storage.write_text(storage.join(run, "spec.yaml"), yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    resume_from = pick_resume(spec)
    t0 = time.perf_counter()
    prepared = data.prepare(spec)
    print(f"data: {prepared.rows} train sequences of {spec.data.max_seq_len} tokens, {prepared.eval_rows} eval; "
          f"packing efficiency {prepared.packing_efficiency:.1%} (non-pad tokens), "
          f"{prepared.loss_tokens:,} loss tokens; prepared in {time.perf_counter() - t0:.1f}s", flush=True)
    per_epoch = data.steps_per_epoch(prepared.rows, spec.resources.workers,
                                     spec.train.micro_batch_size, spec.grad_accum_steps)
    if per_epoch == 0:
        raise SystemExit(f"data.train: {prepared.rows} sequences are fewer than one optimizer step needs "
                         f"({spec.train.micro_batch_size * spec.grad_accum_steps * spec.resources.workers}); "
                         "add data or lower train.global_batch_size / micro_batch_size")
    total_steps = spec.train.max_steps or max(1, math.ceil(per_epoch * spec.train.epochs))

    result = fit(spec, run, prepared, per_epoch, total_steps, resume_from)
    summary = {"status": "completed", "run": run, "model": storage.join(run, "model"),
               "total_steps": total_steps, "metrics": result.metrics, "finished_at": time.time()}
    if spec.model.peft is not None:
        summary["adapter"] = storage.join(run, "adapter")
    storage.write_text(storage.join(run, checkpoint.RESULT), json.dumps(summary, indent=1))
    print(f"done: model at {summary['model']}", flush=True)
    return 0


def _spec_text() -> str:
    """The spec by value (`LLMLAUNCH_SPEC`, runs submitted through the Jobs API) or by
    reference (`LLMLAUNCH_SPEC_FILE`, a mounted ConfigMap: ephemeral Kubernetes runs)."""
    path = os.environ.get(SPEC_FILE_ENV)
    if path:
        with open(path) as f:
            return f.read()
    return os.environ[SPEC_ENV]


def pick_resume(spec: AnyRun) -> str | None:
    mode = spec.checkpoint.resume
    if mode == "never":
        return None
    ckpt = checkpoint.find_resume(spec.checkpoint.storage, spec.name) if mode == "auto" else mode
    if ckpt is None:
        return None
    manifest_text = storage.read_text(storage.join(ckpt, checkpoint.MANIFEST))
    if manifest_text is None:
        raise SystemExit(f"checkpoint.resume: {ckpt} has no {checkpoint.MANIFEST}: it is not a complete checkpoint")
    manifest = json.loads(manifest_text)
    if manifest["world_size"] != spec.resources.workers:
        raise SystemExit(f"checkpoint.resume: {ckpt} was saved by {manifest['world_size']} workers but "
                         f"resources.workers is {spec.resources.workers}; use the same count, or resume: never")
    print(f"resuming from {ckpt} (step {manifest['step']})", flush=True)
    return ckpt


def fit(spec: AnyRun, run: str, prepared: data.Prepared, per_epoch: int, total_steps: int, resume_from: str | None):
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop = importlib.import_module(f"trainers.{spec.method}").train_loop_per_worker
    gpus = spec.resources.gpus_per_worker
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    resources = {"CPU": spec.resources.cpus_per_worker}
    if gpus:
        resources["GPU"] = gpus
    fs, run_path = storage.filesystem(run)
    datasets = {"train": prepared.train}
    if prepared.eval is not None:
        datasets["eval"] = prepared.eval
    trainer = TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_uri": run, "total_steps": total_steps,
                           "steps_per_epoch": per_epoch, "resume_from": resume_from,
                           "has_eval": prepared.eval is not None},
        scaling_config=ScalingConfig(num_workers=spec.resources.workers, use_gpu=bool(gpus),
                                     resources_per_worker=resources, accelerator_type=spec.resources.accelerator_type),
        # Ray wants `bucket/prefix` with the filesystem, not `s3://bucket/prefix`.
        run_config=RunConfig(name="checkpoints", storage_path=run_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=0)),
        datasets=datasets,
    )
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
