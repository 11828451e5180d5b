"""Rows checked against their dataset's declared format, with errors a person can act on.

The same check runs three times, so a bad file is caught as early as it can be:
- by the launcher before anything is provisioned, on the first rows of every dataset it
  can read (local, or `s3://` with its credentials): `peek_problems`;
- at the start of the job for datasets only the cluster can read (the same function);
- inside the Ray Data tokenization tasks, on every row: `row_problem`, and `locate` to
  name the line of the file that holds the first bad row.

Pure: the standard library and pyarrow only (the launcher imports it without torch).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from trainers.spec import CHAT_ROLES, DatasetSpec

PEEK_ROWS = 64
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
# The prefix of a data error's message inside an exception raised in a Ray Data task: the
# job's driver finds it in the wrapped exception's text (the object itself does not survive).
MARKER = "LLMLAUNCH_DATA_ERROR:"


class DataError(ValueError):
    """A dataset row does not fit its declared format (a user error: exit 2, one line)."""

    def __init__(self, message: str):
        super().__init__(MARKER + json.dumps(message))
        self.message = message


def message_from(exc: BaseException) -> str | None:
    """The DataError message carried by `exc`, however Ray wrapped it, or None."""
    text = str(exc)
    at = text.find(MARKER)
    if at < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text, at + len(MARKER))[0]
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------- one row

def _missing(row: dict[str, Any], key: str) -> bool:
    # Arrow fills a field that some rows lack with null: null counts as missing.
    return row.get(key) is None


def row_problem(row: Any, ds: DatasetSpec) -> str | None:
    """What is wrong with one row for `ds.format`, or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {_type(row)}"
    if ds.format == "text":
        return _field_problem(row, ds.text_field, str, "text_field")
    if ds.format == "alpaca":
        for key in ("instruction", "output"):
            if problem := _field_problem(row, key, str):
                return problem
        if not _missing(row, "input") and not isinstance(row["input"], str):
            return f"field `input` must be a string, got {_type(row['input'])}"
        return None
    if ds.format == "sharegpt":
        return _sharegpt_problem(row, ds)
    if ds.format == "prompt_completion":
        return _prompt_completion_problem(row, ds)
    if ds.format in ("preference", "ranking"):
        return _preference_problem(row, ds) if ds.format == "preference" else _ranking_problem(row, ds)
    if ds.format == "prompt":
        return _prompt_problem(row, ds)
    if problem := _field_problem(row, ds.messages_field, list, "messages_field"):
        return problem
    return _conversation_problem(row[ds.messages_field], ds.messages_field)


def _conversation_problem(messages: list[Any], field: str, *, needs_assistant: bool = True) -> str | None:
    """A list of `{role, content}` turns: `field` names it in the messages."""
    if not messages:
        return f"field `{field}` is an empty conversation"
    for i, m in enumerate(messages):
        where = f"`{field}[{i}]`"
        if not isinstance(m, dict):
            return f"{where} must be an object with `role` and `content`, got {_type(m)}"
        if _missing(m, "role") or _missing(m, "content"):
            have = ", ".join(f"`{k}`" for k, v in m.items() if v is not None) or "no fields"
            hint = " (ShareGPT style: use `format: sharegpt`)" if "from" in m else ""
            return f"{where} needs `role` and `content`; it has {have}{hint}"
        if m["role"] not in CHAT_ROLES:
            return f"{where} has role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}"
        if not isinstance(m["content"], str):
            return f"{where} content must be a string, got {_type(m['content'])}"
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"field `{field}` has no assistant turn: nothing to train on"
    return None


def _sharegpt_problem(row: dict[str, Any], ds: DatasetSpec) -> str | None:
    field = ds.conversations_field
    if problem := _field_problem(row, field, list, "conversations_field"):
        return problem
    turns = row[field]
    if not turns:
        return f"field `{field}` is an empty conversation"
    for i, t in enumerate(turns):
        where = f"`{field}[{i}]`"
        if not isinstance(t, dict):
            return f"{where} must be an object with `from` and `value`, got {_type(t)}"
        if _missing(t, "from") or _missing(t, "value"):
            have = ", ".join(f"`{k}`" for k, v in t.items() if v is not None) or "no fields"
            hint = " ({role, content} turns: use `format: messages`)" if "role" in t else ""
            return f"{where} needs `from` and `value`; it has {have}{hint}"
        if t["from"] not in ds.roles:
            known = ", ".join(repr(k) for k in ds.roles) or "none"
            return (f"{where} is from {t['from']!r}, which `roles` does not map to a chat role (it maps {known}); "
                    f"add it, e.g. `roles: {{{t['from']}: assistant}}`")
        if not isinstance(t["value"], str):
            return f"{where} value must be a string, got {_type(t['value'])}"
    if not any(ds.roles[t["from"]] == "assistant" for t in turns):
        gpt = " or ".join(repr(k) for k, v in ds.roles.items() if v == "assistant") or "a name `roles` maps to assistant"
        return f"field `{field}` has no assistant turn (from {gpt}): nothing to train on"
    return None


def _prompt_completion_problem(row: dict[str, Any], ds: DatasetSpec) -> str | None:
    p, c = ds.prompt_field, ds.completion_field
    for key, option in ((p, "prompt_field"), (c, "completion_field")):
        if _missing(row, key):
            # Half a pair looks like nothing else: guess only when both fields are absent.
            return _field_problem(row, key, str, option, guess=_missing(row, p) and _missing(row, c))
    prompt, completion = row[p], row[c]
    if isinstance(prompt, str) and isinstance(completion, str):
        return None
    if isinstance(prompt, list) and isinstance(completion, list):
        if prompt and (problem := _conversation_problem(prompt, p, needs_assistant=False)):
            return problem
        return _conversation_problem(completion, c)
    return (f"fields `{p}` and `{c}` must both be strings or both be lists of chat turns; got "
            f"{_type(prompt)} and {_type(completion)}")


def _prompt_problem(row: dict[str, Any], ds: DatasetSpec) -> str | None:
    """A prompt the policy answers: a non-empty string, or chat turns ending with the user's."""
    p = ds.prompt_field
    if problem := _field_problem(row, p, object, "prompt_field"):
        return problem
    prompt = row[p]
    if isinstance(prompt, str):
        return None if prompt.strip() else f"field `{p}` is an empty prompt"
    if not isinstance(prompt, list):
        return f"field `{p}` must be a string or a list of chat turns, got {_type(prompt)}"
    if problem := _conversation_problem(prompt, p, needs_assistant=False):
        return problem
    if prompt[-1]["role"] == "assistant":
        return f"field `{p}` ends with an assistant turn: a prompt ends where the policy's response begins"
    return None


def _preference_problem(row: dict[str, Any], ds: DatasetSpec) -> str | None:
    c, r = ds.chosen_field, ds.rejected_field
    for key, option in ((c, "chosen_field"), (r, "rejected_field")):
        if _missing(row, key):
            return _field_problem(row, key, object, option, guess=False)
    return _responses_problem(row, ds, [c, r], [row[c], row[r]], [1.0, 0.0]) or _margin_problem(row, ds)


def _ranking_problem(row: dict[str, Any], ds: DatasetSpec) -> str | None:
    f, rk, sc = ds.responses_field, ds.ranking_field, ds.scores_field
    if problem := _field_problem(row, f, list, "responses_field", guess=False):
        return problem
    responses, k = row[f], len(row[f])
    if k < 2:
        return f"field `{f}` has {k} response{'' if k == 1 else 's'}: a ranking needs at least 2"
    if _missing(row, rk) and _missing(row, sc):
        have = ", ".join(f"`{key}`" for key, v in row.items() if v is not None)
        return f"no field `{rk}` or `{sc}`; the row has {have} (name one with `ranking_field` or `scores_field`)"
    scores = None
    if not _missing(row, sc):
        values = row[sc]
        if not isinstance(values, list):
            return f"field `{sc}` must be a list of numbers, got {_type(values)}"
        if len(values) != k:
            return f"field `{sc}` has {len(values)} scores for {k} responses"
        for i, x in enumerate(values):
            if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x:
                return f"`{sc}[{i}]` must be a number, got {'NaN' if x != x else _type(x)}"
        if len(set(values)) == 1:
            return f"field `{sc}` gives every response the same score: no preference to learn"
        scores = [float(x) for x in values]
    if not _missing(row, rk):
        ranking = row[rk]
        indices = isinstance(ranking, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
        if not indices or sorted(ranking) != list(range(k)):
            one_based = indices and sorted(ranking) == list(range(1, k + 1))
            return (f"field `{rk}` must list each response index 0..{k - 1} once, best first; got "
                    f"{json.dumps(ranking) if isinstance(ranking, list) else _type(ranking)}"
                    f"{' (indices count from 0)' if one_based else ''}")
        if scores is not None:
            for a, b in zip(ranking, ranking[1:]):
                if scores[a] < scores[b]:
                    return (f"fields `{rk}` and `{sc}` disagree: `{rk}` puts response {a} before {b}, which "
                            f"`{sc}` scores higher")
        else:
            scores = [0.0] * k
            for position, i in enumerate(ranking):
                scores[i] = float(k - 1 - position)
    names = [f"{f}[{i}]" for i in range(k)]
    return _responses_problem(row, ds, names, responses, scores) or _margin_problem(row, ds)


def _responses_problem(row: dict[str, Any], ds: DatasetSpec, names: list[str], values: list[Any],
                       scores: list[float]) -> str | None:
    """The responses of a preference or ranking row (`names` their fields), its prompt, and
    when the prompt is implicit, the one they share."""
    for name, value in zip(names, values):
        if isinstance(value, str):
            if not value:
                return f"field `{name}` is an empty response"
        elif isinstance(value, list):
            if problem := _conversation_problem(value, name):
                return problem
        else:
            return f"field `{name}` must be a string or a list of chat turns, got {_type(value)}"
    strings = [isinstance(v, str) for v in values]
    if not all(s == strings[0] for s in strings):
        other = strings.index(not strings[0])
        return (f"fields `{names[0]}` and `{names[other]}` must both be strings or both be lists of chat turns; "
                f"got {_type(values[0])} and {_type(values[other])}")
    same = [v if isinstance(v, str) else [(m["role"], m["content"]) for m in v] for v in values]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            if same[i] == same[j] and scores[i] != scores[j]:
                return (f"fields `{names[i]}` and `{names[j]}` are identical: "
                        + ("no preference to learn" if ds.format == "preference" else "they cannot rank apart"))
    p, prompt = ds.prompt_field, row.get(ds.prompt_field)
    if prompt is not None and not isinstance(prompt, (str, list)):
        return f"field `{p}` must be a string or a list of chat turns, got {_type(prompt)}"
    if isinstance(prompt, list) and strings[0]:
        return f"field `{p}` is a list of chat turns but the responses are strings: make them all one or the other"
    if isinstance(prompt, list):
        if prompt and (problem := _conversation_problem(prompt, p, needs_assistant=False)):
            return problem
        for name, value in zip(names, values):
            if value[0]["role"] != "assistant":
                return (f"`{name}[0]` is a {value[0]['role']} turn: a response starts with the assistant's reply "
                        f"(the turns before it belong in `{p}`)")
        return None
    if isinstance(prompt, str) and strings[0]:
        return None
    # No prompt, or a string one beside whole conversations: the prompt is what they share (as TRL reads them).
    from trainers.preference_data import split_responses

    what = f"fields `{names[0]}` and `{names[1]}`" if len(names) == 2 else f"the responses in `{ds.responses_field}`"
    try:
        _, rests = split_responses(values, what)
    except ValueError as e:
        return str(e)
    for name, rest in zip(names, rests):
        if not rest:
            return (f"field `{name}` is all prompt: nothing follows the beginning the responses share (with no "
                    f"`{p}` field, that beginning is the prompt)")
    return None


def _margin_problem(row: dict[str, Any], ds: DatasetSpec) -> str | None:
    m = ds.margin_field
    if m is None:
        return None
    if _missing(row, m):
        return _field_problem(row, m, object, "margin_field", guess=False)
    x = row[m]
    if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x:
        return f"field `{m}` must be a number, got {'NaN' if x != x else _type(x)}"
    return None


def is_conversational(row: Any, ds: DatasetSpec) -> bool:
    """Whether a (valid) row is rendered with a chat template."""
    if ds.format in ("messages", "sharegpt"):
        return True
    if not isinstance(row, dict):
        return False
    if ds.format == "preference":
        return any(isinstance(row.get(f), list) for f in (ds.prompt_field, ds.chosen_field))
    if ds.format == "ranking":
        responses = row.get(ds.responses_field)
        return isinstance(row.get(ds.prompt_field), list) or bool(responses) and isinstance(responses[0], list)
    return ds.format in ("prompt_completion", "prompt") and isinstance(row.get(ds.prompt_field), list)


def _field_problem(row: dict[str, Any], key: str, kind: type, option: str | None = None, *,
                   guess: bool = True) -> str | None:
    if _missing(row, key):
        have = ", ".join(f"`{k}`" for k, v in row.items() if v is not None) or "no fields"
        text = f"no field `{key}`; the row has {have}"
        guess = guess_format(row) if guess else None
        if guess:
            text += f"; it looks like {guess}"
        elif option:
            text += f" (name the field with `{option}`)"
        return text
    if not isinstance(row[key], kind):
        return f"field `{key}` must be {'a string' if kind is str else 'a list'}, got {_type(row[key])}"
    return None


def guess_format(row: dict[str, Any]) -> str | None:
    """What the row looks like, phrased as the spec change that would read it."""
    keys = {k for k, v in row.items() if v is not None}
    if {"prompt", "completion"} <= keys and not {"chosen", "rejected"} & keys:
        # Before the chat checks: a conversational pair's fields are lists of turns too.
        return "prompt/completion pairs: `format: prompt_completion`"
    for key in sorted(keys):
        value = row[key]
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            if all({"role", "content"} <= set(m) for m in value):
                return f"chat data: `format: messages, messages_field: {key}`"
            if all({"from", "value"} <= set(m) for m in value):
                field = "" if key == "conversations" else f", conversations_field: {key}"
                return f"ShareGPT chat data (`{key}` of {{from, value}}): `format: sharegpt{field}`"
    if {"instruction", "output"} <= keys:
        return "instruction data: `format: alpaca`"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference pairs (prompt/chosen/rejected), which sft does not train on"
    strings = sorted(k for k in keys if isinstance(row[k], str))
    if len(strings) == 1:
        return f"raw text: `format: text, text_field: {strings[0]}`"
    return None


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- files

def _is_file_like(path: str) -> bool:
    import os

    return "://" in path or path.endswith(DATA_SUFFIXES) or os.path.exists(os.path.expanduser(path))


def data_files(path: str) -> list[str]:
    """The files a dataset path names (a file, or the data files under a directory), as
    URIs `storage` reads; [] for a hub id. Raises trainers.storage.StorageError."""
    import pyarrow.fs as pafs

    from trainers import storage

    if not _is_file_like(path):
        return []
    fs, fs_path = storage.filesystem(path)
    with storage._errors(path, "read the dataset"):
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.NotFound:
            raise storage.StorageError(path, "the dataset does not exist", "check data.*.path")
        if info.type == pafs.FileType.File:
            return [path]
        found = [f.path for f in fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
                 if f.type == pafs.FileType.File and f.path.endswith(DATA_SUFFIXES)]
    prefix = "s3://" if path.startswith("s3://") else ""
    return [prefix + p for p in sorted(found)]


def rows(uri: str, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """(line or row number from 1, row) of a data file; a line that is not JSON raises DataError."""
    from trainers import storage

    fs, fs_path = storage.filesystem(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage._errors(uri, "read the dataset"):
            n = 0
            for batch in pq.ParquetFile(fs_path, filesystem=fs).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    n += 1
                    yield n, row
                    if limit and n >= limit:
                        return
        return
    with storage._errors(uri, "read the dataset"):
        text_stream = fs.open_input_stream(fs_path)
    if uri.endswith(".txt"):
        yield from _documents(text_stream, limit)
        return
    with text_stream as f:
        head = f.read(1 << 20) if uri.endswith(".json") else b""
        if head.lstrip().startswith(b"["):  # a JSON array, not JSON lines: read it whole
            data = _loads(head + f.read(), uri, 1)
            for i, row in enumerate(data if isinstance(data, list) else [data], 1):
                yield i, row
                if limit and i >= limit:
                    return
            return
        buffer, line_no = head, 0
        while True:
            chunk = f.read(1 << 20)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            if not chunk:
                lines, buffer = lines + [buffer], b""
            for line in lines:
                line_no += 1
                if line.strip():
                    yield line_no, _loads(line, uri, line_no)
                    if limit and line_no >= limit:
                        return
            if not chunk:
                return


def _documents(stream, limit: int | None) -> Iterator[tuple[int, Any]]:
    """(first line, `{"text": document}`) of a raw text file: documents are separated by
    blank lines (the rows `trainers.data.read_dataset` makes of a `.txt`)."""
    import io

    with stream as f:
        lines, start, n = [], 0, 0
        for line_no, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), 1):
            if line.strip():
                start = start or line_no
                lines.append(line.rstrip("\n"))
                continue
            if lines:
                n += 1
                yield start, {"text": "\n".join(lines)}
                if limit and n >= limit:
                    return
            lines, start = [], 0
        if lines:
            yield start, {"text": "\n".join(lines)}


def _loads(raw: bytes, uri: str, line_no: int) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{uri} line {line_no}: not valid JSON ({e})") from None


def first_problem(uri: str, check, limit: int | None = None) -> str | None:
    """`<file> line N: <problem>` for the first row of a file for which `check(row)` gives a
    problem (within the first `limit` rows), or None."""
    try:
        for line_no, row in rows(uri, limit):
            problem = check(row)
            if problem:
                return f"{uri} line {line_no}: {problem}"
    except DataError as e:
        return e.message
    return None


def peek_problems(ds: DatasetSpec, skip_bad: bool = False) -> list[str]:
    """`<file> line N: <problem>` for the first rows of each file of a dataset. With
    `skip_bad` (data.on_bad_rows: skip) a file is a problem only when all of its first rows
    are bad: a wrong `format`, not a few rows to skip. Raises trainers.storage.StorageError
    when the files cannot be read."""
    problems = []
    check = (lambda row: row_problem(row, ds))
    for uri in data_files(ds.path)[:8]:
        problem = _all_bad(uri, check, PEEK_ROWS) if skip_bad else first_problem(uri, check, PEEK_ROWS)
        if problem:
            problems.append(problem)
    return problems


def _all_bad(uri: str, check, limit: int) -> str | None:
    first = None
    try:
        for line_no, row in rows(uri, limit):
            problem = check(row)
            if not problem:
                return None
            first = first or f"{uri} line {line_no}: {problem}"
    except DataError as e:
        return e.message
    return first and f"{first} (and every row after it among the first {limit})"


def bad_rows(ds: DatasetSpec, check, limit: int) -> list[str]:
    """`<file> line N: <problem>` of up to `limit` bad rows over all of a dataset's files."""
    found: list[str] = []
    for uri in data_files(ds.path):
        try:
            for line_no, row in rows(uri):
                problem = check(row)
                if problem:
                    found.append(f"{uri} line {line_no}: {problem}")
                    if len(found) >= limit:
                        return found
        except DataError as e:
            found.append(e.message)
    return found


def is_chat_data(ds: DatasetSpec) -> bool | None:
    """Whether the dataset is rendered with a chat template: always for messages and
    sharegpt; for prompt_completion when its first row's prompt is a list of turns (None
    when that row cannot be read from here). Raises nothing."""
    from trainers import storage

    if ds.format in ("messages", "sharegpt"):
        return True
    if ds.format not in ("prompt_completion", "preference", "ranking", "prompt"):
        return False
    try:
        files = data_files(ds.path)
        first = next((row for _, row in rows(files[0], 1)), None) if files else None
    except (storage.StorageError, DataError):
        return None
    return None if first is None else is_conversational(first, ds)


def chat_datasets(spec, skip=lambda ds: False) -> list[str]:
    """`<YAML path> (format F)` of the spec's datasets that are chat data (rendered with a
    chat template); one whose rows cannot be read from here is left out."""
    return [f"{where} (format {ds.format})" for where, ds in spec.data.datasets()
            if not skip(ds) and is_chat_data(ds)]


def scan(ds: DatasetSpec, check) -> str | None:
    """`<file> line N: <problem>` for the first bad row over all of a dataset's files: the
    failure path of a tokenization task, which knows the row but not where it came from."""
    for uri in data_files(ds.path):
        problem = first_problem(uri, check)
        if problem:
            return problem
    return None
