"""Turn a job's log stream into what a person (or a program) reads.

Workers print `LLMLAUNCH_PROGRESS {json}` lines. On a terminal they drive a Rich progress
bar; otherwise each becomes one plain line; with `--json` every line is a JSON event.

What a person reads is the same on a terminal and in plain mode (logs redirected, CI), and the
same for `launch logs` of a past job as for `launch run` / `launch logs -f`: one line per event.

* Ray's bookkeeping (`_NOISE`: job start, dataset execution, worker-group placement, Ray Train's
  per-report lines, log-deduplication summaries, ...) is hidden.
* A message that another process of the same actor class already printed (the same line from
  every rank) is shown once; the same process printing it again is a real repeat and is shown.
  Only the last `_REMEMBER` messages are remembered.
* Our own lines (`_OURS`: `run ...`, `data: ...`, `model: ...`, `checkpoint saved: ...`, ...) are
  shown without Ray's `(RayTrainWorker pid=N) ` prefix, and never hidden.

A user error found inside the job (`LLMLAUNCH_ERROR {json}`, trainers.user_errors) is not
printed here: it is kept in `error` for the launcher to report as `error: ...` (exit 2).

`verbose=True` (`--verbose`) turns all of that off: every line as the job printed it. `--json`
never hides or changes a line (programs filter for themselves); markers become progress events.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from trainers import user_errors

MARKER = "LLMLAUNCH_PROGRESS "  # trainers.sft.PROGRESS; not imported: that module needs torch
ERROR_MARKER = user_errors.MARKER  # a user error found inside the job: kept for the launcher to report
TRIAL_MARKER = "LLMLAUNCH_TRIAL "  # trainers.tune.TRIAL_MARKER: one line per trial event of a search
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray's prefix on what its workers print: "(RayTrainWorker pid=3344) ", "(RayTrainWorker pid=3344, ip=10.0.0.2) ",
# "(MapBatches(_tokenize_batch) pid=7) ", "(pid=7) ".
_PREFIX = re.compile(r"\((?:(?P<actor>[^\s()]+(?:\([^()]*\))?) )?pid=(?P<pid>\d+)(?:, ip=(?P<ip>[^\s)]+))?\) ")
# Python's logging as Ray formats it: "2026-12-01 18:52:22,527 INFO streaming_executor.py:215 -- ".
_RAY_LOG = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(?:%s) (?:%s)\.py:\d+ -- "


def _ray_log(level: str, modules: str, message: str = "") -> str:
    return "^" + _RAY_LOG % (level, modules) + message


# Ray's own bookkeeping, one family a line; matched against a line without its Ray prefix.
_NOISE_FAMILIES: list[tuple[str, str]] = [
    # Submission: the job SDK uploading the working dir (printed by the client, here for completeness) and the
    # job supervisor starting the entrypoint.
    ("package upload", _ray_log("INFO", "dashboard_sdk|packaging")),
    ("runtime env", _ray_log("INFO", "job_manager", r"Runtime env is setting up")),
    ("entrypoint", r"^Running entrypoint for job \S+: "),
    # ray.init() in the entrypoint.
    ("ray.init", _ray_log("INFO", "worker", r"Connect(?:ing to existing|ed to) Ray cluster")),
    # Ray Data running a dataset: on the driver with a logging timestamp, in the SplitCoordinator actor without.
    ("dataset execution", r"^(?:" + _RAY_LOG % ("INFO|WARNING", r"\w+") + r")?(?:"
                          r"Starting execution of Dataset \S+\. Full logs are in "
                          r"|Execution plan of Dataset \S+: "
                          r"|\S*\s*Dataset \S+ execution finished in [\d.]+ seconds"
                          r"|Progress bars disabled\. To enable, set )"),
    ("ray data info", _ray_log("INFO", "streaming_executor|dataset|logging|split")),  # e.g. "Tip: Use take_batch()"
    # Ray Train's controller placing the worker group, and each worker joining the process group.
    ("worker group", r"^(?:Requesting resources: "
                     r"|Attempting to start training worker group of size \d+"
                     r"|Started training worker group of size \d+:"
                     r"|- \(ip=\S+, pid=\d+\) world_rank=\d+, local_rank=\d+, node_rank=\d+$)"),
    ("process group", r"^Setting up process group for: "),
    # Known warnings of Ray's own that say nothing about the run (the second one is followed by its source line).
    ("PreemptionWatcher", r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' "
                          r".* has constructor arguments in the object store"),
    ("exclude_resources", r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated"),
    # DeepSpeed starting up on each rank.
    ("accelerator", r"\[real_accelerator\.py:\d+:get_accelerator\] Setting (?:ds_)?accelerator to "),
    ("shm comm op", r"^DeepSpeed deepspeed\.ops\.comm\.deepspeed_shm_comm_op built successfully$"),
    # Ray Train's per-report lines, from every rank (ours say "checkpoint saved: step N" once).
    ("train report", r"^(?:Checkpoint successfully created at\b|Reporting training result \d+: )"),
    # Ray Tune and Train around the trials of a search (trial events are ours: LLMLAUNCH_TRIAL lines).
    ("tune state", _ray_log("INFO", "tune", r"Wrote the latest version of all result files")),
    ("train pg cleanup", r"^Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group"),
    ("tune banner", r"^[╭│├╰]|^View detailed results here: |^To visualize your results with TensorBoard, run: "),
    ("tune restore", r"^Restored on \S+ from checkpoint: Checkpoint\("),
    # PBT's own account of an exploit (ours is the trial line "exploited trial ...").
    ("pbt", _ray_log("INFO", "pbt") + r"|^\[PopulationBasedTraining\] |^\S+ : \S+ --- \(.*\) --> \S+$"),
    ("pbt actors", r"tune\.py:\d+: UserWarning: Consider boosting PBT performance by enabling `reuse_actors`"),
    # Trials' drivers reserve half a CPU: Ray warns that many workers start on a small node.
    ("worker startup", r"WARNING: \d+ PYTHON worker processes have been started on node: "),
    # Ray's log deduplication: a summary of a line it already printed once, and its notice.
    ("log dedup", r"\[repeated \d+x across cluster\]|Ray deduplicates logs by default|configure-logging\.html"
                  r"|^RAY_DEDUP_LOGS"),
]
_NOISE = re.compile("|".join(f"(?:{regex})" for _, regex in _NOISE_FAMILIES))
# Blocks of lines Ray prints (start, end), each from one source: held back, and dropped once
# the end comes. A trial's process that Tune stops (ASHA, a PBT pause) dies of SIGTERM while
# Python tidies up: "Exception ignored in: ..." and a traceback that ends "SystemExit: 1".
# The trial's Ray Train controller then reports its workers' deaths ("[FailurePolicy] RAISE"
# and the WorkerGroupError, or a failed backend shutdown), each ending in the line that says
# their owner died.
_OWNER_DIED = re.compile(r"^The actor is dead because its owner has died\.")
_BLOCKS = [(re.compile(r"^Exception ignored in: <function WeakSet\.__init__\.<locals>\._remove"),
            re.compile(r"^SystemExit: \d+$")),
           (re.compile(r"^\[FailurePolicy\] RAISE$"), _OWNER_DIED),
           (re.compile(r"^ray\.train\.WorkerGroupError: Training failed due to worker errors:$"), _OWNER_DIED),
           (re.compile(r"^Graceful shutdown of backend failed\. This is expected if one of the workers has crashed\.$"),
            _OWNER_DIED),
           # A worker of the stopped trial, cut off in the middle of a report: shown unless
           # it ends in the placement group's removal (a real error ends otherwise).
           (re.compile(r"^Error in training function:$"),
            re.compile(r"Destroying worker since its placement group was removed\.|because its owner has died\."))]
_BLOCK_LINES = 60  # a block longer than this is not the one expected: shown as it is
# A Python warning ("path.py:12: SomeWarning: text"): the line after it is its source line, indented.
_WARNING = re.compile(r"\.py:\d+: \w*Warning: ")
# Our own lines (trainers/entry.py, trainers/sft.py): shown without Ray's prefix, never hidden, never deduplicated.
_OURS = re.compile(r"^(?:run \S+ -> |data(?: \(.*?\))?: .*packing efficiency|model: [\d,]+ parameters|checkpoint saved: step \d+$"
                   r"|model exported to |done: model at |resuming from |error: )")
_REMEMBER = 256  # messages remembered to tell one rank's line from the same line of another rank
_NONE = object()  # no source: unprefixed lines have source None


def describe_trial(event: dict[str, Any]) -> str:
    trial, kind = event.get("trial"), event.get("event")
    value = f"{event.get('metric', 'metric')} {event['value']:.4f}" if isinstance(event.get("value"), float) else ""
    if kind == "started":
        return f"trial {trial} started: " + "  ".join(f"{k}={_short(v)}" for k, v in (event.get("config") or {}).items())
    if kind == "result":
        return f"trial {trial} step {event.get('step')}: {value}"
    if kind == "stopped":
        return f"trial {trial} stopped early by the scheduler at step {event.get('step')}"
    if kind == "finished":
        return f"trial {trial} finished at step {event.get('step')}"
    if kind == "exploited":
        return (f"trial {trial} exploited trial {event.get('donor')}: goes on from its step {event.get('step')} with "
                + "  ".join(f"{k}={_short(v)}" for k, v in (event.get("config") or {}).items()))
    if kind == "errored":
        return f"trial {trial} errored: {event.get('error', '')}"
    return f"trial {trial} {kind}"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(event: dict[str, Any]) -> str:
    if "trial" in event:
        return f"trial {event['trial']} " + describe({k: v for k, v in event.items() if k != "trial"})
    if is_eval(event):
        # A method's own eval metrics (a task's loss, an accuracy, a reward) after the loss.
        extra = "".join(f"  {k.removeprefix('eval_')} {_short(v)}" for k, v in event.items()
                        if k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity")
                        and not k.endswith("_perplexity") and isinstance(v, (int, float)))
        perplexity = f" (perplexity {event['eval_perplexity']:.2f})" if "eval_perplexity" in event else ""
        loss = f" loss {event['eval_loss']:.4f}{perplexity}" if "eval_loss" in event else ""
        return f"step {event['step']}: eval{loss}{extra}"
    rl = (f"  reward {event['reward_mean']:.4f} (std {event['reward_std']:.3f})  kl {event['kl']:.4f}"
          if "reward_mean" in event else "")  # ppo
    return (f"step {event['step']}/{event['total_steps']}  loss {event['loss']:.4f}{rl}  lr {event['lr']:.2e}  "
            f"{event['tokens_per_s']:,.0f} tok/s")


def is_eval(event: dict[str, Any]) -> bool:
    return any(k.startswith("eval_") for k in event)


class JobOutput:
    """Feed it log text in arbitrary chunks; call close() at the end."""

    def __init__(self, console: Console | None = None, *, json_mode: bool = False, verbose: bool = False):
        self.console = console or Console(stderr=False)
        self.json_mode = json_mode
        self.tty = self.console.is_terminal and not json_mode
        self.hide_noise = not json_mode and not verbose
        self.verbose = verbose
        self.buffer = ""
        self.events: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None  # {"message", "hint"} of a user error the job reported
        self.progress: Progress | None = None
        self.live: Live | None = None  # a search's table of trials, on a terminal
        self.trials: dict[str, dict[str, Any]] = {}  # trial -> its row in that table
        self.task = None
        self._shown: OrderedDict[tuple[str, str], tuple[str, str | None]] = OrderedDict()  # (actor, msg) -> pid, ip
        self._warned: object = _NONE  # the source whose last line was a hidden Python warning
        self._hid: object = _NONE  # the source whose last line was hidden
        self._held: dict[Any, tuple[re.Pattern, list[str]]] = {}  # source -> (end of its block, lines so far)

    def feed(self, text: str) -> None:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self.buffer:
            self._line(self.buffer)
            self.buffer = ""
        for _, lines in self._held.values():  # a block the log ended in: shown as it was
            for line in lines:
                shown = self._readable(line)
                if shown is not None:
                    self._print(shown)
        self._held.clear()
        if self.progress is not None:
            self.progress.stop()
        if self.live is not None:
            self.live.stop()

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r")
        if MARKER in line:
            try:
                event = json.loads(line.split(MARKER, 1)[1])
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and "step" in event and ("loss" in event or is_eval(event)):
                self.events.append(event)
                if "trial" in event and not self.json_mode and not (self.verbose and not self.tty):
                    return  # a search: its trials' steps are summarised by their trial lines
                return self._progress(event)
        if TRIAL_MARKER in line:
            try:
                event = json.loads(line.split(TRIAL_MARKER, 1)[1])
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and "trial" in event:
                self.events.append({"trial_event": event})
                if self.json_mode:
                    print(json.dumps({"event": "trial", **event}, default=str), flush=True)
                else:
                    self._print(describe_trial(event))
                    if self.tty:
                        self._table(event)
                return
        if ERROR_MARKER in line:
            try:
                error = json.loads(line.split(ERROR_MARKER, 1)[1])
            except json.JSONDecodeError:
                error = None
            if isinstance(error, dict) and "message" in error:
                self.error = error  # the launcher prints it as `error: ...` and exits 2
                if self.json_mode:
                    print(json.dumps({"event": "error", **error}), flush=True)
                return
        if self.json_mode:
            print(json.dumps({"event": "log", "line": line}), flush=True)
            return
        for shown in (self._unblocked(line) if self.hide_noise else [line]):
            shown = self._readable(shown) if self.hide_noise else shown
            if shown is not None:
                self._print(shown)

    def _unblocked(self, line: str) -> list[str]:
        """The lines to go on with: a block of Ray's (see _BLOCKS) is held back until it
        ends, then dropped; one that does not end as expected is let through as it was."""
        prefix = _PREFIX.match(line)
        message = line[prefix.end():] if prefix else line
        source = prefix.group("actor", "pid", "ip") if prefix else None
        held = self._held.get(source)
        if held is None:
            for start, end in _BLOCKS:
                if start.search(message):
                    self._held[source] = (end, [line])
                    return []
            return [line]
        end, lines = held
        lines.append(line)
        if end.search(message):
            del self._held[source]
            self._hid = source  # a blank line after it belongs to it
            return []
        if len(lines) > _BLOCK_LINES:
            del self._held[source]
            return lines
        return []

    def _readable(self, line: str) -> str | None:
        """The line as a person reads it, or None where it is bookkeeping or another rank's copy."""
        prefix = _PREFIX.match(line)
        message = line[prefix.end():] if prefix else line
        source = prefix.group("actor", "pid", "ip") if prefix else None
        warned = self._warned == source  # this source's last line was a hidden Python warning
        if warned:
            self._warned = _NONE
        if _OURS.match(message):
            return message
        if warned and message[:1].isspace():
            return None  # the source line of the warning just hidden
        if _NOISE.search(message) or (not message.strip() and self._hid == source):
            if _WARNING.search(message):
                self._warned = source
            self._hid = source  # a blank line after it belongs to it
            return None
        self._hid = _NONE
        if prefix and message.strip():
            key, origin = (prefix["actor"] or "", message), (prefix["pid"], prefix["ip"])
            if self._shown.get(key, origin) != origin:
                return None  # the same message from another process of this actor class: another rank's copy
            self._shown[key] = origin
            self._shown.move_to_end(key)
            if len(self._shown) > _REMEMBER:
                self._shown.popitem(last=False)
        return line

    def _print(self, text: str) -> None:
        # While the bar is live, Rich prints above it.
        self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def _table(self, event: dict[str, Any]) -> None:
        """The live table of a search's trials below the trial lines: values, step, latest
        metric, state. Rich prints the lines above it while it is live."""
        row = self.trials.setdefault(event["trial"], {"config": {}, "step": 0, "value": None, "state": ""})
        kind = event.get("event")
        if event.get("config"):
            row["config"] = event["config"]
        if event.get("step") is not None:
            row["step"] = event["step"]
        if isinstance(event.get("value"), float):
            row["value"], row["metric"] = event["value"], event.get("metric", row.get("metric", "metric"))
        row["state"] = {"started": "running", "result": "running", "stopped": "stopped early",
                        "finished": "finished", "errored": "errored",
                        "exploited": f"copied {event.get('donor')}"}.get(kind, kind or "")
        paths = list(dict.fromkeys(p for r in self.trials.values() for p in r["config"]))
        metric = next((r["metric"] for r in self.trials.values() if "metric" in r), "metric")
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ["trial", *paths, "step", metric, "state"]:
            table.add_column(column, justify="right" if column in ("step", metric) else "left")
        for trial, r in self.trials.items():
            table.add_row(trial, *(_short(r["config"].get(p, "")) for p in paths), str(r["step"]),
                          "-" if r["value"] is None else f"{r['value']:.4f}", r["state"])
        if self.live is None:
            self.live = Live(table, console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        else:
            self.live.update(table, refresh=True)

    def _progress(self, event: dict[str, Any]) -> None:
        if self.json_mode:
            print(json.dumps({"event": "progress", **event}), flush=True)
            return
        if not self.tty or is_eval(event):
            self._print(describe(event))
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("", total=event["total_steps"])
        self.progress.update(self.task, completed=event["step"],
                             description=f"loss {event['loss']:.4f}  {event['tokens_per_s']:,.0f} tok/s")
