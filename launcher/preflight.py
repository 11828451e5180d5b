"""Checks run before anything is provisioned: what would otherwise fail minutes later,
on the cluster. Each raises a typed error that names the field or file and what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster import ClusterStatus
from launcher.errors import SpecError, SpecIssue, StorageError, UsageError
from trainers import quantize_check, storage
from trainers.ds_config import DeepSpeedConfigError, deepspeed_config
from trainers.spec import AnyRun, ZeroSpec
from trainers.user_errors import importable


# Where a remote cluster's jobs get storage credentials, in words (a provider's CLUSTER_CREDENTIALS).
REMOTE_CREDENTIALS = "the cluster's storage Secret"


def check_spec(spec: AnyRun, source: str, *, use_gpu: bool = False, remote: bool = False,
               credentials: str = REMOTE_CREDENTIALS) -> dict:
    """Offline checks (used by `launch validate`): the DeepSpeed config resolves from the
    spec and the local files it names exist (on a remote cluster: that it names none, as
    its nodes cannot read this machine's files). Returns the resolved DeepSpeed config.
    `credentials`: where a remote cluster's jobs get theirs, for the messages."""
    issues: list[SpecIssue] = []
    if remote:
        issues += _local_paths_on_remote(spec)
        from cluster import looks_secret

        issues += [SpecIssue(f"env.{name}", "looks like a credential: on a remote cluster it would sit in the job's "
                             f"runtime_env in plain text; the cluster's jobs get credentials from {credentials}")
                   for name in spec.env if looks_secret(name)]
    issues += _max_failures_issues(spec)
    if spec.tune is not None:
        from trainers.tune_spec import search_space_problems

        issues += [SpecIssue(path, msg, value, suggestion) for path, msg, value, suggestion
                   in search_space_problems(spec.model_dump(mode="json"), type(spec))]
    gpus = spec.resources.gpus_per_worker
    use_gpu = use_gpu or remote or (isinstance(gpus, int) and gpus > 0)
    ds_cfg: dict = {}
    try:
        ds_cfg = deepspeed_config(spec, use_gpu=use_gpu)
    except DeepSpeedConfigError as e:
        field = "train.deepspeed" if isinstance(spec.train.deepspeed, ZeroSpec) else f"train.deepspeed ({e.source})"
        issues += [SpecIssue(f"{field}: {key}", msg) for key, msg in e.problems]
    issues += [SpecIssue(quantize_check.FIELD, msg) for msg in quantize_check.config_problems(spec, ds_cfg)]
    for where, ds in spec.data.datasets():
        if _looks_local(ds.path) and not os.path.exists(ds.path):
            issues.append(SpecIssue(f"{where}.path", "no such file or directory", ds.path))
    if _looks_local(spec.model.path) and not os.path.exists(spec.model.path):
        issues.append(SpecIssue("model.path", "no such directory", spec.model.path))
    issues += _chat_template_file_issues(spec.data.chat_template)
    issues += _ppo_issues(spec, source)
    issues += _esft_issues(spec, ds_cfg)
    if issues:
        raise SpecError(source, issues)
    return ds_cfg


def _max_failures_issues(spec: AnyRun) -> list[SpecIssue]:
    """`env.LLMLAUNCH_MAX_FAILURES` (a run's own restart limit over the cluster's) is read by
    the job as an int: a bad value is exit 2 here, not a traceback there."""
    from trainers.entry import MAX_FAILURES_ENV

    value = spec.env.get(MAX_FAILURES_ENV)
    try:
        if value is None or int(value) >= -1:
            return []
    except ValueError:
        pass
    return [SpecIssue(f"env.{MAX_FAILURES_ENV}", "restarts after a lost node: an integer >= 0, or -1 for no limit",
                      value)]


def _ppo_issues(spec: AnyRun, source: str) -> list[SpecIssue]:
    """A reward function that imports and takes (prompts, responses); a local reward model
    that is a model or a reward run's directory."""
    p = getattr(spec, "ppo", None)
    if p is None:
        return []
    if p.reward_fn is not None:
        from trainers import reward_fn

        try:
            reward_fn.load(p.reward_fn, Path(source).parent)
        except ValueError as e:
            return [SpecIssue("ppo.reward_fn", str(e).removeprefix("ppo.reward_fn: "), p.reward_fn)]
        return []
    if _looks_local(p.reward_model) or os.path.isabs(p.reward_model):
        if not any(os.path.exists(os.path.join(p.reward_model, *sub, "config.json")) for sub in ((), ("model",))):
            return [SpecIssue("ppo.reward_model", "no model here (no config.json, nor model/config.json of a reward "
                              "run)", p.reward_model)]
    return []


ESFT_ZERO3 = ("esft trains under ZeRO stages 0-2, not 3: under ZeRO-3 the backward pass of the split expert "
              "tensors (trainable slices beside frozen ones) fails in DeepSpeed; stage 2 already shards the "
              "optimizer state and gradients of all that trains (the selected experts)")


def _esft_issues(spec: AnyRun, ds_cfg: dict) -> list[SpecIssue]:
    """ESFT needs a mixture-of-experts architecture it knows: a local model's config.json
    says (a hub or s3:// model is checked by the job before anything starts). ZeRO-3 (the
    shorthand or a JSON) is refused here rather than failing in the workers' first step."""
    if spec.method != "esft":
        return []
    if ds_cfg.get("zero_optimization", {}).get("stage") == 3:
        shorthand = isinstance(spec.train.deepspeed, ZeroSpec)
        field = "train.deepspeed" if shorthand else f"train.deepspeed ({spec.train.deepspeed})"
        return [SpecIssue(field, ESFT_ZERO3 + ": use stage 2")]
    config = os.path.join(spec.model.path, "config.json")
    if not os.path.isfile(config):
        return []
    from trainers import moe

    try:
        with open(config) as f:
            moe.check_supported(json.load(f))
    except ValueError as e:
        return [SpecIssue("model.path", str(e), spec.model.path)]
    return []


def user_modules(spec: AnyRun, source: str) -> list[str]:
    """Files or packages of the user's that travel with the job (Ray `py_modules`): the
    module of `ppo.reward_fn`."""
    p = getattr(spec, "ppo", None)
    if p is None or p.reward_fn is None:
        return []
    import shutil
    import tempfile

    from trainers import reward_fn

    root = Path(reward_fn.locate(p.reward_fn, Path(source).parent).root)
    if root.is_dir():
        return [str(root)]
    # The Jobs API client uploads directories only (Ray 2.60 refuses a .py file there):
    # the module goes as a package of the same name, importable as before.
    package = Path(tempfile.mkdtemp(prefix="llmlaunch-module-")) / root.stem
    package.mkdir()
    shutil.copyfile(root, package / "__init__.py")
    return [str(package)]


def _chat_template_file_issues(value: str | None) -> list[SpecIssue]:
    """A `data.chat_template` that names a file: one this machine reads (the launcher sends
    its text to the cluster, as for a DeepSpeed JSON)."""
    from trainers import chat_templates

    if not chat_templates.is_file_reference(value):
        return []
    builtins = ", ".join(chat_templates.BUILTIN)
    if "://" in value:
        return [SpecIssue("data.chat_template", f"name a local jinja file or a built-in ({builtins})", value)]
    try:
        chat_templates.resolve(value)
    except chat_templates.TemplateError as e:
        return [SpecIssue("data.chat_template", str(e).removeprefix("data.chat_template: "))]
    return []


def _local_paths_on_remote(spec: AnyRun) -> list[SpecIssue]:
    hint = "a remote cluster cannot read this machine's files: use s3:// (or a hub id for models and data)"
    issues = []
    if "://" not in spec.checkpoint.storage:
        issues.append(SpecIssue("checkpoint.storage", hint, spec.checkpoint.storage))
    if os.path.isabs(spec.model.path):
        issues.append(SpecIssue("model.path", hint, spec.model.path))
    if spec.model.init_from is not None and os.path.isabs(spec.model.init_from):
        issues.append(SpecIssue("model.init_from", hint, spec.model.init_from))
    for where, ds in spec.data.datasets():
        if os.path.isabs(ds.path):
            issues.append(SpecIssue(f"{where}.path", hint, ds.path))
    reward_model = getattr(getattr(spec, "ppo", None), "reward_model", None)
    if reward_model is not None and os.path.isabs(reward_model):
        issues.append(SpecIssue("ppo.reward_model", hint, reward_model))
    return issues


def _looks_local(path: str) -> bool:
    """Absolute, home-relative or explicitly relative paths; `org/name` may be a hub id."""
    from trainers import data_check

    return "://" not in path and (path.startswith(("/", "~", "./", "../")) or path.endswith(data_check.DATA_SUFFIXES))


def check_deepspeed_rules(spec: AnyRun, ds_cfg: dict, source: str) -> None:
    """A user's DeepSpeed JSON, checked by DeepSpeed itself (in a subprocess: the CLI does
    not import deepspeed). Skipped when deepspeed is not installed on this machine."""
    if isinstance(spec.train.deepspeed, ZeroSpec):
        return  # built by us from the shorthand
    if not importable("deepspeed"):
        return
    proc = subprocess.run([sys.executable, "-m", "trainers.ds_check"], input=json.dumps(ds_cfg),
                          capture_output=True, text=True)
    if proc.returncode == 2:
        raise SpecError(source, [SpecIssue(f"train.deepspeed ({spec.train.deepspeed})",
                                           "DeepSpeed rejects this config: " + proc.stdout.strip())])


def check_data(spec: AnyRun, source: str, *, local_only: bool = False) -> None:
    """The first rows of every dataset this machine can read fit the declared format: a
    chat file with `conversations` instead of `messages` is exit 2 here, naming the file,
    the line, the fields the row has and the format it looks like, not a traceback from a
    Ray Data task minutes later. Datasets this machine cannot read (hub ids, buckets it
    has no credentials for) are checked by the job when it starts. `local_only` (offline
    `launch validate`) skips `s3://`."""
    from trainers import data_check

    issues = []
    for where, ds in spec.data.datasets():
        if local_only and "://" in ds.path:
            continue
        try:
            problems = data_check.peek_problems(ds, spec.data.on_bad_rows == "skip")
        except storage.StorageError:
            continue  # unreadable from here: the job checks it where it runs
        issues += [SpecIssue(where, f"(format {ds.format}) {p}") for p in problems]
    if issues:
        raise SpecError(source, issues, hint="fix the rows, or the dataset's `format` and field options "
                                             "(`launch schema --markdown` lists them)")
    check_chat_template(spec, source, local_only=local_only)


def check_chat_template(spec: AnyRun, source: str, *, local_only: bool = False) -> None:
    """Chat data needs a chat template: the tokenizer's own or `data.chat_template`. Read
    from a local model directory's files (a hub or `s3://` model is checked by the job)."""
    from trainers import chat_templates, data_check

    if spec.data.chat_template is not None:
        return
    if spec.model.init_from is not None:
        return  # the parent's tokenizer renders the chat: the job checks it, once it is resolved
    if chat_templates.model_dir_has_template(spec.model.path) is not False:
        return
    # Offline (`launch validate`) no bucket is read: a prompt_completion file there is not
    # peeked at; messages and sharegpt are chat data whatever their rows.
    chat = data_check.chat_datasets(spec, skip=lambda ds: local_only and "://" in ds.path
                                    and ds.format == "prompt_completion")
    if chat:
        message, hint = chat_templates.missing(spec.model.path, chat)
        path, _, text = message.partition(": ")
        raise SpecError(source, [SpecIssue(path, text)], hint=hint)


def check_train_packages(spec: AnyRun | None = None) -> None:
    """A local cluster runs the workers in this Python environment: it must have what they
    import (`pip install llmlaunch` alone is the launcher without them), and bitsandbytes
    for `model.peft.quantize`."""
    from trainers.user_errors import missing_train_packages

    missing = missing_train_packages()
    if spec is not None and quantize_check.missing_package(spec):
        if not missing:
            raise UsageError(f"{quantize_check.FIELD}: {spec.model.peft.quantize} loads the base with "
                             f"{quantize_check.PACKAGE}, which this Python environment ({sys.executable}) lacks "
                             "(a local cluster's workers run in it)",
                             hint=f"pip install 'llmlaunch[train]' (or {quantize_check.PACKAGE}), "
                                  f"or remove {quantize_check.FIELD}")
        missing = missing + [quantize_check.PACKAGE]
    if missing:
        raise UsageError(f"this Python environment ({sys.executable}) lacks {', '.join(missing)}, which the "
                         "training workers of a local cluster need",
                         hint="pip install 'llmlaunch[train]'")


def check_storage(spec: AnyRun, *, remote: bool = False, credentials: str = REMOTE_CREDENTIALS) -> str | None:
    """The run's storage is reachable and writable. On a local cluster the job has this
    machine's credentials, so a failure is final (exit 2). A remote cluster's jobs use
    credentials of its own (`credentials`: which, in words), which this machine cannot see:
    there a failure is only a warning, returned for the caller to print."""
    target = storage.join(spec.checkpoint.storage, spec.name)
    try:
        storage.check_writable(target)
    except storage.StorageError as e:
        message = f"checkpoint.storage: {getattr(e, 'message', e)}"
        if remote:
            return f"{message} (from this machine; the cluster's jobs use {credentials})"
        raise StorageError(message, hint=getattr(e, "hint", None)) from None
    return None


def check_init_from(spec: AnyRun, source: str, *, remote: bool = False, credentials: str = REMOTE_CREDENTIALS):
    """`model.init_from` names a finished run with an exported model: a missing parent is
    exit 2 here, not once the cluster is up. Returns (the parent, a warning): a remote
    cluster's jobs read the storage with credentials of their own, so there a storage this
    machine cannot read is only a warning (the job resolves it where it runs), as for
    `check_storage`. (None, None) without `init_from`."""
    if spec.model.init_from is None:
        return None, None
    from trainers import lineage
    from trainers.user_errors import JobUserError

    try:
        return lineage.resolve(spec), None
    except JobUserError as e:
        raise SpecError(source, [SpecIssue(lineage.FIELD, e.message.removeprefix(f"{lineage.FIELD}: "))],
                        hint=e.hint) from None
    except storage.StorageError as e:
        message = f"{lineage.FIELD}: {getattr(e, 'message', e)}"
        if remote:
            return None, f"{message} (from this machine; the job resolves it with {credentials})"
        raise StorageError(message, hint=getattr(e, "hint", None)) from None


def check_resources(spec: AnyRun, status: ClusterStatus) -> None:
    """The workers fit the cluster (a run that cannot be placed would wait forever).
    `status.resources` is what the cluster can provide: the live total of a running cluster
    (`status`), or an autoscaling cluster's worker types at their maximum size (`capacity`)."""
    r = spec.resources
    have_cpu, have_gpu = status.resources.get("CPU", 0), status.resources.get("GPU", 0)
    gpus = r.worker_gpus(status.resources)
    groups = 1
    if spec.method == "ppo" and spec.ppo.placement == "spread":  # every role's workers have bundles of their own
        from trainers import rl_placement

        groups = len(rl_placement.roles(spec))
    who = f"{r.workers} workers" + (f" x {groups} roles (ppo.placement spread)" if groups > 1 else "")
    problems = []
    if groups * r.workers * r.cpus_per_worker > have_cpu:
        problems.append(f"resources: {who} x {r.cpus_per_worker} CPUs need "
                        f"{groups * r.workers * r.cpus_per_worker:g} CPUs; cluster {status.name} has {have_cpu:g}")
    if groups * r.workers * gpus > have_gpu:
        problems.append(f"resources: {who} x {gpus} GPUs need {groups * r.workers * gpus} GPUs; "
                        f"cluster {status.name} has {have_gpu:g}")
    if problems:
        raise UsageError("; ".join(problems), hint="lower resources.workers / cpus_per_worker / "
                                                   "gpus_per_worker, or choose a bigger --cluster")
