"""Raw text corpora for continued pre-training: `.txt` files and directories read as
blank-line separated documents (the same rows for the launcher's peek, the job's bad-row
report and the Ray Data read), and the spec rules of streaming and replay."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from trainers import data, data_check
from trainers.spec import DatasetSpec, parse_spec

TEXT = "first line\nsecond line\n\n\n  \nnext document\n\nlast\n"


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    assert list(data_check.rows(str(tmp_path / "a.txt"))) == [
        (1, {"text": "first line\nsecond line"}), (6, {"text": "next document"}), (8, {"text": "last"})]
    # What a Ray Data read task makes of the file's bytes: the same documents.
    assert data._txt_documents({"bytes": TEXT.encode()}) == [
        {"text": "first line\nsecond line"}, {"text": "next document"}, {"text": "last"}]
    assert list(data_check.rows(str(tmp_path / "a.txt"), limit=2))[-1][0] == 6


def test_a_directory_of_txt_files_is_a_dataset(tmp_path):
    for name in ("b.txt", "a.txt", "notes.md"):
        (tmp_path / name).write_text(TEXT)
    assert data_check.data_files(str(tmp_path)) == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    ds = DatasetSpec(path=str(tmp_path), format="text")
    assert data_check.peek_problems(ds) == []


def test_txt_is_raw_text_only():
    with pytest.raises(ValidationError, match="a .txt file is raw text"):
        DatasetSpec(path="corpus.txt", format="messages")
    with pytest.raises(ValidationError, match="a .txt file is raw text"):
        DatasetSpec(path="corpus.txt", text_field="body")


def _spec(**data_fields):
    return {"name": "p", "method": "pretrain", "model": {"path": "m"}, "train": {"max_steps": 5},
            "data": {"train": [{"path": "corpus.txt"}], **data_fields}}


@pytest.mark.parametrize("fields, train, message", [
    ({"streaming": True, "eval_fraction": 0.1}, {}, "with data.streaming name held-out data in data.eval"),
    ({"streaming": True, "replay": [{"path": "general.jsonl"}]}, {}, "add the general corpus to data.train"),
    ({"streaming": True}, {"max_steps": None}, "set train.max_steps"),
    ({"replay": [{"path": "chat.jsonl", "format": "messages"}]}, {}, r"data\.replay\[0\]\.format is 'messages'"),
])
def test_streaming_and_replay_rules(fields, train, message):
    spec = _spec(**fields)
    spec["train"].update(train)
    with pytest.raises(ValidationError, match=message):
        parse_spec(spec)


def test_replay_datasets_are_checked_like_the_others():
    spec = parse_spec(_spec(replay=[{"path": "general.jsonl"}], replay_weight=0.25))
    assert [where for where, _ in spec.data.datasets()] == ["data.train[0]", "data.replay[0]"]


def test_documents_read_from_a_stream_keep_their_first_line():
    assert list(data_check._documents(io.BytesIO(b"\n\na\nb\n\nc"), None)) == [(3, {"text": "a\nb"}), (6, {"text": "c"})]
