"""Checkpoints and the final export.

A checkpoint is `<run>/checkpoints/step_NNNNNNNN/`: DeepSpeed's files from every rank
(uploaded by Ray Train, which merges the ranks' directories), one `rank_R.json` per rank
listing that rank's files, and `manifest.json`, written by rank 0 LAST, only after it has
seen every rank's files in storage. Without a manifest a checkpoint does not exist: resume
never picks it and retention never counts it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from trainers import storage

MANIFEST = "manifest.json"
RESULT = "result.json"  # written at the end of a finished run
TUNE_DIR = "tune"  # a search's Tune state, in its run directory


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def run_uri(storage_uri: str, name: str, run_id: str) -> str:
    return storage.join(storage_uri, name, run_id)


# ---------------------------------------------------------------- finding checkpoints

def _sizes(uri: str) -> dict[str, int]:
    """Relative path -> size of every file below uri."""
    fs, root = storage.filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        return {}
    return {i.path[len(root):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def is_complete(ckpt_uri: str) -> bool:
    """A manifest exists and every file it lists is present with its size."""
    text = storage.read_text(storage.join(ckpt_uri, MANIFEST))
    if text is None:
        return False
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        return False
    present = _sizes(ckpt_uri)
    return all(present.get(path) == size for path, size in manifest["files"].items())


def complete_checkpoints(run: str) -> list[str]:
    """URIs of the complete checkpoints of one run, oldest step first."""
    ckpts = storage.join(run, "checkpoints")
    names = sorted(n for n in storage.list_dir(ckpts) if n.startswith("step_"))
    return [storage.join(ckpts, n) for n in names if is_complete(storage.join(ckpts, n))]


def find_resume(storage_uri: str, name: str) -> str | None:
    """`resume: auto`: the newest complete checkpoint of any run of this name, unless the
    run that wrote it finished (then the work is done and a new run starts fresh).

    Newest over all runs, not only unfinished ones: after run A is interrupted and run B
    resumes from it and finishes, B's final checkpoint is the newest, so A is never resumed
    again; if B dies before its first checkpoint, A's is still the newest."""
    best: tuple[float, str, str] | None = None
    base = storage.join(storage_uri, name)
    for run_id in storage.list_dir(base):
        run = storage.join(base, run_id)
        for ckpt in complete_checkpoints(run):
            created = json.loads(storage.read_text(storage.join(ckpt, MANIFEST)))["created_at"]
            if best is None or created > best[0]:
                best = (created, ckpt, run)
    if best is None or storage.exists(storage.join(best[2], RESULT)):
        return None
    return best[1]


def find_unfinished_search(storage_uri: str, name: str) -> str | None:
    """The run directory of this name's newest search that has Tune state and no result:
    running the same command again resumes it (`checkpoint.resume: auto`)."""
    root = storage.join(storage_uri, name)
    for run_id in reversed(storage.list_dir(root)):
        run = storage.join(root, run_id)
        if storage.exists(storage.join(run, TUNE_DIR)) and not storage.exists(storage.join(run, RESULT)):
            return run
    return None


# ---------------------------------------------------------------- saving (workers)

@dataclass
class TrainState:
    """What a checkpoint carries besides weights and optimizer state."""

    step: int
    epoch: int
    tokens_seen: int
    metrics: list[dict[str, Any]]
    counters: dict[str, int] = field(default_factory=dict)  # summed over the run (rows per task)
    early_stopping: dict[str, Any] = field(default_factory=dict)  # best value, its step, evals since


def save(engine, state: TrainState, run: str, metrics: dict[str, Any], *, keep: int, lora: bool) -> str:
    """Save on every rank, report to Ray Train, then (rank 0) verify and write the manifest."""
    import ray.train
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    name = step_dir_name(state.step)
    local = Path(tempfile.mkdtemp(prefix="ckpt-"))
    try:
        # LoRA: the frozen base is the model the run started from; saving it every
        # checkpoint would cost the full model size for nothing.
        engine.save_checkpoint(str(local), tag=name, client_state={"train_state": state.__dict__},
                               exclude_frozen_parameters=lora)
        files = {str(p.relative_to(local)): p.stat().st_size for p in local.rglob("*") if p.is_file()}
        (local / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "files": files}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=name)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    ckpt = storage.join(run, "checkpoints", name)
    dist.barrier()  # every rank's upload has returned
    if rank == 0:
        write_manifest(ckpt, state.step, [f"rank_{r}.json" for r in range(world)], metrics)
        apply_retention(run, keep)
    dist.barrier()
    return ckpt


def save_part(engine, ckpt: str, part: str, step: int, *, lora: bool, client_state: dict | None = None) -> None:
    """One trained model's share of a checkpoint that is not Ray Train's (a PPO actor or
    critic group): every rank writes DeepSpeed's files straight to `<ckpt>/<part>/` and
    lists them in `<part>_rank_R.json`. Whoever writes the manifest reads those lists."""
    import torch.distributed as dist

    rank = dist.get_rank()
    local = Path(tempfile.mkdtemp(prefix="ckpt-"))
    try:
        engine.save_checkpoint(str(local), tag=step_dir_name(step), client_state=client_state or {},
                               exclude_frozen_parameters=lora)
        files = {f"{part}/{p.relative_to(local)}": p.stat().st_size for p in local.rglob("*") if p.is_file()}
        storage.upload_dir(str(local), storage.join(ckpt, part))
        storage.write_text(storage.join(ckpt, f"{part}_rank_{rank}.json"), json.dumps({"rank": rank, "files": files}))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    dist.barrier()


def restore_part(engine, ckpt: str, part: str, *, lora: bool) -> dict[str, Any]:
    """Load what `save_part` wrote; returns the client state saved with it."""
    with tempfile.TemporaryDirectory(prefix="restore-") as local:
        storage.download_dir(storage.join(ckpt, part), local)
        tag = sorted(p.name for p in Path(local).iterdir() if p.is_dir() and p.name.startswith("step_"))[-1]
        _, client = engine.load_checkpoint(local, tag=tag, load_module_strict=not lora)
    return client or {}


def write_manifest(ckpt: str, step: int, rank_files: list[str], metrics: dict[str, Any],
                   extra: list[str] = (), world: int | None = None) -> None:
    """Mark a checkpoint complete once every file the ranks listed (and `extra`, files
    written beside them) is in storage with its size. `world`: the workers it was written
    by (default: one per rank file)."""
    files: dict[str, int] = {}
    for name in rank_files:
        text = storage.read_text(storage.join(ckpt, name))
        if text is None:
            raise RuntimeError(f"checkpoint {ckpt}: no file list {name}; not marking it complete")
        files.update(json.loads(text)["files"])
    present = _sizes(ckpt)
    files.update({name: present.get(name, -1) for name in extra})
    missing = [p for p, size in files.items() if present.get(p) != size]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt}: {len(missing)} files missing or short, e.g. {missing[:3]}")
    manifest = {"step": step, "world_size": world or len(rank_files), "created_at": time.time(),
                "files": files, "metrics": metrics}
    storage.write_text(storage.join(ckpt, MANIFEST), json.dumps(manifest, indent=1))


def apply_retention(run: str, keep: int) -> None:
    complete = complete_checkpoints(run)
    for old in complete[:-keep]:
        storage.delete(old)


def restore(engine, ckpt_uri: str | None, lora: bool) -> TrainState | None:
    """Load weights, optimizer and scheduler state; None when starting fresh.

    A checkpoint Ray Train already holds for this run (after a worker failure) wins over
    the one the run was started from."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and ckpt_uri:
        fs, path = storage.filesystem(ckpt_uri)
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    if ckpt is None:
        return None
    with ckpt.as_directory() as local:
        tag = sorted(p.name for p in Path(local).iterdir() if p.is_dir() and p.name.startswith("step_"))[-1]
        _, client = engine.load_checkpoint(local, tag=tag, load_module_strict=not lora)
    return TrainState(**client["train_state"])


# ---------------------------------------------------------------- export

def export(engine, tokenizer, run: str, base_model_dir: str, dtype, lora: bool, auto_class=None,
           load_kwargs: dict[str, Any] | None = None, state_dict_fn=None) -> dict[str, Any] | None:
    """Write a Hugging Face model to `<run>/model/` (and the LoRA adapter to `<run>/adapter/`).
    `state_dict_fn`: the module's state dict -> the model's own layout (ESFT's split experts).
    Returns the module's state dict on rank 0 (None elsewhere).

    Called on every rank: with ZeRO-3 the weights are gathered from all of them."""
    import torch.distributed as dist

    zero3 = engine.zero_optimization_partition_weights()
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
    module_state = state_dict
    if state_dict_fn is not None and dist.get_rank() == 0:
        state_dict = state_dict_fn(state_dict)
    if dist.get_rank() == 0:
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            model_dir, adapter_dir = os.path.join(tmp, "model"), os.path.join(tmp, "adapter")
            if lora:
                engine.module.save_pretrained(adapter_dir, state_dict=state_dict)
                tokenizer.save_pretrained(adapter_dir)
                _merge_adapter(base_model_dir, adapter_dir, model_dir, dtype, auto_class, load_kwargs)
                storage.upload_dir(adapter_dir, storage.join(run, "adapter"))
            else:
                engine.module.save_pretrained(model_dir, state_dict=state_dict)
            tokenizer.save_pretrained(model_dir)
            storage.upload_dir(model_dir, storage.join(run, "model"))
    dist.barrier()
    return module_state if dist.get_rank() == 0 else None


def _merge_adapter(base_model_dir: str, adapter_dir: str, out_dir: str, dtype, auto_class=None,
                   load_kwargs: dict[str, Any] | None = None) -> None:
    """Base weights + adapter -> one plain model, on CPU, from the files just written: the
    same path a user would take, and independent of how ZeRO partitioned training.
    `auto_class` and `load_kwargs`: how the base was loaded for training (a reward model's
    scalar head: AutoModelForSequenceClassification, num_labels=1, its pad token)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = (auto_class or AutoModelForCausalLM).from_pretrained(base_model_dir, dtype=dtype, **(load_kwargs or {}))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)


def write_metrics(run: str, metrics: list[dict[str, Any]]) -> None:
    """`<run>/metrics.jsonl`: every logged step so far, this run's and those it resumed from."""
    storage.write_text(storage.join(run, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
