"""launcher.output.JobOutput: log chunks -> lines, progress markers -> plain lines or JSON."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest
from rich.console import Console

from launcher.output import MARKER, JobOutput, describe

EVENT = {"step": 3, "total_steps": 30, "loss": 1.23456, "lr": 0.0001, "tokens_per_s": 12345.6}
EVAL = {"step": 10, "eval_loss": 2.0, "eval_perplexity": 7.389056}
LONG = "w" * 150 + " end"  # longer than the console's 80 columns: must not be wrapped

LOG = (
    "starting\n"
    "\x1b[36m(RayTrainWorker pid=123)\x1b[0m loading model\r\n"
    f"\x1b[36m(RayTrainWorker pid=123)\x1b[0m {MARKER}{json.dumps(EVENT)}\n"
    f"{LONG}\n"
    "\n"
    f"{MARKER}{json.dumps(EVAL)}\n"
    "\x1b[1;31mERROR\x1b[0m something [bold]odd[/bold]\n"
    "no newline at the end"
)
EXPECTED = [
    "starting",
    "(RayTrainWorker pid=123) loading model",
    "step 3/30  loss 1.2346  lr 1.00e-04  12,346 tok/s",
    LONG,
    "",
    "step 10: eval loss 2.0000 (perplexity 7.39)",
    "ERROR something [bold]odd[/bold]",
    "no newline at the end",
]


def plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def render(chunks: list[str]) -> list[str]:
    console = plain_console()
    out = JobOutput(console)
    assert not out.tty
    for chunk in chunks:
        out.feed(chunk)
    out.close()
    text = console.file.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_whole_text_gives_the_expected_lines():
    assert render([LOG]) == EXPECTED


def test_every_single_split_point_gives_the_same_lines():
    for i in range(len(LOG) + 1):
        assert render(split_at(LOG, [i])) == EXPECTED, f"split at {i}: {LOG[max(0, i - 5):i + 5]!r}"


def test_character_by_character_and_random_chunks_give_the_same_lines():
    assert render(list(LOG)) == EXPECTED
    rng = random.Random(0)
    for _ in range(50):
        cuts = rng.sample(range(len(LOG)), rng.randint(1, 20))
        assert render(split_at(LOG, cuts)) == EXPECTED, cuts


def test_progress_events_are_recorded():
    out = JobOutput(plain_console())
    out.feed(LOG)
    out.close()
    assert out.events == [EVENT, EVAL]


def test_nothing_is_printed_for_a_partial_line_until_close():
    console = plain_console()
    out = JobOutput(console)
    out.feed("partial")
    assert console.file.getvalue() == ""
    out.feed(" line")
    out.close()
    assert console.file.getvalue() == "partial line\n"


def test_malformed_progress_json_is_printed_as_a_plain_line():
    bad = f"{MARKER}{{\"step\": 3, \"loss\": "  # cut off
    assert render([f"{bad}\nafter\n"]) == [bad, "after"]


@pytest.mark.parametrize("payload", ["42", "[1, 2]", '{"step": 1}'])
def test_progress_json_that_is_not_an_event_is_printed_as_a_plain_line(payload):
    assert render([f"{MARKER}{payload}\nafter\n"]) == [f"{MARKER}{payload}", "after"]


def test_markup_and_ansi_are_not_interpreted():
    line = "\x1b[32mok\x1b[0m [red]not red[/red] [link=x]y[/link] 1e-4 0.5 'quoted'"
    assert render([line + "\n"]) == ["ok [red]not red[/red] [link=x]y[/link] 1e-4 0.5 'quoted'"]
    console = plain_console()
    out = JobOutput(console)
    out.feed(line + "\n")
    out.close()
    assert "\x1b" not in console.file.getvalue()


def test_emoji_codes_in_log_lines_are_printed_verbatim():
    assert render(["accuracy:100: done :smile:\n"]) == ["accuracy:100: done :smile:"]


def test_json_mode_prints_one_json_event_per_line(capsys):
    console = plain_console()
    out = JobOutput(console, json_mode=True)
    assert not out.tty
    for chunk in split_at(LOG, [7, 50, 51, 200]):
        out.feed(chunk)
    out.close()
    assert console.file.getvalue() == ""  # everything goes to stdout as JSON
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]
    assert events == [
        {"event": "log", "line": "starting"},
        {"event": "log", "line": "(RayTrainWorker pid=123) loading model"},
        {"event": "progress", **EVENT},
        {"event": "log", "line": LONG},
        {"event": "log", "line": ""},
        {"event": "progress", **EVAL},
        {"event": "log", "line": "ERROR something [bold]odd[/bold]"},
        {"event": "log", "line": "no newline at the end"},
    ]


def test_json_mode_malformed_progress_is_a_log_event(capsys):
    out = JobOutput(plain_console(), json_mode=True)
    out.feed(f"{MARKER}not json\n")
    out.close()
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == [
        {"event": "log", "line": f"{MARKER}not json"}]
    assert out.events == []


# ---- a real plain-mode log of the quickstart (`launch configs/examples/quickstart.yaml > log 2>&1`), job part only

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "logs" / "quickstart_plain.log"
CAPTURED = FIXTURE.read_text().split("\n")[:-1]  # the lines as the old launcher printed them, nothing hidden
RANK0 = "(RayTrainWorker pid=3344) "  # rank 0 prints the progress markers
_STEP = re.compile(r"step (\d+)/(\d+)  loss ([\d.]+)  lr ([\d.e+-]+)  ([\d,]+) tok/s")
_EVAL = re.compile(r"step (\d+): eval loss ([\d.]+) \(perplexity ([\d.]+)\)")

# Ray's bookkeeping in that log, one family each: none of it may reach a person unless --verbose.
BOOKKEEPING = [
    "Runtime env is setting up", "Running entrypoint for job", "Connecting to existing Ray cluster",
    "Connected to Ray cluster", "Starting execution of Dataset", "Execution plan of Dataset", "execution finished in",
    "Progress bars disabled", "Tip: Use `take_batch()`", "Requesting resources", "Attempting to start training worker",
    "Started training worker group", "world_rank=", "Setting up process group", "PreemptionWatcher",
    "RayDeprecationWarning", "self.exclude_resources = exclude_resources", "Setting accelerator to CPU",
    "deepspeed_shm_comm_op built successfully", "Checkpoint successfully created", "Reporting training result",
    "across cluster]", "Ray deduplicates logs",
]
_OURS = re.compile(r"(\(RayTrainWorker pid=\d+\) )?((run|data:|model:|checkpoint saved:|model exported|done:) .*)")


def job_log(lines: list[str]) -> str:
    """The log the job wrote: the plain-mode step lines back into the progress markers they were printed from."""
    out = []
    for line in lines:
        if m := _STEP.fullmatch(line):
            event = {"step": int(m[1]), "total_steps": int(m[2]), "loss": float(m[3]), "lr": float(m[4]),
                     "tokens_per_s": float(m[5].replace(",", ""))}
        elif m := _EVAL.fullmatch(line):
            event = {"step": int(m[1]), "eval_loss": float(m[2]), "eval_perplexity": float(m[3])}
        else:
            out.append(line)
            continue
        out.append(f"{RANK0}{MARKER}{json.dumps(event)}")
    return "\n".join(out) + "\n"


def is_bookkeeping(line: str) -> bool:
    return any(family in line for family in BOOKKEEPING)


def ours(line: str) -> str:
    """Our own line as it should be shown: without the Ray prefix."""
    m = _OURS.fullmatch(line)
    return m[2] if m else line


def run(text: str, console: Console, **kwargs) -> JobOutput:
    out = JobOutput(console, **kwargs)
    for i in range(0, len(text), 997):  # in chunks that cut lines
        out.feed(text[i:i + 997])
    out.close()
    return out


def plain(text: str, **kwargs) -> list[str]:
    console = Console(file=io.StringIO(), force_terminal=False, width=80)
    out = run(text, console, **kwargs)
    assert not out.tty
    return console.file.getvalue().split("\n")[:-1]


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def tty(text: str, **kwargs) -> list[str]:
    """What stays on a terminal's rows, less the progress bar's own rows."""
    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    out = run(text, console, **kwargs)
    assert out.tty
    rows = [_ANSI.sub("", row).split("\r")[-1] for row in console.file.getvalue().split("\n")]  # \r + erase-line
    assert rows[-1] == ""
    return [row for row in rows[:-1] if not row.startswith("training ")]


def test_the_fixture_is_the_quickstart_log():
    assert len(CAPTURED) == 96
    assert sum(bool(_STEP.fullmatch(x)) for x in CAPTURED) == 30
    assert sum(bool(_EVAL.fullmatch(x)) for x in CAPTURED) == 1
    assert all(not x.startswith(("starting a local Ray head", "submitted job", "job ")) for x in CAPTURED)


def test_plain_output_hides_rays_bookkeeping():
    shown = plain(job_log(CAPTURED))
    leaked = [line for line in shown if is_bookkeeping(line)]
    assert leaked == []
    assert not any(x.startswith(("(SplitCoordinator", "(DatasetManager", "(TrainController")) for x in shown)


def test_plain_output_is_one_line_per_event_in_order():
    shown = plain(job_log(CAPTURED))
    assert shown == [ours(x) for x in CAPTURED if not is_bookkeeping(x)]
    steps = [x for x in shown if _STEP.fullmatch(x)]
    assert steps == [x for x in CAPTURED if _STEP.fullmatch(x)]
    assert [int(_STEP.fullmatch(x)[1]) for x in steps] == list(range(1, 31))
    assert shown.count("step 30: eval loss 3.7547 (perplexity 42.72)") == 1


def test_each_of_our_own_lines_appears_once_without_the_ray_prefix():
    shown = plain(job_log(CAPTURED))
    expected = [
        "run quickstart/20261201-185214-3176 -> /tmp/llh-dev/runs/quickstart/20261201-185214-3176",
        "data: 111 train sequences of 128 tokens, 6 eval; packing efficiency 99.3% (non-pad tokens), 2,037 loss "
        "tokens; prepared in 10.1s",
        "model: 139,584 parameters, 139,584 trainable; ZeRO stage 2; float32; starting at step 0/30",
        "checkpoint saved: step 10", "checkpoint saved: step 20", "checkpoint saved: step 30",
        "model exported to /tmp/llh-dev/runs/quickstart/20261201-185214-3176/model",
        "done: model at /tmp/llh-dev/runs/quickstart/20261201-185214-3176/model",
    ]
    assert [x for x in shown if _OURS.fullmatch(x)] == expected


def test_plain_output_is_what_a_terminal_shows_besides_the_bar():
    text = job_log(CAPTURED)
    shown = plain(text)
    on_terminal = tty(text)
    assert on_terminal == [x for x in shown if not _STEP.fullmatch(x)]
    assert not any(_STEP.fullmatch(x) for x in on_terminal)  # the bar has them


def test_the_fixture_as_captured_reads_the_same():
    """The captured text itself (step lines as plain text, as `launch logs` of an old run's capture would give)."""
    assert plain("\n".join(CAPTURED) + "\n") == [ours(x) for x in CAPTURED if not is_bookkeeping(x)]


def test_verbose_brings_every_line_back():
    text = job_log(CAPTURED)
    assert plain(text, verbose=True) == CAPTURED
    assert len(plain(text)) < len(CAPTURED)  # without it, they are hidden
    assert tty(text, verbose=True) == [x for x in CAPTURED if not _STEP.fullmatch(x)]


def test_json_mode_still_emits_every_line(capsys):
    text = job_log(CAPTURED)
    assert len(plain(text)) < len(CAPTURED)  # plain mode hides some ...
    run(text, Console(file=io.StringIO(), force_terminal=False), json_mode=True)
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(events) == len(CAPTURED)  # ... --json hides nothing
    for line, event in zip(text.split("\n"), events):
        if MARKER in line:
            assert event["event"] == "progress" and describe(event) in CAPTURED
        else:
            assert event == {"event": "log", "line": line}


# ---- the rules on small logs

def test_a_message_from_another_rank_is_shown_once_but_a_real_repeat_stays():
    log = ("(RayTrainWorker pid=1) warning: tokenizer has no pad token\n"
           "(RayTrainWorker pid=2) warning: tokenizer has no pad token\n"
           "(RayTrainWorker pid=2, ip=10.0.0.2) warning: tokenizer has no pad token\n"
           "(RayTrainWorker pid=1) warning: tokenizer has no pad token\n"
           "(MapBatches(_tokenize) pid=7) warning: tokenizer has no pad token\n"
           "warning: tokenizer has no pad token\n")
    assert plain(log) == ["(RayTrainWorker pid=1) warning: tokenizer has no pad token",
                          "(RayTrainWorker pid=1) warning: tokenizer has no pad token",
                          "(MapBatches(_tokenize) pid=7) warning: tokenizer has no pad token",
                          "warning: tokenizer has no pad token"]
    assert plain(log, verbose=True) == log.split("\n")[:-1]


def test_the_ranks_memory_is_bounded():
    filler = "".join(f"(RayTrainWorker pid=1) line {i}\n" for i in range(300))
    log = "(RayTrainWorker pid=1) same\n(RayTrainWorker pid=2) same\n" + filler + "(RayTrainWorker pid=2) same\n"
    shown = plain(log)
    assert shown[0] == "(RayTrainWorker pid=1) same" and shown[-1] == "(RayTrainWorker pid=2) same"
    assert len(shown) == 302


def test_our_lines_from_new_workers_are_not_taken_for_duplicates():
    log = ("(RayTrainWorker pid=1) checkpoint saved: step 10\n"
           "(TrainController pid=9) Worker group failed; restarting\n"
           "(RayTrainWorker pid=5) resuming from /tmp/ckpt/step_00000010 (step 10)\n"
           "(RayTrainWorker pid=5) checkpoint saved: step 10\n")
    assert plain(log) == ["checkpoint saved: step 10", "(TrainController pid=9) Worker group failed; restarting",
                          "resuming from /tmp/ckpt/step_00000010 (step 10)", "checkpoint saved: step 10"]


NEEDED = [
    "(RayTrainWorker pid=1) Traceback (most recent call last):",
    '(RayTrainWorker pid=1)   File "/work/main/trainers/sft.py", line 60, in train_loop_per_worker',
    "(RayTrainWorker pid=1) RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "Traceback (most recent call last):",
    '  File "/work/main/trainers/entry.py", line 37, in main',
    "    raise SystemExit(msg)",
    "(SplitCoordinator pid=4) Traceback (most recent call last):",
    "(SplitCoordinator pid=4) ValueError: column 'text' not found in the dataset",
    "(DatasetManager pid=3) /data/prep.py:12: UserWarning: 3 rows are empty",
    "(TrainController pid=2) [2026-12-01 18:52:42,145 E 3248 3276] core_worker.cc:2465: Actor died unexpectedly",
    "(RayTrainWorker pid=1) [2026-12-01 18:52:45,252] [WARNING] [engine.py:1] gradient overflow, skipping step",
    "2026-12-01 18:52:29,016 ERROR dataset.py:4568 -- Failed to read s3://bucket/train.jsonl",
    "ERROR something failed",
    "error: checkpoint.storage is not writable",
    "(RayTrainWorker pid=1) Checkpoint loading failed: manifest missing",
]


def test_what_a_person_needs_is_never_hidden():
    text = "\n".join(NEEDED) + "\n"
    assert plain(text) == [ours(x) for x in NEEDED]
    assert tty(text) == [ours(x) for x in NEEDED]


@pytest.mark.parametrize("line", [
    "2026-12-01 18:52:19,401 INFO dashboard_sdk.py:371 -- Uploading package gcs://_ray_pkg_a8ccb869b69af27d.zip.",
    "2026-12-01 18:52:19,401 INFO packaging.py:785 -- Creating a file package for local module '/work/main/trainers'.",
    "(RayTrainWorker pid=2) some message [repeated 3x across cluster]",
    "(raylet) Ray deduplicates logs by default. Set RAY_DEDUP_LOGS=0 to disable log deduplication",
])
def test_other_bookkeeping_is_hidden(line):
    assert plain(f"{line}\nafter\n") == ["after"]
    assert plain(f"{line}\nafter\n", verbose=True) == [line, "after"]


def test_a_user_error_from_the_job_is_kept_for_the_launcher_not_printed():
    from trainers.user_errors import MARKER as ERROR

    error = {"message": "data.train[0] (format messages): f.jsonl line 9: `messages[1]` has role 'bot'", "hint": "fix"}
    log = f"run x -> /r\n(pid=1) some line\n{ERROR}{json.dumps(error)}\n"
    console = Console(file=io.StringIO(), force_terminal=False, width=80)
    out = JobOutput(console)
    out.feed(log)
    out.close()
    assert out.error == error
    assert ERROR.strip() not in console.file.getvalue()


def test_a_user_error_is_an_event_in_json_mode(capsys):
    from trainers.user_errors import MARKER as ERROR

    out = JobOutput(json_mode=True)
    out.feed(f'{ERROR}{{"message": "bad", "hint": null}}\n')
    out.close()
    assert json.loads(capsys.readouterr().out) == {"event": "error", "message": "bad", "hint": None}


# Lines of a PBT search (copied from `launch logs --verbose` of configs/examples/tune_pbt.yaml).
PBT_NOISE = [
    "2026-12-01 23:51:33,117 INFO pbt.py:907 -- ",
    "",
    "[PopulationBasedTraining] [Exploit] Cloning trial 07a71_00000 (score = -5.902313) into trial 07a71_00001 "
    "(score = -6.280249)",
    "",
    "2026-12-01 23:51:33,117 INFO pbt.py:934 -- ",
    "",
    "[PopulationBasedTraining] [Explore] Perturbed the hyperparameter config of trial07a71_00001:",
    "train.lr : 0.01 --- (* 1.2) --> 0.012",
    "",
    "(trial pid=20832) Restored on 127.0.0.1 from checkpoint: Checkpoint(filesystem=local, path=/tmp/r/tune/"
    "trial_07a71_00000_0/checkpoint_000001)",
    "(raylet) WARNING: 8 PYTHON worker processes have been started on node: 826fe9bd with address: 127.0.0.1, "
    "which is 4x the maximum expected startup concurrency (2).",
    "╭──────────────────────────────────────────────────────────╮",
    "│ Configuration for experiment     tune                    │",
    "╰──────────────────────────────────────────────────────────╯",
    "View detailed results here: /tmp/r/tune",
    "To visualize your results with TensorBoard, run: `tensorboard --logdir /tmp/x/driver_artifacts`",
    "/work/main/.venv/lib/python3.11/site-packages/ray/tune/tune.py:735: UserWarning: Consider boosting PBT "
    "performance by enabling `reuse_actors` as well as implementing `reset_config` for Trainable.",
    "  warnings.warn(",
]
STOPPED_TRIAL = [
    "(trial pid=17923) Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7fc2e5b0e700>",
    "(trial pid=17923) Traceback (most recent call last):",
    '(trial pid=17923)   File "/root/.pyenv/versions/3.11.7/lib/python3.11/_weakrefset.py", line 39, in _remove',
    "(trial pid=17923)     def _remove(item, selfref=ref(self)):",
    "(trial pid=17923) ",
    '(trial pid=17923)   File "/work/main/.venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1063, '
    "in sigterm_handler",
    "(trial pid=17923)     raise_sys_exit_with_custom_error_message(",
    "(trial pid=17923) SystemExit: 1",
]


def test_a_searchs_bookkeeping_is_hidden_and_our_trial_lines_stay():
    from launcher.output import TRIAL_MARKER

    exploit = {"event": "exploited", "trial": "07a71_00001", "donor": "07a71_00000", "step": 4,
               "config": {"train.lr": 0.012}}
    text = "\n".join([*PBT_NOISE, TRIAL_MARKER + json.dumps(exploit), *STOPPED_TRIAL, "after"]) + "\n"
    assert plain(text) == ["trial 07a71_00001 exploited trial 07a71_00000: goes on from its step 4 with "
                           "train.lr=0.012", "after"]
    assert len(plain(text, verbose=True)) == len(PBT_NOISE) + len(STOPPED_TRIAL) + 2


def test_a_held_block_that_does_not_end_as_expected_is_shown_whole():
    other = [*STOPPED_TRIAL[:3], "(trial pid=17923) RuntimeError: something else entirely"]
    assert plain("\n".join(other) + "\n") == [ours(x) for x in other]  # the log ended inside the block
    long = [STOPPED_TRIAL[0], *[f"(trial pid=17923) line {i}" for i in range(60)]]
    assert plain("\n".join(long) + "\n") == [ours(x) for x in long]
    # another source's lines are not held back meanwhile
    mixed = [STOPPED_TRIAL[0], "(RayTrainWorker pid=5) loading", *STOPPED_TRIAL[1:]]
    assert plain("\n".join(mixed) + "\n") == [ours(mixed[1])]


def test_a_search_on_a_terminal_shows_a_live_table_of_its_trials():
    from launcher.output import TRIAL_MARKER

    events = [
        {"event": "started", "trial": "t1", "config": {"train.lr": 0.01, "model.peft.r": 8}},
        {"event": "result", "trial": "t1", "step": 2, "metric": "eval_loss", "value": 5.98},
        {"event": "stopped", "trial": "t1", "step": 2, "value": 5.98},
        {"event": "started", "trial": "t2", "config": {"train.lr": 0.002, "model.peft.r": 16}},
        {"event": "result", "trial": "t2", "step": 4, "metric": "eval_loss", "value": 5.5},
    ]
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    out = JobOutput(console)
    out.feed("".join(f"{TRIAL_MARKER}{json.dumps(e)}\n" for e in events))
    out.close()
    screen = _ANSI.sub("", console.file.getvalue())
    assert "trial t1 stopped early by the scheduler at step 2" in screen  # the lines stay
    last = screen[screen.rindex("trial  "):]  # the table as it was left
    header, *rows = [line.split() for line in last.strip().splitlines()]
    assert header == ["trial", "train.lr", "model.peft.r", "step", "eval_loss", "state"]
    assert rows == [["t1", "0.01", "8", "2", "5.9800", "stopped", "early"],
                    ["t2", "0.002", "16", "4", "5.5000", "running"]]


def test_without_a_terminal_a_search_prints_lines_only():
    from launcher.output import TRIAL_MARKER

    event = {"event": "started", "trial": "t1", "config": {"train.lr": 0.01}}
    assert plain(f"{TRIAL_MARKER}{json.dumps(event)}\n") == ["trial t1 started: train.lr=0.01"]


def test_a_trial_stopped_by_the_scheduler_leaves_no_controller_report():
    """What a trial's TrainController printed when ASHA stopped the trial (captured from
    tests/integration/test_tune.py): its workers' deaths, twice, ending in "owner has died"."""
    block = (Path(__file__).parents[1] / "fixtures/logs/asha_stopped_trial.log").read_text()
    assert block.count("owner has died") == 3 and "Graceful shutdown of backend failed" in block
    assert "Destroying worker since its placement group was removed" in block
    assert plain(block + "trial x stopped\n") == ["trial x stopped"]
    assert len(plain(block, verbose=True)) == len(block.splitlines())
