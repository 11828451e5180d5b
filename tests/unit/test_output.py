"""launcher.output.JobOutput: log chunks -> lines, progress markers -> plain lines or JSON."""

from __future__ import annotations

import io
import json
import random

import pytest
from rich.console import Console

from launcher.output import MARKER, JobOutput

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
