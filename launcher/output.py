"""Turn a job's log stream into what a person (or a program) reads.

Workers print `LLMLAUNCH_PROGRESS {json}` lines. On a terminal they drive a Rich progress
bar; otherwise each becomes one plain line; with `--json` every line is a JSON event.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

MARKER = "LLMLAUNCH_PROGRESS "  # trainers.sft.PROGRESS; not imported: that module needs torch
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray's own bookkeeping, hidden on a terminal (never from `launch logs`, --json or pipes).
_NOISE = re.compile(
    r"^\((SplitCoordinator|DatasetManager|_StatsActor|AutoscalingRequester)\b"
    r"|Reporting training result \d+|Checkpoint successfully created at"
    r"|INFO (streaming_executor|dataset|logging|split)\.py"
    r"|Ray deduplicates logs by default|configure-logging\.html|^RAY_DEDUP_LOGS"
)


def describe(event: dict[str, Any]) -> str:
    if "eval_loss" in event:
        return f"step {event['step']}: eval loss {event['eval_loss']:.4f} (perplexity {event['eval_perplexity']:.2f})"
    return (f"step {event['step']}/{event['total_steps']}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
            f"{event['tokens_per_s']:,.0f} tok/s")


class JobOutput:
    """Feed it log text in arbitrary chunks; call close() at the end."""

    def __init__(self, console: Console | None = None, *, json_mode: bool = False, verbose: bool = False):
        self.console = console or Console(stderr=False)
        self.json_mode = json_mode
        self.tty = self.console.is_terminal and not json_mode
        self.hide_noise = self.tty and not verbose
        self.buffer = ""
        self.events: list[dict[str, Any]] = []
        self.progress: Progress | None = None
        self.task = None

    def feed(self, text: str) -> None:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self.buffer:
            self._line(self.buffer)
            self.buffer = ""
        if self.progress is not None:
            self.progress.stop()

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r")
        if MARKER in line:
            try:
                event = json.loads(line.split(MARKER, 1)[1])
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and "step" in event and ("loss" in event or "eval_loss" in event):
                self.events.append(event)
                return self._progress(event)
        if self.hide_noise and _NOISE.search(line):
            return
        if self.json_mode:
            print(json.dumps({"event": "log", "line": line}), flush=True)
        elif self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, emoji=False)
        else:
            self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def _progress(self, event: dict[str, Any]) -> None:
        if self.json_mode:
            print(json.dumps({"event": "progress", **event}), flush=True)
            return
        if not self.tty:
            self.console.print(describe(event), markup=False, highlight=False, emoji=False)
            return
        if "eval_loss" in event:
            target = self.progress.console if self.progress else self.console
            target.print(describe(event), markup=False)
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("", total=event["total_steps"])
        self.progress.update(self.task, completed=event["step"],
                             description=f"loss {event['loss']:.4f}  {event['tokens_per_s']:,.0f} tok/s")

