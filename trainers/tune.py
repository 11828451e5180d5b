"""A hyperparameter search: the run spec's `tune:` section, run by Ray Tune in the job.

Ray 2.60 with Train V2: `Tuner(TorchTrainer)` fails, so each trial is a function that
builds its own TorchTrainer (`trainers.entry.fit`, the same call a single run makes) with
`TuneReportCallback`, so every `ray.train.report` of rank 0 reaches Tune. A method added
later is searchable for free: the trial runs the same loop a single run does.

Layout: `<run>/trials/<trial-id>/{checkpoints/, metrics.jsonl, model/}`, Tune's own state
in `<run>/tune/`, and at the end `<run>/tune/results.csv`, `<run>/tune/trials.png`,
`<run>/best.yaml` and the best trial's `model/` (and `adapter/`) copied to `<run>/`.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
from typing import Any, Callable

import yaml

from trainers import checkpoint, data, storage
from trainers.spec import AnyRun, parse_spec
from trainers.tune_spec import Distribution, set_path
from trainers.user_errors import JobUserError

TUNE_DIR = checkpoint.TUNE_DIR
TRIALS_DIR = "trials"
TRIAL_MARKER = "LLMLAUNCH_TRIAL "  # one JSON line per trial event, for the launcher
# What each trial's driver reserves: the function that calls fit() and passes its reports on
# waits on its run; Tune's default of a whole CPU would leave a CPU idle per trial.
DRIVER_CPUS = 0.5


def ray_distribution(d: Distribution):
    from ray import tune

    lo_hi = d.args
    return {"uniform": lambda: tune.uniform(*lo_hi), "loguniform": lambda: tune.loguniform(*lo_hi),
            "randint": lambda: tune.randint(lo_hi[0], lo_hi[1] + 1),  # ours includes the upper bound
            "choice": lambda: tune.choice(lo_hi), "grid": lambda: tune.grid_search(lo_hi)}[d.kind]()


def trial_spec(base: dict[str, Any], values: dict[str, Any]) -> AnyRun:
    """The whole spec of one trial, validated again: a sampled combination the spec refuses
    (a global batch no longer divisible...) fails this trial with that message."""
    spec = copy.deepcopy(base)
    spec["tune"] = None
    for path, value in values.items():
        set_path(spec, path, value)
    from pydantic import ValidationError

    try:
        return parse_spec(spec)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"sampled values {values} make an invalid spec: {problems}") from None


def population(spec: AnyRun) -> int:
    """Trials of the search: num_samples times every grid."""
    grid = math.prod(len(d.args) for d in spec.tune.search_space.values() if d.kind == "grid")
    return spec.tune.num_samples * grid


def capacity_concurrency(spec: AnyRun, resources: dict[str, float]) -> int:
    """Trials the cluster holds at once: each needs its workers plus its driver's CPU.
    More would wait for placement groups that never come (Ray Train retries forever)."""
    r = spec.resources
    gpus = r.worker_gpus(resources)
    if spec.method == "ppo":  # a placement group of its roles' bundles
        from trainers import rl_placement

        need = rl_placement.needs(spec, gpus)
    else:
        need = {"CPU": r.workers * r.cpus_per_worker, **({"GPU": r.workers * gpus} if gpus else {})}
    fits = [resources.get("CPU", 0) // (need["CPU"] + DRIVER_CPUS)]
    if need.get("GPU"):
        fits.append(resources.get("GPU", 0) // need["GPU"])
    return max(1, int(min(fits)))


def _event(kind: str, trial_id: str, **fields) -> dict[str, Any]:
    """One trial event line for the launcher; returns the event."""
    event = {"event": kind, "trial": trial_id, **fields}
    print(TRIAL_MARKER + json.dumps(event, default=str), flush=True)
    return event


def _sampled(trial, paths) -> dict[str, Any]:
    return {p: trial.config.get(p) for p in paths}


def _callback(spec: AnyRun, total_steps: int):
    from ray.tune import Callback

    metric, paths = spec.tune.metric, spec.tune.paths()

    class TrialEvents(Callback):
        """One line per trial event: started, reported, stopped early, finished, errored."""

        def on_trial_start(self, iteration, trials, trial, **info):
            _event("started", trial.trial_id, config=_sampled(trial, paths))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric in result:
                _event("result", trial.trial_id, step=result.get("step"), metric=metric, value=result[metric])

        def on_trial_complete(self, iteration, trials, trial, **info):
            step = (trial.last_result or {}).get("step") or 0
            total = (trial.last_result or {}).get("total_steps", total_steps)
            _event("finished" if step >= total else "stopped", trial.trial_id, step=step,
                   value=(trial.last_result or {}).get(metric))

        def on_trial_error(self, iteration, trials, trial, **info):
            message = str(trial.error_file or "")
            try:
                message = (trial.get_error() and str(trial.get_error())) or message
            except Exception:
                pass
            _event("errored", trial.trial_id, error=message.strip().splitlines()[-1][:500] if message.strip() else "")

    return TrialEvents()


def run_search(spec: AnyRun, run: str, prepare: Callable[..., tuple[data.Prepared, int, int]]
               ) -> dict[str, Any] | None:
    """Run the search; returns the summary written to `<run>/result.json`, or None when it
    was interrupted (it is continued by running it again). `prepare(spec, label)` is
    `entry.prepare_run`: called once per distinct data configuration, before any trial."""
    import ray
    from ray import tune

    t = spec.tune
    base = spec.model_dump(mode="json")
    fs, tune_path = storage.filesystem(run)
    paths = t.paths()

    def trial(config: dict[str, Any]) -> None:
        trial_id = tune.get_context().get_trial_id()
        values = {p: config[p] for p in paths}
        one = trial_spec(base, values)
        prepared, per_epoch, steps = prepared_by_data[_data_key({p: v for p, v in values.items()
                                                                if p.startswith("data.")})]
        trial_run = storage.join(run, TRIALS_DIR, trial_id)
        start, donor = start_point(trial_run, tune.get_checkpoint())
        if donor is not None:
            record_exploit(trial_run, trial_id, donor, start, values)
        _run_trial(one, trial_run, prepared, per_epoch, steps, start, trial_id, t.metric)

    concurrency = capacity_concurrency(spec, ray.cluster_resources())
    if t.max_concurrent_trials:
        concurrency = min(concurrency, t.max_concurrent_trials)
    if t.scheduler.type == "pbt" and population(spec) > concurrency:
        # Tune counts a paused trial as running: a population larger than what runs at once
        # never has its later members started while the first ones wait to be compared.
        raise JobUserError(f"tune: population-based training runs its {population(spec)} trials at once, and "
                           f"{concurrency} fit (each: {spec.resources.workers} worker(s) + the trial's driver)",
                           hint="lower tune.num_samples (or the grid), or use a larger cluster")
    prepared_by_data = {}
    for values in data_variants(spec):
        label = " (" + ", ".join(f"{p}={v}" for p, v in values.items()) + ")" if values else ""
        prepared_by_data[_data_key(values)] = prepare(trial_spec(base, values) if values else spec, label)
    total_steps = max(total for _, _, total in prepared_by_data.values())
    print(f"search: {t.num_samples} sample(s) of {len(t.search_space)} value(s), {concurrency} trial(s) at once, "
          f"scheduler {t.scheduler.type}, search {t.search}; trials in {storage.join(run, TRIALS_DIR)}", flush=True)
    seed = t.seed if t.seed is not None else spec.train.seed
    tune_config = tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                  # Random and grid search bound themselves (_search_alg).
                                  max_concurrent_trials=concurrency if t.search == "optuna" else None,
                                  scheduler=_scheduler(spec, total_steps, seed),
                                  search_alg=_search_alg(spec, seed, concurrency), time_budget_s=t.time_budget_s)
    trainable = tune.with_resources(trial, {"CPU": DRIVER_CPUS})
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=tune_path, storage_filesystem=fs, verbose=0,
                                callbacks=[_callback(spec, total_steps)],
                                failure_config=tune.FailureConfig(max_failures=0))
    experiment = storage.join(run, TUNE_DIR)
    if tune.Tuner.can_restore(experiment):
        print(f"search: resuming from {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space=_param_space(spec))
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(spec), tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    ended = results.num_terminated + results.num_errors
    if ended < len(results):
        # Tune ends its run gracefully on a stop signal (`launch cancel`, Ctrl-C in the job)
        # and returns; the search is not over: no summary, no result.json.
        print(f"search: interrupted with {ended} of {len(results)} trial(s) ended; its state is in {experiment}: "
              "the same command continues it", flush=True)
        return None
    return summarize(spec, run, results, total_steps)


def data_variants(spec: AnyRun) -> list[dict[str, Any]]:
    """Every distinct combination of the searched `data.*` values (each a choice or grid:
    the data is prepared once for each before the trials start); [{}] when none is searched."""
    space = {p: d for p, d in spec.tune.search_space.items() if p.startswith("data.")}
    return [dict(zip(space, combo)) for combo in itertools.product(*(d.args for d in space.values()))]


def _data_key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)


# ---------------------------------------------------------------- one trial

POINTER = "pointer.json"  # what a trial's Tune checkpoint holds: where its Train checkpoint is
EXPLOITS = "exploits.jsonl"  # a trial's PBT exploits, one JSON line each
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def _run_trial(spec: AnyRun, trial_run: str, prepared: data.Prepared, per_epoch: int, total_steps: int,
               start: str | None, trial_id: str, metric: str) -> None:
    """The trial's run through `entry.fit`, with every report of its rank 0 passed on to Tune,
    and a Tune checkpoint beside each: a pointer to the run's newest Train checkpoint.

    Tune's own `TuneReportCallback` passes metrics only, so PBT never finds a checkpoint to
    copy and a restored search cannot tell a trial where to go on from. Here the run reports
    to a queue from its controller, and this function (the trial) reports to Tune."""
    import threading

    from ray import tune
    from ray.util.queue import Empty, Queue

    from trainers import entry

    # Our manifests decide what a run resumes from; Ray Train's snapshot of an earlier run in
    # this directory would hand its own choice to the workers (or fail on checkpoints our
    # retention deleted).
    storage.delete(storage.join(trial_run, "checkpoints", SNAPSHOT))
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            if spec.method == "ppo":  # its own actor groups: it reports each iteration itself
                from trainers import ppo

                ppo.run(spec, trial_run, prepared, start, report=reports.put, tags={"trial": trial_id})
            else:
                entry.fit(spec, trial_run, prepared, per_epoch, total_steps, start, trial=trial_id,
                          callbacks=[_forwarder(reports)])
        except BaseException as e:  # raised again in the trial, where Tune sees it
            outcome["error"] = e

    runner = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    runner.start()
    newest, final = start, None
    while True:
        try:
            metrics = reports.get(timeout=1.0)
        except Empty:
            if runner.is_alive() or not reports.empty():
                continue
            break
        if metrics.pop("_checkpoint", False):
            # Rank 0 writes the manifest after the report: Tune (PBT, a pause) may act on
            # this report at once, so it hears of the checkpoint only once it is complete.
            reported = storage.join(trial_run, "checkpoints", checkpoint.step_dir_name(metrics["step"]))
            newest = _await_complete(reported) or newest
        if metric not in metrics:
            # A checkpoint between evaluations: Tune wants the metric in every result (and
            # ASHA would compare a stale one); the next evaluation carries this checkpoint.
            continue
        metrics.setdefault("total_steps", total_steps)  # this trial's: its data decides it
        if metrics["step"] >= total_steps:
            # Held until the run has exported its model: at its last step the scheduler ends
            # the trial (ASHA at max_t), and Tune would stop it in the middle of the export.
            final = metrics
            continue
        tune.report(metrics, checkpoint=_pointer(newest, metrics["step"]) if newest else None)
    runner.join()
    if "error" in outcome:
        raise outcome["error"]
    if final is not None:
        tune.report(final, checkpoint=_pointer(newest, total_steps) if newest else None)
    elif newest:
        # It had already finished (a PBT pause at its last step, or a search killed before
        # Tune recorded the end): nothing was trained or reported this time. Its final
        # checkpoint's manifest holds what it measured there.
        manifest = json.loads(storage.read_text(storage.join(newest, checkpoint.MANIFEST)) or "{}")
        final = {**manifest.get("metrics", {}), "total_steps": total_steps}
        if final.get("step") == total_steps and metric in final:
            tune.report(final, checkpoint=_pointer(newest, total_steps))


def _forwarder(queue):
    """A Ray Train callback (it runs in the run's controller) that puts rank 0's metrics of
    every report on `queue`, marking those that came with a checkpoint."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            self.queue.put({**metrics[0], "_checkpoint": checkpoint is not None})

    return ForwardReports(queue)


def _pointer(train_checkpoint: str, step: int):
    import tempfile

    from ray import tune

    local = tempfile.mkdtemp(prefix="tune-pointer-")
    with open(os.path.join(local, POINTER), "w") as f:
        json.dump({"checkpoint": train_checkpoint, "reported_at_step": step}, f)
    return tune.Checkpoint.from_directory(local)


def start_point(trial_run: str, tune_checkpoint) -> tuple[str | None, str | None]:
    """(the Train checkpoint this trial starts from, the donor trial's run when PBT made it
    copy another trial). A checkpoint of its own: the newest complete one (a restored
    search); of another trial: the one Tune handed over, or that trial's newest complete one
    if retention has since replaced it."""
    pointer = None
    if tune_checkpoint is not None:
        with tune_checkpoint.as_directory() as local:
            with open(os.path.join(local, POINTER)) as f:
                pointer = json.load(f)["checkpoint"]
    own_dir = storage.join(trial_run, "checkpoints")
    if pointer is None or pointer.startswith(own_dir + "/"):
        own = checkpoint.complete_checkpoints(trial_run)
        return (own[-1] if own else None), None
    donor_run = pointer.rsplit("/checkpoints/", 1)[0]
    found = pointer if checkpoint.is_complete(pointer) else (checkpoint.complete_checkpoints(donor_run) or [None])[-1]
    if found is None:
        raise RuntimeError(f"population-based training: trial {os.path.basename(donor_run)} has no complete "
                           f"checkpoint to copy ({pointer} is gone)")
    storage.delete(own_dir)  # this trial's own line of checkpoints ends here
    return found, donor_run


def _await_complete(ckpt: str, timeout_s: float = 120.0) -> str | None:
    """`ckpt` once its manifest is written; None if it is gone or never completes."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if checkpoint.is_complete(ckpt):
            return ckpt
        if not storage.exists(ckpt):
            return None
        time.sleep(1.0)
    return None


def record_exploit(trial_run: str, trial_id: str, donor_run: str, ckpt: str, values: dict[str, Any]) -> None:
    """An exploit, for the user (a trial event line) and for the results (exploits.jsonl)."""
    step = int(ckpt.rstrip("/").rsplit("_", 1)[1])
    entry = _event("exploited", trial_id, donor=os.path.basename(donor_run), step=step, config=values)
    uri = storage.join(trial_run, EXPLOITS)
    storage.write_text(uri, (storage.read_text(uri) or "") + json.dumps(entry, default=str) + "\n")


def exploits(trial_run: str) -> list[dict[str, Any]]:
    text = storage.read_text(storage.join(trial_run, EXPLOITS)) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _param_space(spec: AnyRun) -> dict[str, Any]:
    # A mutated path outside the search space starts from a sample of its mutation.
    space = {**spec.tune.mutations(), **spec.tune.search_space}
    return {path: ray_distribution(d) for path, d in space.items()}


def _scheduler(spec: AnyRun, total_steps: int, seed: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.tune.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=s.max_t or total_steps, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        import random

        random.seed(seed)  # PBT draws its donors and mutations from `random`
        # A choice is moved one place left or right; a range is multiplied by 0.8 or 1.2.
        mutations = {p: (list(d.args) if d.kind == "choice" else ray_distribution(d))
                     for p, d in spec.tune.mutations().items()}
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations, quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=s.synch,
                                       log_config=False)
    return FIFOScheduler()


def _search_alg(spec: AnyRun, seed: int, concurrency: int):
    if spec.tune.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))  # Tune bounds a Searcher's concurrency
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores max_concurrent_trials for this one: it bounds itself.
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


# ---------------------------------------------------------------- the end of a search

def summarize(spec: AnyRun, run: str, results, total_steps: int) -> dict[str, Any]:
    t = spec.tune
    paths = t.paths()
    better = min if t.mode == "min" else max
    rows = []
    for r in results:
        history = _history(r, t.metric)
        values = [v for _, v in history]
        trial_id = _trial_id(r)
        rows.append({
            "trial": trial_id,
            "exploits": "; ".join(f"step {e['step']} from {e['donor']}"
                                  for e in exploits(storage.join(run, TRIALS_DIR, trial_id))),
            **{p: r.config.get(p) for p in paths},
            "steps": (r.metrics or {}).get("step", 0),
            f"best_{t.metric}": better(values) if values else None,
            f"last_{t.metric}": values[-1] if values else None,
            "status": "errored" if r.error else ("completed" if (r.metrics or {}).get("step", 0)
                                                 >= (r.metrics or {}).get("total_steps", total_steps)
                                                 else "stopped early"),
            "history": history,
        })
    ranked = sorted([row for row in rows if row[f"best_{t.metric}"] is not None],
                    key=lambda row: row[f"best_{t.metric}"], reverse=t.mode == "max")
    ranked += [row for row in rows if row[f"best_{t.metric}"] is None]
    tune_dir = storage.join(run, TUNE_DIR)
    storage.write_text(storage.join(tune_dir, "results.csv"), _csv(ranked, paths, t.metric))
    _plot(ranked, t.metric, storage.join(tune_dir, "trials.png"))
    print(_table(ranked, paths, t.metric), flush=True)
    summary: dict[str, Any] = {"status": "completed", "run": run, "trials": len(rows), "total_steps": total_steps,
                               "results": storage.join(tune_dir, "results.csv")}
    completed = [row for row in ranked if row["status"] == "completed"]
    if not completed:
        summary["status"] = "no trial completed"
        return summary
    best = completed[0]
    best_spec = trial_spec(spec.model_dump(mode="json"), {p: best[p] for p in paths}).model_dump(mode="json")
    best_spec.pop("tune", None)
    best_spec["checkpoint"]["resume"] = "never"
    storage.write_text(storage.join(run, "best.yaml"),
                       f"# best trial {best['trial']} of {run}: {t.metric} {best[f'best_{t.metric}']}\n"
                       + yaml.safe_dump(best_spec, sort_keys=False))
    trial_run = storage.join(run, TRIALS_DIR, best["trial"])
    for part in ("model", "adapter"):
        if storage.exists(storage.join(trial_run, part)):
            _copy_tree(storage.join(trial_run, part), storage.join(run, part))
            summary[part] = storage.join(run, part)
    summary.update(best_trial=best["trial"], best_config={p: best[p] for p in paths},
                   best_metric=best[f"best_{t.metric}"], metric=t.metric, best_spec=storage.join(run, "best.yaml"))
    print(f"best trial {best['trial']}: {t.metric} {best[f'best_{t.metric}']:.6g} with "
          + ", ".join(f"{p}={best[p]}" for p in paths), flush=True)
    return summary


def _trial_id(result) -> str:
    """The id trials name their run directory by (tune.get_context().get_trial_id()): in every
    reported result; else from Tune's directory `<trainable>_<id>_<index>_<config...>`."""
    if result.metrics and result.metrics.get("trial_id"):
        return result.metrics["trial_id"]
    parts = os.path.basename(result.path.rstrip("/")).split("_")
    return "_".join(parts[1:3]) if len(parts) > 2 else parts[-1]


def _history(result, metric: str) -> list[tuple[int, float]]:
    df = result.metrics_dataframe
    if df is None or metric not in df or "step" not in df:
        return []
    rows = df[["step", metric]].dropna()
    return [(int(s), float(v)) for s, v in zip(rows["step"], rows[metric]) if not math.isnan(float(v))]


def _csv(rows, paths, metric) -> str:
    out = io.StringIO()
    fields = ["rank", "trial", *paths, "steps", f"best_{metric}", f"last_{metric}", "status", "exploits"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for i, row in enumerate(rows, 1):
        writer.writerow({"rank": i, **row})
    return out.getvalue()


def _table(rows, paths, metric) -> str:
    exploited = any(r["exploits"] for r in rows)
    head = ["#", "trial", *paths, "steps", f"best {metric}", "status", *(["exploits"] if exploited else [])]
    body = [[str(i), r["trial"], *(_fmt(r[p]) for p in paths), str(r["steps"]), _fmt(r[f"best_{metric}"]),
             r["status"], *([r["exploits"] or "-"] if exploited else [])] for i, r in enumerate(rows, 1)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    return "search results:\n" + "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _plot(rows, metric: str, uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["history"]:
            steps, values = zip(*r["history"])
            ax.plot(steps, values, marker="o", linestyle="--" if r["status"] == "stopped early" else "-",
                    label=f"{r['trial']} ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early)")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fs, path = storage.filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue())


def _copy_tree(src: str, dst: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(src, tmp)
        storage.upload_dir(tmp, dst)
