"""Bad data through the real path: a dataset the launcher can read is refused before
anything is submitted; bad rows are skipped and listed by file and line
(`data.on_bad_rows: skip`, the default) or, with `fail`, a bad row further into a file (past
the launcher's peek) fails the job with one line naming the file, the line and what is
wrong: exit 2, no traceback."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, output
from trainers import storage
from trainers.data_check import PEEK_ROWS

pytestmark = pytest.mark.integration
QUICKSTART = "configs/examples/quickstart.yaml"
CHAT = [json.loads(line) for line in (REPO / "configs/examples/data/messages.jsonl").read_text().splitlines()]


def chat_file(path, bad_row: dict, at_line: int) -> str:
    rows = [CHAT[i % len(CHAT)] for i in range(at_line - 1)] + [bad_row] + CHAT[:5]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def assert_one_line_user_error(proc, expected: str) -> None:
    text = output(proc)
    assert proc.returncode == 2, text[-4000:]
    assert f"error: {expected}" in proc.stderr, text[-4000:]
    assert "Traceback" not in text and "UserCodeException" not in text and "LLMLAUNCH_ERROR" not in text


def test_s3_dataset_with_the_wrong_format_is_refused_before_submission(launch, s3_env):
    uri = storage.join(s3_env.rsplit("/", 1)[0], "inputs", "chat.jsonl")
    sharegpt = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in sharegpt))
    proc = launch(QUICKSTART, f"data.train[0].path={uri}", f"checkpoint.storage={s3_env}")
    assert proc.returncode == 2, output(proc)[-3000:]
    assert f"data.train[0]: (format messages) {uri} line 1: no field `messages`; the row has `conversations`" \
        in proc.stderr
    assert "submitted job" not in proc.stderr and "Traceback" not in output(proc)


def test_bad_role_past_the_peek_fails_the_job_in_one_line(launch, tmp_path):
    line = PEEK_ROWS + 7
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    path = chat_file(tmp_path / "chat.jsonl", bad, line)
    proc = launch(QUICKSTART, f"data.train[0].path={path}", "train.max_steps=2", f"checkpoint.storage={tmp_path}",
                  "data.on_bad_rows=fail")
    assert "submitted job" in proc.stderr  # the first rows were fine: the job found it
    assert_one_line_user_error(proc, f"data.train[0] (format messages): {path} line {line}: `messages[1]` has "
                                     "role 'bot'; roles are system, user, assistant, tool")


def test_wrong_type_that_arrow_cannot_read_is_named_by_line(launch, tmp_path):
    line = PEEK_ROWS + 3
    bad = {"messages": [{"role": "user", "content": 12}, {"role": "assistant", "content": "a"}]}
    path = chat_file(tmp_path / "chat.jsonl", bad, line)
    proc = launch(QUICKSTART, f"data.train[0].path={path}", "train.max_steps=2", f"checkpoint.storage={tmp_path}")
    assert_one_line_user_error(proc, f"data.train[0] (format messages): {path} line {line}: `messages[0]` content "
                                     "must be a string, got a number")


def test_bad_rows_are_skipped_and_each_one_reported(launch, tmp_path):
    """Three bad rows, one inside the launcher's peek and two past it, of three kinds: the
    run trains on the rest and the job lists every one by file and line; over
    max_bad_rows the same file fails the run, naming them."""
    rows = [CHAT[i % len(CHAT)] for i in range(PEEK_ROWS + 40)]
    bad = {3: {"messages": []},
           PEEK_ROWS + 5: {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
           PEEK_ROWS + 20: {"text": "no messages here"}}
    for line, row in bad.items():
        rows[line - 1] = row
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    proc = launch(QUICKSTART, f"data.train[0].path={path}", "train.max_steps=2", f"checkpoint.storage={tmp_path}")
    assert proc.returncode == 0, output(proc)[-4000:]
    text = output(proc)
    assert "data: skipped 3 bad rows (data.on_bad_rows: skip):" in text, text[-4000:]
    for line in bad:
        assert f"data.train[0] (format messages): {path} line {line}: " in text
    assert f"line {PEEK_ROWS + 5}: `messages[1]` has role 'bot'" in text

    proc = launch(QUICKSTART, f"data.train[0].path={path}", "train.max_steps=2", f"checkpoint.storage={tmp_path}",
                  "data.max_bad_rows=2")
    assert proc.returncode == 2, output(proc)[-4000:]
    assert f"error: 3 bad rows, more than data.max_bad_rows (2); the first: data.train[0] (format messages): {path} " \
           f"line 3: " in proc.stderr
