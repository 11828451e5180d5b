"""`launch`: the command line. Command bodies import what they need: `launch --help`,
`launch validate` and `launch schema` never import torch, deepspeed or ray.train."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from launcher.errors import Interrupted, LaunchError, UsageError


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Fine-tune LLMs with DeepSpeed inside Ray Train on a Ray cluster it provisions.\n\n"
         "`launch RUN.yaml [key=value ...]` is `launch run RUN.yaml ...` on --cluster local.",
)

ClusterOpt = typer.Option("local", "--cluster", "-c", help="Cluster name (configs/clusters/NAME.yaml) or `local`.")
Overrides = typer.Argument(None, help="Dotlist overrides, e.g. train.lr=1e-4 resources.workers=8.")


@app.command()
def run(
    spec_file: Path = typer.Argument(..., metavar="RUN.yaml", help="The run spec."),
    overrides: Optional[List[str]] = Overrides,
    cluster: str = ClusterOpt,
    detach: bool = typer.Option(False, "--detach", "-d", help="Submit and return; follow later with `launch logs`."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print what would be submitted; start nothing."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable events on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own log lines, every rank's."),
    ephemeral: bool = typer.Option(False, "--ephemeral", help="Kubernetes: a RayJob whose cluster lives as long "
                                                              "as this run, instead of the persistent RayCluster."),
) -> None:
    """Validate, check storage, start (or reuse) the cluster, submit the run and follow it."""
    from cluster import ClusterStatus, provider
    from launcher import preflight, submit
    from launcher.clusters import load_checked
    from launcher.config import load_spec

    # Everything that differs by cluster kind is an attribute of its provider (cluster/__init__.py).
    spec = load_spec(spec_file, overrides or [])
    definition = load_checked(cluster)
    prov = provider(definition.kind)
    _check_ephemeral(ephemeral, prov, cluster, definition)
    if ephemeral and getattr(getattr(spec, "ppo", None), "reward_fn", None):
        raise UsageError("ppo.reward_fn with --ephemeral: a RayJob's entrypoint cannot carry this machine's module",
                         hint="run on the persistent RayCluster (without --ephemeral), which the Jobs API uploads it to")
    remote, credentials = not prov.READS_LOCAL_FILES, prov.CLUSTER_CREDENTIALS or preflight.REMOTE_CREDENTIALS
    ds_cfg = preflight.check_spec(spec, str(spec_file), remote=remote, credentials=credentials)
    # What the cluster can provide before it is provisioned (an autoscaling cluster at its
    # maximum size); None: only the running cluster knows, so resources are checked after `up`.
    capacity = prov.capacity(definition)
    if capacity is not None and spec.resources.gpus_per_worker == "auto":
        # Decided here, from what the worker types can provide: an autoscaling cluster at zero
        # workers shows no GPUs to the job, which would then train on CPUs.
        spec.resources.gpus_per_worker = spec.resources.worker_gpus(capacity)
    run_id = submit.new_run_id()
    if dry_run:
        out = {"spec": spec.model_dump(mode="json"), "deepspeed": ds_cfg, "cluster": definition.model_dump()}
        if prov.supports("render"):
            out["manifests"] = _documents(prov, definition, cluster, spec, run_id, ephemeral)[0]
        _echo(out, json_out)
        return
    if prov.USES_THIS_PYTHON:  # its workers run in this Python environment
        preflight.check_train_packages(spec)
    preflight.check_deepspeed_rules(spec, ds_cfg, str(spec_file))
    preflight.check_data(spec, str(spec_file))
    warning = preflight.check_storage(spec, remote=remote, credentials=credentials)
    if warning:
        _say(f"warning: {warning}")
    parent, warning = preflight.check_init_from(spec, str(spec_file), remote=remote, credentials=credentials)
    if warning:
        _say(f"warning: {warning}")
    if parent is not None:
        _say(f"model.init_from {spec.model.init_from}: starting from {parent.model} (step {parent.step})")
    if capacity is not None:
        preflight.check_resources(spec, ClusterStatus(cluster, definition.kind, False, resources=capacity))
    hints = []
    if ephemeral:
        address, job_id = prov.run_ephemeral(definition, on_progress=_say, **_ephemeral_run(prov, definition, spec, run_id))
        submit.wait_for_job(address, job_id)
    else:
        # A run uses a shared cluster as it is; `launch up` is what applies definition changes.
        address = prov.up(definition, on_progress=_say, update=False)
        if capacity is None:
            preflight.check_resources(spec, prov.status(definition))
        if not verbose:  # Ray's client logs each package it uploads: bookkeeping, as in the job's log
            import logging

            for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
                logging.getLogger(name).setLevel(logging.WARNING)
        job_id = submit.submit(address, spec, run_id, cluster_credentials=prov.CLUSTER_CREDENTIALS,
                               max_failures=prov.max_failures(definition),
                               user_modules=preflight.user_modules(spec, str(spec_file)))
    _say(f"submitted job {job_id}; run directory {_run_directory(spec, run_id)}")
    hints += [f"follow:  launch logs {job_id} -f --cluster {cluster}", f"cancel:  launch cancel {job_id} --cluster {cluster}"]
    if detach:
        for h in hints:
            _say(h)
        return
    _follow(address, job_id, hints, json_out, verbose)


def _check_ephemeral(ephemeral: bool, prov, cluster: str, definition) -> None:
    from cluster import kinds_supporting

    if ephemeral and not prov.supports("ephemeral"):
        raise UsageError(f"--ephemeral needs a {' or '.join(kinds_supporting('ephemeral'))} cluster; "
                         f"{cluster} is {definition.kind}")


def _ephemeral_run(prov, definition, spec, run_id: str) -> dict:
    """The keywords of `run_ephemeral` (and of `documents(run=...)`): the run's spec, names and
    environment, which the provider carries into the cluster it starts for the run."""
    from launcher import submit
    from launcher.config import for_cluster

    env = submit.job_env(spec, run_id, cluster_credentials=prov.CLUSTER_CREDENTIALS,
                         max_failures=prov.max_failures(definition))
    return {"spec_json": json.dumps(for_cluster(spec)), "run_name": spec.name, "run_id": run_id, "env": env}


def _documents(prov, definition, cluster: str, spec, run_id: str, ephemeral: bool) -> tuple[list[dict], str]:
    from cluster import ConfigError
    from launcher.clusters import config_error, definition_file

    run = _ephemeral_run(prov, definition, spec, run_id) if ephemeral else None
    try:
        return prov.documents(definition, source=definition_file(cluster), run=run)
    except ConfigError as e:
        raise config_error(e, definition.name) from None


@app.command()
def render(
    spec_file: Path = typer.Argument(..., metavar="RUN.yaml"),
    overrides: Optional[List[str]] = Overrides,
    cluster: str = ClusterOpt,
    ephemeral: bool = typer.Option(False, "--ephemeral", help="The RayJob (+ spec ConfigMap) of an ephemeral run."),
) -> None:
    """Print what `launch up` would apply (Kubernetes manifests; the Ray cluster-launcher
    config on AWS), checked first; nothing is contacted."""
    import yaml

    from cluster import provider
    from launcher import preflight, submit
    from launcher.clusters import load_checked
    from launcher.config import load_spec

    spec = load_spec(spec_file, overrides or [])
    definition = load_checked(cluster)
    prov = provider(definition.kind)
    if not prov.supports("render"):
        raise UsageError(f"--cluster {cluster} is {definition.kind}: it has no manifests",
                         hint="`launch run --dry-run` shows what a local run would do")
    _check_ephemeral(ephemeral, prov, cluster, definition)
    preflight.check_spec(spec, str(spec_file), remote=not prov.READS_LOCAL_FILES,
                         credentials=prov.CLUSTER_CREDENTIALS or preflight.REMOTE_CREDENTIALS)
    docs, note = _documents(prov, definition, cluster, spec, submit.new_run_id(), ephemeral)
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    _say(f"# {note}")


def _follow(address: str, job_id: str, hints: list[str], json_out: bool, verbose: bool = False) -> None:
    from launcher import submit
    from launcher.errors import JobFailed
    from launcher.output import JobOutput

    out = JobOutput(json_mode=json_out, verbose=verbose)
    try:
        end = submit.follow(address, job_id, out.feed)
    except KeyboardInterrupt:
        out.close()
        raise Interrupted(job_id, hints) from None
    out.close()
    if end.status == "SUCCEEDED":
        _say(f"job {job_id} succeeded")
        return
    _raise_job_user_error(out)
    raise JobFailed(f"job {job_id} {end.status.lower()}: {end.message.splitlines()[0] if end.message else ''}",
                    hint=f"full log: launch logs {job_id} --cluster ...")


def _raise_job_user_error(out) -> None:
    """A job that stopped on bad input (a data row, a missing package in the image) ends like
    bad input given to the launcher: its one line, exit 2."""
    if out.error:
        raise UsageError(out.error["message"], hint=out.error.get("hint"))


@app.command()
def validate(
    spec_file: Path = typer.Argument(..., metavar="RUN.yaml"),
    overrides: Optional[List[str]] = Overrides,
    json_out: bool = typer.Option(False, "--json", help="Print the resolved spec as JSON."),
) -> None:
    """Check a run spec offline: every problem at once, with its YAML path."""
    from launcher import preflight
    from launcher.config import load_spec

    spec = load_spec(spec_file, overrides or [])
    ds_cfg = preflight.check_spec(spec, str(spec_file))
    preflight.check_deepspeed_rules(spec, ds_cfg, str(spec_file))
    preflight.check_data(spec, str(spec_file), local_only=True)
    if json_out:
        print(json.dumps(spec.model_dump(mode="json"), indent=1))
    else:
        _say(f"{spec_file}: ok ({spec.method}, {spec.resources.workers} workers, "
             f"{spec.grad_accum_steps} gradient accumulation steps, storage {spec.checkpoint.storage})")


@app.command()
def schema(markdown: bool = typer.Option(False, "--markdown", help="Print a reference page instead.")) -> None:
    """Print the JSON Schema of the run spec (for editors: `launch schema > run.schema.json`)."""
    if markdown:
        from launcher.spec_doc import markdown as page

        print(page(), end="")
        return
    from trainers.spec import json_schema

    print(json.dumps(json_schema(), indent=1))


@app.command()
def up(cluster: str = typer.Argument("local", help="Cluster name or `local`.")) -> None:
    """Start a cluster (or confirm it is running) and print its Ray Jobs address."""
    from cluster import provider
    from launcher.clusters import load_checked

    definition = load_checked(cluster)
    address = provider(definition.kind).up(definition, on_progress=_say)
    print(address)


@app.command()
def down(cluster: str = typer.Argument("local", help="Cluster name or `local`.")) -> None:
    """Stop a cluster."""
    from cluster import provider
    from launcher.clusters import load_cluster

    definition = load_cluster(cluster)
    stopped = provider(definition.kind).down(definition, on_progress=_say)
    _say(f"cluster {definition.name} stopped" if stopped else f"cluster {definition.name} was not running")


@app.command()
def status(
    cluster: str = typer.Argument("local", help="Cluster name or `local`."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show the cluster's nodes and resources, and its recent runs."""
    from dataclasses import asdict

    from cluster import provider
    from launcher.clusters import load_cluster

    definition = load_cluster(cluster)
    prov = provider(definition.kind)
    st = prov.status(definition)
    if st.running and st.address is None:  # reached through a port-forward or tunnel, opened now
        st.address = prov.address(definition)
    jobs = []
    if st.running:
        from ray.job_submission import JobSubmissionClient

        for job in JobSubmissionClient(st.address).list_jobs():
            if job.submission_id:
                jobs.append({"job": job.submission_id, "status": str(job.status.value),
                             "started": job.start_time, "message": (job.message or "")[:80]})
        jobs.sort(key=lambda j: j["started"] or 0)
    if json_out:
        print(json.dumps({"cluster": asdict(st), "jobs": jobs}, indent=1))
        return
    if st.running:
        res = ", ".join(f"{k} {v:g}" if k in ("CPU", "GPU") else f"{k} {v / 2**30:.1f} GiB"
                        for k, v in st.resources.items())
        _say(f"{st.name} ({st.kind}) at {st.address}: {len(st.nodes)} node(s); {res}")
    else:
        _say(f"{st.name} ({st.kind}): {st.detail}")
    # Also when not running: nodes that exist but are not set up (a head whose SSH never came
    # up keeps running, and costing, until `launch down`).
    for node in st.nodes:
        _say("  " + "  ".join(f"{k}={v}" for k, v in node.items() if v is not None))
    for j in jobs[-20:]:
        _say(f"  {j['job']:<48} {j['status']:<10} {j['message']}")


@app.command()
def logs(
    job_id: str = typer.Argument(..., metavar="JOB"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
    cluster: str = ClusterOpt,
    json_out: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own log lines, every rank's."),
) -> None:
    """Print a job's log (or follow it)."""
    address = _address(cluster, job_id)
    if follow:
        _follow(address, job_id, [f"cancel:  launch cancel {job_id} --cluster {cluster}"], json_out, verbose)
        return
    from ray.job_submission import JobSubmissionClient

    from launcher.output import JobOutput

    out = JobOutput(json_mode=json_out, verbose=verbose)
    out.feed(_job_call(lambda: JobSubmissionClient(address).get_job_logs(job_id), job_id))
    out.close()
    if out.error and not json_out:
        _say(f"error: {out.error['message']}")
        if out.error.get("hint"):
            _say(f"hint: {out.error['hint']}")


@app.command()
def cancel(job_id: str = typer.Argument(..., metavar="JOB"), cluster: str = ClusterOpt) -> None:
    """Stop a running job; its complete checkpoints stay and `resume: auto` continues from them."""
    address = _address(cluster, job_id)  # first: it sets up the cluster's credentials for Ray's clients
    from ray.job_submission import JobSubmissionClient

    stopped = _job_call(lambda: JobSubmissionClient(address).stop_job(job_id), job_id)
    _say(f"job {job_id}: stop requested" if stopped else f"job {job_id} was not running")


@app.command("apply-delta")
def apply_delta(
    delta: str = typer.Argument(..., help="An ESFT run's <run>/esft/experts.safetensors (a path or s3:// URI)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the fine-tuned model to."),
    base: Optional[str] = typer.Option(None, "--base", help="The base model (default: the one the delta names)."),
) -> None:
    """Write the fine-tuned model of an ESFT run from its base model and its expert delta."""
    import tempfile

    from trainers import esft_params, models, storage

    with tempfile.TemporaryDirectory(prefix="delta-") as tmp:
        local = delta
        if delta.startswith("s3://"):
            folder, name = delta.rstrip("/").rsplit("/", 1)
            storage.download_dir(folder, tmp)
            local = os.path.join(tmp, name)
        elif not os.path.isfile(delta):
            raise UsageError(f"{delta}: no such file", hint="name a run's esft/experts.safetensors")
        try:
            _, _, named_base = esft_params.load_delta(local)
        except ValueError as e:
            raise UsageError(str(e), hint="name the experts.safetensors an esft run exported") from None
        base = base or named_base
        if not base:
            raise UsageError(f"{delta} does not name its base model", hint="pass --base")
        _say(f"applying {delta} to {base} -> {out}")
        try:
            esft_params.apply_delta_to_dir(models.local_model_dir(base), local, str(out))
        except ValueError as e:
            raise UsageError(str(e), hint="pass the --base the run was trained from") from None
    _say(f"wrote {out}")


def _address(cluster: str, job_id: str | None = None) -> str:
    from cluster import provider
    from launcher.clusters import load_cluster
    from launcher.errors import ClusterError

    definition = load_cluster(cluster)
    prov = provider(definition.kind)
    # A job's own address: an ephemeral run has a cluster of its own.
    address = prov.job_address(definition, job_id) if job_id else prov.address(definition)
    if address is None:
        raise ClusterError(f"cluster {definition.name} is not running", hint=f"launch up {cluster}")
    return address


def _job_call(fn, job_id: str):
    from launcher.errors import UsageError

    try:
        return fn()
    except RuntimeError as e:
        if "does not exist" in str(e) or "not found" in str(e).lower():
            raise UsageError(f"no job {job_id} on this cluster", hint="`launch status` lists the jobs") from None
        raise



def _run_directory(spec, run_id: str) -> str:
    """Where the job writes: a search's unfinished run, which the job continues, when this
    machine can see the storage; else this run id's new directory."""
    from trainers import checkpoint
    from trainers.storage import StorageError

    if spec.tune is not None and spec.checkpoint.resume == "auto":
        try:
            unfinished = checkpoint.find_unfinished_search(spec.checkpoint.storage, spec.name)
        except StorageError:
            unfinished = None  # only the cluster can read it: the job says where it resumes
        if unfinished:
            return f"{unfinished} (continuing its unfinished search)"
    return checkpoint.run_uri(spec.checkpoint.storage, spec.name, run_id)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _echo(obj, json_out: bool) -> None:
    if json_out:
        print(json.dumps(obj, indent=1))
    else:
        import yaml

        print(yaml.safe_dump(obj, sort_keys=False))


COMMANDS = {"run", "validate", "schema", "render", "up", "down", "status", "logs", "cancel", "apply-delta"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if debug:  # the job's user errors then carry their traceback too (trainers.user_errors)
        from trainers.user_errors import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"
    # `launch RUN.yaml ...` and `launch --cluster prod RUN.yaml` mean `launch run ...`.
    if argv and not any(a in COMMANDS for a in argv) and not set(argv) & {"--help", "-h"}:
        argv.insert(0, "run")
    try:
        app(args=argv, standalone_mode=False, prog_name="launch")
    except Interrupted as e:
        _say(f"\ndetached from job {e.job_id}; it keeps running.")
        for h in e.hints:
            _say(f"  {h}")
        sys.exit(e.exit_code)
    except LaunchError as e:
        if debug:
            raise
        _say(f"error: {e.message}")
        if e.hint:
            _say(f"hint: {e.hint}")
        sys.exit(e.exit_code)
    except ConnectionError as e:  # the Jobs API went away (head restarted, port-forward lost)
        if debug:
            raise
        _say(f"error: lost the connection to the cluster: {e}")
        _say("hint: `launch status` shows the cluster; the job may still be running")
        sys.exit(3)
    except Exception as e:
        from click.exceptions import Abort, ClickException

        from cluster import ConfigError, ProviderError
        from trainers.storage import StorageError

        if isinstance(e, ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, Abort):
            sys.exit(130)
        if debug:
            raise
        if isinstance(e, ConfigError):  # a definition its cluster's tools refuse, found past load_checked
            _say(f"error: {e}")
            if e.hint:
                _say(f"hint: {e.hint}")
            sys.exit(2)
        if isinstance(e, ProviderError):
            _say(f"error: {e}")
            if e.hint:
                _say(f"hint: {e.hint}")
            sys.exit(3)
        if isinstance(e, StorageError):
            _say(f"error: {e}")
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
