"""trainers.data_check: rows against their declared format, the files and lines they come
from, and the launcher's pre-flight peek (`launch validate` / `launch run`, exit 2 before
anything is provisioned)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.cli import main
from trainers import data_check
from trainers.spec import DatasetSpec

REPO = data_check.__file__.rsplit("/trainers/", 1)[0]
QUICKSTART = f"{REPO}/configs/examples/quickstart.yaml"
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                              {"from": "gpt", "value": "a"}]}
CONVERSATIONAL_PC = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}


def fmt(name: str, **kw) -> DatasetSpec:
    return DatasetSpec(path="x.jsonl", format=name, **kw)


@pytest.mark.parametrize("row, ds, expected", [
    ({"text": "abc"}, fmt("text"), None),
    ({"body": "abc"}, fmt("text"), "no field `text`; the row has `body`; it looks like raw text: "
                                   "`format: text, text_field: body`"),
    ({"text": 3}, fmt("text"), "field `text` must be a string, got a number"),
    ({"instruction": "a", "output": "b"}, fmt("alpaca"), None),
    ({"instruction": "a", "input": None, "output": "b"}, fmt("alpaca"), None),  # Arrow's null for a missing field
    ({"instruction": "a", "output": ["b"]}, fmt("alpaca"), "field `output` must be a string, got a list"),
    ({"instruction": "a", "input": 5, "output": "b"}, fmt("alpaca"), "field `input` must be a string, got a number"),
    (GOOD_CHAT, fmt("messages"), None),
    ({"messages": []}, fmt("messages"), "field `messages` is an empty conversation"),
    ({"messages": "hi"}, fmt("messages"), "field `messages` must be a list, got a string"),
    ({"messages": [{"role": "bot", "content": "x"}]}, fmt("messages"),
     "`messages[0]` has role 'bot'; roles are system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": 1}]}, fmt("messages"), "`messages[0]` content must be a string, got a number"),
    ({"messages": [{"role": "user", "content": "q"}]}, fmt("messages"),
     "field `messages` has no assistant turn: nothing to train on"),
    ({"messages": [{"from": "human", "value": "q"}]}, fmt("messages"),
     "`messages[0]` needs `role` and `content`; it has `from`, `value` (ShareGPT style: use `format: sharegpt`)"),
    ({"chat": GOOD_CHAT["messages"]}, fmt("messages"),
     "no field `messages`; the row has `chat`; it looks like chat data: `format: messages, messages_field: chat`"),
    ({"chat": GOOD_CHAT["messages"]}, fmt("messages", messages_field="chat"), None),
    ({"instruction": "a", "output": "b"}, fmt("messages"),
     "no field `messages`; the row has `instruction`, `output`; it looks like instruction data: `format: alpaca`"),
    ([1, 2], fmt("text"), "a row must be a JSON object, got a list"),
    # sharegpt
    (SHAREGPT, fmt("sharegpt"), None),
    ({"chat": SHAREGPT["conversations"]}, fmt("sharegpt", conversations_field="chat"), None),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, fmt("sharegpt"),
     "`conversations[1]` is from 'bot', which `roles` does not map to a chat role (it maps 'human', 'gpt', "
     "'system'); add it, e.g. `roles: {bot: assistant}`"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     fmt("sharegpt", roles={"human": "user", "bot": "assistant"}), None),
    ({"conversations": [{"from": "human", "value": "q"}]}, fmt("sharegpt"),
     "field `conversations` has no assistant turn (from 'gpt'): nothing to train on"),
    ({"conversations": []}, fmt("sharegpt"), "field `conversations` is an empty conversation"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, fmt("sharegpt"),
     "`conversations[0]` value must be a string, got a number"),
    ({"conversations": ["hi"]}, fmt("sharegpt"),
     "`conversations[0]` must be an object with `from` and `value`, got a string"),
    ({"conversations": GOOD_CHAT["messages"]}, fmt("sharegpt"),
     "`conversations[0]` needs `from` and `value`; it has `role`, `content` ({role, content} turns: use "
     "`format: messages`)"),
    (GOOD_CHAT, fmt("sharegpt"), "no field `conversations`; the row has `messages`; it looks like chat data: "
                                 "`format: messages, messages_field: messages`"),
    # prompt_completion
    ({"prompt": "2+2=", "completion": "4"}, fmt("prompt_completion"), None),
    (CONVERSATIONAL_PC, fmt("prompt_completion"), None),
    ({"q": "2+2=", "a": "4"}, fmt("prompt_completion", prompt_field="q", completion_field="a"), None),
    ({"prompt": "2+2="}, fmt("prompt_completion"),
     "no field `completion`; the row has `prompt` (name the field with `completion_field`)"),
    ({"prompt": "2+2=", "completion": [{"role": "assistant", "content": "4"}]}, fmt("prompt_completion"),
     "fields `prompt` and `completion` must both be strings or both be lists of chat turns; got a string and "
     "a list"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     fmt("prompt_completion"), "field `completion` has no assistant turn: nothing to train on"),
    ({"prompt": [{"role": "human", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     fmt("prompt_completion"), "`prompt[0]` has role 'human'; roles are system, user, assistant, tool"),
    ({"prompt": [], "completion": [{"role": "assistant", "content": "a"}]}, fmt("prompt_completion"), None),
    # what a row looks like, when declared as something else
    ({"prompt": "2+2=", "completion": "4"}, fmt("text"),
     "no field `text`; the row has `prompt`, `completion`; it looks like prompt/completion pairs: "
     "`format: prompt_completion`"),
    (CONVERSATIONAL_PC, fmt("messages"),
     "no field `messages`; the row has `prompt`, `completion`; it looks like prompt/completion pairs: "
     "`format: prompt_completion`"),
    ({"dialog": SHAREGPT["conversations"]}, fmt("messages"),
     "no field `messages`; the row has `dialog`; it looks like ShareGPT chat data (`dialog` of {from, value}): "
     "`format: sharegpt, conversations_field: dialog`"),
])
def test_row_problem(row, ds, expected):
    assert data_check.row_problem(row, ds) == expected


def test_sharegpt_row_is_recognised():
    row = {"id": 7, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    problem = data_check.row_problem(row, fmt("messages"))
    assert problem.startswith("no field `messages`; the row has `id`, `conversations`; it looks like ShareGPT")
    assert problem.endswith("`format: sharegpt`")


def test_is_chat_data_reads_the_first_row_of_prompt_completion(tmp_path):
    strings = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}])
    turns = write_jsonl(tmp_path / "t.jsonl", [CONVERSATIONAL_PC])
    assert data_check.is_chat_data(DatasetSpec(path=strings, format="prompt_completion")) is False
    assert data_check.is_chat_data(DatasetSpec(path=turns, format="prompt_completion")) is True
    assert data_check.is_chat_data(DatasetSpec(path=strings, format="sharegpt")) is True
    assert data_check.is_chat_data(DatasetSpec(path=strings, format="text")) is False
    assert data_check.is_chat_data(DatasetSpec(path="org/hub-id", format="prompt_completion")) is None


def test_sharegpt_file_names_the_line_of_an_unknown_role(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"}]}
    path = write_jsonl(tmp_path / "sg.jsonl", [SHAREGPT, SHAREGPT, bad])
    ds = DatasetSpec(path=path, format="sharegpt")
    assert data_check.peek_problems(ds) == [
        f"{path} line 3: `conversations[1]` is from 'chatgpt', which `roles` does not map to a chat role (it maps "
        "'human', 'gpt', 'system'); add it, e.g. `roles: {chatgpt: assistant}`"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_numbers_lines_of_jsonl_json_arrays_and_parquet(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert list(data_check.rows(str(tmp_path / "a.jsonl"))) == [(1, rows[0]), (3, rows[1])]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert list(data_check.rows(str(tmp_path / "a.json"))) == [(1, rows[0]), (2, rows[1])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert list(data_check.rows(str(tmp_path / "a.parquet"))) == [(1, rows[0]), (2, rows[1])]
    assert list(data_check.rows(str(tmp_path / "a.jsonl"), limit=1)) == [(1, rows[0])]


def test_first_problem_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT] * 4 + [{"messages": [{"role": "bot", "content": "x"}]}])
    check = lambda row: data_check.row_problem(row, fmt("messages"))  # noqa: E731
    assert data_check.first_problem(path, check) == f"{path} line 5: `messages[0]` has role 'bot'; " \
                                                   "roles are system, user, assistant, tool"
    assert data_check.first_problem(path, check, limit=4) is None


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n')
    problem = data_check.first_problem(str(path), lambda row: None)
    assert problem.startswith(f"{path} line 2: not valid JSON")


def test_scan_goes_through_every_file_of_a_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 3)
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}, {"txt": "y"}])
    ds = DatasetSpec(path=str(tmp_path), format="text")
    assert data_check.scan(ds, lambda r: data_check.row_problem(r, ds)).startswith(f"{tmp_path}/b.jsonl line 2: ")
    assert data_check.peek_problems(ds) == [f"{tmp_path}/b.jsonl line 2: no field `text`; the row has `txt`; "
                                            "it looks like raw text: `format: text, text_field: txt`"]


def test_message_survives_being_wrapped_in_another_exceptions_text():
    err = data_check.DataError("data.train[0] (format messages): f.jsonl line 3: `messages[1]` has role 'bot'")
    wrapped = RuntimeError(f"ray::MapBatches(_tokenize_batch)()\n  File x, line 1\n{type(err).__name__}: {err}\n")
    assert data_check.message_from(wrapped) == err.message
    assert data_check.message_from(RuntimeError("something else")) is None


def validate(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["validate", QUICKSTART, *args])
    return info.value.code, capsys.readouterr().err


def test_validate_refuses_a_sharegpt_file_declared_as_messages(tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl",
                       [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    code, err = validate(capsys, f"data.train[0].path={path}")
    assert code == 2
    assert "data.train[0]: (format messages)" in err and f"{path} line 1" in err
    assert "the row has `conversations`" in err and "ShareGPT" in err and "Traceback" not in err


@pytest.mark.parametrize("example", ["quickstart.yaml", "lora.yaml", "alpaca_zero3.yaml", "pretrain.yaml",
                                     "sft_sharegpt.yaml", "sft_prompt_completion.yaml"])
def test_validate_accepts_the_shipped_data(example, capsys):
    main(["validate", f"{REPO}/configs/examples/{example}"])  # returns: exit 0
    assert ": ok (" in capsys.readouterr().err


def test_entry_checks_remote_only_data_at_job_start_in_one_line(tmp_path):
    """The job's first step (before ray.init) peeks at datasets only the cluster can read:
    exit 2, one LLMLAUNCH_ERROR line, no traceback."""
    from launcher.config import load_spec

    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": "not a chat"}])
    spec = load_spec(QUICKSTART, [f"data.train[0].path={path}", f"checkpoint.storage={tmp_path}/runs"])
    env = {"LLMLAUNCH_SPEC": json.dumps(spec.model_dump(mode="json")), "LLMLAUNCH_RUN_ID": "r1", "PATH": "/usr/bin"}
    proc = subprocess.run([sys.executable, "-m", "trainers.entry"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("LLMLAUNCH_ERROR ")]
    error = json.loads(line.split(" ", 1)[1])
    assert error["message"].startswith(f"data.train[0] (format messages): {path} line 1: no field `messages`")
    assert "Traceback" not in proc.stdout + proc.stderr


def _chat_rows(path, bad_lines: set[int], n: int = 10) -> str:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text("".join(json.dumps({"messages": []} if i in bad_lines else good) + "\n" for i in range(1, n + 1)))
    return str(path)


def test_skip_peek_refuses_only_a_file_whose_first_rows_are_all_bad(tmp_path):
    ds = DatasetSpec(path=_chat_rows(tmp_path / "some.jsonl", {2, 5}), format="messages")
    assert data_check.peek_problems(ds, skip_bad=True) == []
    assert data_check.peek_problems(ds) == [f"{ds.path} line 2: field `messages` is an empty conversation"]
    wrong = DatasetSpec(path=_chat_rows(tmp_path / "all.jsonl", set(range(1, 11))), format="messages")
    assert data_check.peek_problems(wrong, skip_bad=True) == [
        f"{wrong.path} line 1: field `messages` is an empty conversation (and every row after it among the first {data_check.PEEK_ROWS})"]


def test_bad_rows_lists_every_bad_line_up_to_the_limit(tmp_path):
    ds = DatasetSpec(path=_chat_rows(tmp_path / "c.jsonl", {2, 5, 9}), format="messages")
    check = lambda row: data_check.row_problem(row, ds)  # noqa: E731
    assert data_check.bad_rows(ds, check, 10) == [f"{ds.path} line {n}: field `messages` is an empty conversation" for n in (2, 5, 9)]
    assert len(data_check.bad_rows(ds, check, 2)) == 2
