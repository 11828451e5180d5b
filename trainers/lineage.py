"""Transfer learning: `model.init_from` names an earlier run, and a run starts from its
exported model (`<run>/model/`: a Hugging Face model with its tokenizer; for a LoRA parent,
base plus merged adapter, see `checkpoint.export`).

A value is one of:

- a run name (`quickstart`): the newest finished run (it has `result.json`) under
  `<checkpoint.storage>/<name>/`;
- a run directory (`s3://bucket/runs/<name>/<run-id>`, a local path): a finished run;
- a checkpoint (`.../checkpoints/step_N`): refused. It holds DeepSpeed's training state
  (ZeRO partitions, optimizer state; for LoRA only the adapter), not a Hugging Face
  model: `checkpoint.resume` continues it, and its run's `model/` is what the run ended
  with. Mature trainers draw the same line: Hugging Face's `resume_from_checkpoint`
  continues a run, a new run starts from a saved model; DeepSpeed's own ZeRO checkpoints
  need `zero_to_fp32.py` before anything else can load them.

Only finished runs are accepted, also by directory: `model/` is uploaded file by file at the
end of a run and `result.json` is written after it, so without `result.json` the model may
be half there.

Used by the job (`apply`, before the data is prepared: the parent's tokenizer carries the
chat template) and by the launcher's pre-flight (`resolve_init_from`, when it can read the
storage). Torch-free: only `trainers.storage` does I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainers import checkpoint, storage
from trainers.checkpoint import RESULT
from trainers.spec import AnyRun
from trainers.user_errors import JobUserError

FIELD = "model.init_from"
SPEC_FILE = "spec.yaml"
_CHECKPOINT_RE = re.compile(r"/checkpoints(/|$)|(^|/)step_\d+/?$")


@dataclass(frozen=True)
class Parent:
    """A finished run that another starts from."""

    run: str
    """Its run directory (URI or absolute path)."""
    model: str
    """Its exported Hugging Face model, `<run>/model`."""
    name: str
    run_id: str
    step: int | None
    """The step it ended at (`result.json`)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Its final reported metrics (`result.json`), e.g. `eval_loss`."""

    def record(self, init_from: str) -> dict[str, Any]:
        """The `lineage` entry of the child's `spec.yaml`."""
        return {"parent_run": self.run, "parent_model": self.model, "parent_name": self.name,
                "parent_step": self.step, "init_from": init_from}


def resolve_init_from(value: str, storage_uri: str) -> Parent:
    """The run `model.init_from` names. Raises JobUserError naming the field, or
    storage.StorageError when the storage cannot be read."""
    value = value.strip()
    if _CHECKPOINT_RE.search(value.rstrip("/")):
        run = value.rstrip("/").split("/checkpoints", 1)[0]
        finished = "/checkpoints" in value and storage.exists(storage.join(run, RESULT))
        raise JobUserError(
            f"{FIELD}: {value} is a checkpoint: DeepSpeed's training state, not a Hugging Face model "
            "a new run can start from",
            hint=(f"its run finished: init_from: {run} starts from the model it exported" if finished else
                  "to continue that run, set checkpoint.resume to it; to start from a run, name a finished "
                  "run (its name, or its directory <storage>/<name>/<run-id>)"))
    if "/" in value:
        return _finished_run(storage.join(value), named=False)
    return _finished_run(_newest_finished(value, storage_uri), named=True)


def _newest_finished(name: str, storage_uri: str) -> str:
    base = storage.join(storage_uri, name)
    finished: list[tuple[float, str, str]] = []
    runs = storage.list_dir(base)
    for run_id in runs:
        run = storage.join(base, run_id)
        result = _read_json(storage.join(run, RESULT))
        if result is not None:
            finished.append((float(result.get("finished_at") or 0), run_id, run))
    if finished:
        return max(finished)[2]
    if runs:
        raise JobUserError(f"{FIELD}: no run named {name} in {storage_uri} has finished "
                           f"({len(runs)} unfinished: {', '.join(runs[-3:])})",
                           hint="finish it first (the same command resumes it), or give a finished run's "
                                "directory <storage>/<name>/<run-id>")
    raise JobUserError(f"{FIELD}: no run named {name} in {storage_uri}",
                       hint="train it first with the same checkpoint.storage, or give a run's directory "
                            "(s3://.../<name>/<run-id>)")


def _finished_run(run: str, *, named: bool) -> Parent:
    result = _read_json(storage.join(run, RESULT))
    model = storage.join(run, "model")
    if result is None:
        if not storage.exists(run):
            raise JobUserError(f"{FIELD}: no run at {run}",
                               hint="give a run's directory <storage>/<name>/<run-id>, or a run name")
        raise JobUserError(f"{FIELD}: {run} has not finished (no {RESULT}): its model is exported at the end",
                           hint="let it finish (the same command resumes it), or name a finished run")
    if not storage.exists(storage.join(model, "config.json")):
        what = f"the newest finished run of {run.rsplit('/', 2)[-2]}, {run}," if named else run
        raise JobUserError(f"{FIELD}: {what} has no exported model ({model} has no config.json)",
                           hint="start from a run that exported one: a training run, or a search with a "
                                "completed trial")
    spec = _read_yaml(storage.join(run, SPEC_FILE))
    parts = run.rstrip("/").split("/")
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
    step = metrics.get("step", result.get("total_steps"))
    return Parent(run=run, model=model, name=str(spec.get("name") or parts[-2]), run_id=parts[-1],
                  step=int(step) if isinstance(step, (int, float)) else None, metrics=metrics)


def apply(spec: AnyRun) -> tuple[AnyRun, dict[str, Any] | None]:
    """(the spec to train, its `lineage` record): with `model.init_from`, the spec's
    `model.path` becomes the parent's exported model (weights and tokenizer) and
    `init_from` is cleared, so the run's `spec.yaml` says what it trained from and
    nothing resolves it again (a search's trials, its `best.yaml`). Without: (spec, None).

    A run that resumes keeps the parent it started from, read from the `spec.yaml` of the
    run whose checkpoint it continues: a LoRA checkpoint holds the adapter only, which fits
    no other base (a name may mean a newer parent by now)."""
    value = spec.model.init_from
    if value is None:
        return spec, None
    try:
        parent = resolve(spec)
    except storage.StorageError as e:
        raise JobUserError(f"{FIELD}: {e.message}", hint=e.hint) from None
    print(f"init_from {value}: starting from {parent.model} ({parent.name}, step {parent.step})", flush=True)
    model = spec.model.model_copy(update={"path": parent.model, "init_from": None})
    return spec.model_copy(update={"model": model}), parent.record(value)


def resolve(spec: AnyRun) -> Parent:
    """The parent this spec's run starts from (its `model.init_from` is set): the one the run
    it resumes started from, if any, else what `init_from` names now."""
    return _resumed_parent(spec) or resolve_init_from(spec.model.init_from, spec.checkpoint.storage)


def _resumed_parent(spec: AnyRun) -> Parent | None:
    """The parent of the run this one continues, if it recorded one."""
    mode, where = spec.checkpoint.resume, spec.checkpoint.storage
    if mode == "never":
        return None
    if spec.tune is not None:  # a search continues its unfinished run; its trials their own checkpoints
        run = checkpoint.find_unfinished_search(where, spec.name) if mode == "auto" else None
    else:
        ckpt = checkpoint.find_resume(where, spec.name) if mode == "auto" else mode
        run = ckpt.rstrip("/").rsplit("/checkpoints/", 1)[0] if ckpt and "/checkpoints/" in ckpt else None
    parent_run = ((_read_yaml(storage.join(run, SPEC_FILE)).get("lineage") or {}).get("parent_run")
                  if run else None)
    if not parent_run:
        return None
    print(f"resuming {run}: keeping its parent {parent_run}", flush=True)
    return _finished_run(parent_run, named=False)


def _read_json(uri: str) -> dict[str, Any] | None:
    text = storage.read_text(uri)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(uri: str) -> dict[str, Any]:
    text = storage.read_text(uri)
    try:
        data = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
