"""Training data: read, format, tokenize and pack ONCE with Ray Data in the job's driver,
split there into one shard per worker (`split_for_workers`); workers read their shard
(`worker_shard`) and never re-tokenize.

Every row of the prepared dataset is one fixed-length sequence:
`input_ids`, `labels` (-100 where no loss is taken) and `attention_mask`; packed rows also
carry `position_ids` and `seq_ids`, so that each example attends only to itself (`pack`,
`model_inputs`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from trainers import chat_templates, data_check
from trainers.spec import AnyRun, DatasetSpec

IGNORE = -100
COMPARISON_FORMATS = ("preference", "ranking")  # rows of a prompt and its ranked responses, not sequences
PROMPT_COLUMN = "prompt_ids"  # format prompt: one row per prompt, its token ids (ppo writes the responses)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


# ---------------------------------------------------------------- formatting (pure)

def tokenize_example(row: dict[str, Any], ds: DatasetSpec, tok) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example; prompt tokens are masked for instruction data."""
    if ds.format == "text":
        ids = _bos(tok) + tok.encode(str(row[ds.text_field]), add_special_tokens=False) + _eos(tok)
        return ids, list(ids)
    if ds.format == "alpaca":
        inp = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if inp else "",
            instruction=row["instruction"],
            input_block=f"### Input:\n{inp}\n\n" if inp else "",
        )
        p = _bos(tok) + tok.encode(prompt, add_special_tokens=False)
        r = tok.encode(str(row["output"]), add_special_tokens=False) + _eos(tok)
        return p + r, [IGNORE] * len(p) + r
    if ds.format == "prompt_completion":
        return _tokenize_prompt_completion(row, ds, tok)
    return _tokenize_chat(chat_messages(row, ds), tok, ds.loss)


def tokenize_prompt(row: dict[str, Any], ds: DatasetSpec, tok) -> list[int]:
    """A prompt's token ids as the policy continues them: a string after BOS, chat turns
    rendered with the template and its generation prompt (the assistant header)."""
    prompt = row[ds.prompt_field]
    if isinstance(prompt, str):
        return _bos(tok) + tok.encode(prompt, add_special_tokens=False)
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return _encode_rendered(tok, _render(tok, messages, generation_prompt=True))


def chat_messages(row: dict[str, Any], ds: DatasetSpec) -> list[dict[str, str]]:
    """The row's conversation as `{role, content}` messages (formats messages and sharegpt);
    other keys of a turn are dropped, so templates see only what every template reads."""
    if ds.format == "sharegpt":
        return [{"role": ds.roles[t["from"]], "content": t["value"]} for t in row[ds.conversations_field]]
    return [{"role": m["role"], "content": m["content"]} for m in row[ds.messages_field]]


def _tokenize_prompt_completion(row: dict[str, Any], ds: DatasetSpec, tok) -> tuple[list[int], list[int]]:
    """TRL's prompt-completion convention. Strings: the prompt's tokens, then the
    completion's and EOS, each encoded on its own so the prompt is tokenized as it will be
    at inference. Turns: one conversation, trained on the completion's assistant turns."""
    prompt, completion = row[ds.prompt_field], row[ds.completion_field]
    if isinstance(prompt, list):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt + completion]
        return _tokenize_chat(messages, tok, ds.loss, first_trained=len(prompt))
    p = _bos(tok) + tok.encode(prompt, add_special_tokens=False)
    c = tok.encode(completion, add_special_tokens=False) + _eos(tok)
    return p + c, (list(p) if ds.loss == "all" else [IGNORE] * len(p)) + c


def _tokenize_chat(messages: list[dict[str, str]], tok, loss_on: str = "assistant",
                   first_trained: int = 0) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; `loss_on` says which turns train:
    `assistant` every assistant turn from message `first_trained` on, `last_turn` the last
    of them, `all` every token.

    Templates that mark assistant output with `{% generation %}` say exactly which tokens
    to train (Hugging Face's assistant mask). Otherwise a turn trains what the template adds
    for it after its assistant header (the generation prompt), found by rendering the
    conversation up to the turn and diffing token ids (see `_turn_span`)."""
    text = _render(tok, messages)
    ids = _encode_rendered(tok, text)
    if loss_on == "all":
        return ids, list(ids)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = [i for i in assistant if i >= first_trained]
    if loss_on == "last_turn":
        turns = turns[-1:]
    tagged = chat_templates.has_generation_tags(tok.chat_template)
    keep = [False] * len(ids)
    # Turn spans are needed without tags, and with tags to leave out some assistant turns
    # (a prompt's, or all but the last); the tags alone cover "every assistant turn".
    if not tagged or turns != assistant:
        for i in turns:
            start, end = _turn_span(tok, messages, i, text, ids)
            keep[start:end] = [True] * (end - start)
    if tagged:
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        if list(out["input_ids"]) != ids:  # transformers tokenizes its rendering as above; this guards the mask
            raise ValueError("the assistant mask does not line up with the rendered conversation")
        generated = [bool(m) for m in out["assistant_masks"]]
        keep = generated if turns == assistant else [g and k for g, k in zip(generated, keep)]
    return ids, [t if k else IGNORE for t, k in zip(ids, keep)]


def _render(tok, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    if not messages:
        # What comes before an opening assistant turn: apply_chat_template refuses an empty
        # conversation, the template itself renders one (often as BOS and the header).
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[[]], chat_template=tok.chat_template,
                                            add_generation_prompt=generation_prompt, **tok.special_tokens_map)
        return rendered[0]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode_rendered(tok, text: str) -> list[int]:
    # As apply_chat_template tokenizes: the template writes BOS and the like itself.
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _turn_span(tok, messages: list[dict[str, str]], i: int, full: str, ids: list[int]) -> tuple[int, int]:
    """Token positions [start, end) of assistant turn `i` in `ids` (the whole conversation,
    rendered as `full`), without its header: from the end of the conversation before it
    plus the generation prompt, to the end of the conversation through it.

    Positions come from token ids, not from searching the text: tokens that merge across a
    boundary (a header ending in a newline, content starting with one) move the boundary to
    the first token that differs, as TRL's `common_prefix_length` does. The rendered prefixes
    must be prefixes of the whole conversation's text; a template that renders earlier turns
    differently once more follow (some system-prompt placements) cannot be split this way."""
    before = _render(tok, messages[:i], generation_prompt=True)
    through = _render(tok, messages[: i + 1])
    if not (full.startswith(before) and full.startswith(through)):
        what = ("the conversation opens with an assistant turn, and the chat template renders its header "
                "differently with no turn before it" if i == 0 else
                f"the chat template renders the turns before assistant turn {i} differently once later turns follow")
        raise chat_templates.TemplateError(
            f"{what}, so the tokens of that turn cannot be told apart: use a template with {{% generation %}} "
            "tags (data.chat_template) or loss_on: all")
    return (_common_prefix(_encode_rendered(tok, before), ids),
            _common_prefix(_encode_rendered(tok, through), ids))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def _eos(tok) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def pack(examples: list[tuple[list[int], list[int]]], max_len: int, pad_id: int, packing: bool) -> dict[str, np.ndarray]:
    """Fixed-length rows: `input_ids`, `labels`, `attention_mask` (1 on non-pad tokens).

    Without packing, each example is truncated and padded on its own. With packing,
    examples are laid end to end and cut every `max_len` tokens (a row boundary may split
    an example), and each row also carries its segments, so that no example sees or
    predicts another (see `model_inputs`):

    - `seq_ids` (int32): the segment of each token in its row, 0, 1, ...; a segment is an
      example, or the part of one that a row boundary cut off. The chunk that goes on in the
      next row is a new segment there: it cannot attend to the row before anyway, so it is
      trained as an example of its own, positions from 0 (as a row's first tokens were
      before segments existed), not from where it stood in the whole example.
    - `position_ids` (int64): restart at 0 with every segment. Padding continues the last
      segment's positions (and seq id), which is how transformers reads packed rows: a new
      sequence wherever positions do not go up by one (`masking_utils.find_packed_sequence_indices`).
    - the first label of every segment is IGNORE: the causal LM loss predicts the label at
      position j from position j - 1, which for a segment's first token is the example before
      (or nothing). transformers' `DataCollatorWithFlattening` does the same.

    Rows without a single loss token are dropped."""
    if not packing:
        chunks = [(ids[:max_len], labels[:max_len]) for ids, labels in examples]
        chunks = [(ids, labels) for ids, labels in chunks if any(x != IGNORE for x in labels)]
        return _padded_rows(chunks, max_len, pad_id)
    return _packed_rows(examples, max_len, pad_id)


def _padded_rows(chunks: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(chunks)
    input_ids = np.full((n, max_len), pad_id, dtype=np.int64)
    labels = np.full((n, max_len), IGNORE, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    for row, (ids, lab) in enumerate(chunks):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(lab)] = lab
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _packed_rows(examples: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    # The same cut as plain concatenation (the same rows, less any left without a label), with
    # segment starts marked on the flat token stream and positions counted from the last.
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    n = int(lengths.sum())
    rows = -(-n // max_len)
    flat_ids = np.full(rows * max_len, pad_id, dtype=np.int64)
    flat_labels = np.full(rows * max_len, IGNORE, dtype=np.int64)
    flat_ids[:n] = [t for ids, _ in examples for t in ids]
    flat_labels[:n] = [t for _, labels in examples for t in labels]
    # A segment starts where an example starts and where a row starts (a split example's rest).
    starts = np.zeros(rows * max_len, dtype=bool)
    example_starts = np.cumsum(lengths) - lengths
    starts[example_starts[example_starts < n]] = True
    starts[::max_len] = True
    flat_labels[starts] = IGNORE
    starts = starts.reshape(rows, max_len)
    col = np.arange(max_len)
    segment_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
    out = {
        "input_ids": flat_ids.reshape(rows, max_len),
        "labels": flat_labels.reshape(rows, max_len),
        "attention_mask": (np.arange(rows * max_len) < n).astype(np.int64).reshape(rows, max_len),
        "position_ids": (col - segment_start).astype(np.int64),
        "seq_ids": (np.cumsum(starts, axis=1) - 1).astype(np.int32),
    }
    keep = (out["labels"] != IGNORE).any(axis=1)
    return {k: v[keep] for k, v in out.items()}


# ---------------------------------------------------------------- Ray Data (driver)

@dataclass
class Prepared:
    train: Any  # ray.data.Dataset
    eval: Any | None
    rows: int | None  # None: data.streaming (not counted up front)
    eval_rows: int
    tokens: int | None
    loss_tokens: int | None
    packing_efficiency: float | None
    task_evals: dict[str, Any] = field(default_factory=dict)  # multitask: "eval_<task>" -> its eval set
    mixture: dict[str, dict[str, Any]] = field(default_factory=dict)  # multitask: task -> share, rows, sequences
    bad_rows: dict[str, int] = field(default_factory=dict)  # data.on_bad_rows skip: YAML path -> rows left out
    bad_row_counter: Any = None  # data.streaming: the counter actor, read after the run


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str, trust_remote_code: bool, chat_template: str | None = None):
    """Loaded once per Ray worker process. Tasks may run on any node, so an `s3://` model's
    tokenizer files are fetched (once per node, without weights) where the task runs."""
    from trainers import models, secrets_env

    secrets_env.load()  # an s3:// model: this task may run in a process that has not loaded them
    return models.load_tokenizer(models.local_model_dir(model_path, weights=False), trust_remote_code, chat_template)


def _tokenize_batch(batch, *, ds: DatasetSpec, where: str, model_path: str, trust_remote_code: bool, max_len: int,
                    packing: bool, chat_template: str | None = None, bad_rows=None):
    """Format, tokenize and pack a batch of raw rows. A bad row fails the task, or with
    `bad_rows` (data.on_bad_rows: skip; a BadRows actor) is left out and counted there."""
    from trainers import preference_data  # it builds on this module's chat tokenization

    tok = _tokenizer(model_path, trust_remote_code, chat_template)
    comparisons = ds.format in COMPARISON_FORMATS
    check = (lambda r: preference_data.checked(r, ds, tok)) if comparisons else (lambda r: _formatted(r, ds, tok))
    examples, skipped = [], 0
    for row in batch.to_pylist():
        example, problem = check(row)
        if problem and bad_rows is not None:
            skipped += 1
            continue
        if problem:
            # Only on failure: find the file and line of the first bad row (a task knows neither).
            located = data_check.scan(ds, lambda r: check(r)[1])
            raise data_check.DataError(f"{where} (format {ds.format}): {located or f'{ds.path}: a row {problem}'}")
        examples.append(example)
    if skipped:
        import ray

        ray.get(bad_rows.add.remote(where, skipped))  # counted before the task's rows are: none is lost
    if ds.format == "prompt":  # the longest prompts keep their end, next to where the response starts
        import pyarrow as pa

        return pa.table({PROMPT_COLUMN: pa.array([ids[-max_len:] for ids in examples], type=pa.list_(pa.int32()))})
    if comparisons:  # one row per prompt and its responses, unpacked (see trainers.preference_data)
        kept = [rec for rec, _ in (preference_data.truncate(r, max_len, tok.bos_token_id) for r in examples)
                if rec is not None]
        return preference_data.to_table(kept)
    return pack(examples, max_len, tok.pad_token_id, packing)


def bad_row_problem(ds: DatasetSpec, spec: AnyRun):
    """The check a tokenization task makes of a row, for the driver's report of skipped rows."""
    from trainers import preference_data

    tok = _tokenizer(spec.model.path, spec.model.trust_remote_code, spec.data.chat_template)
    if ds.format in COMPARISON_FORMATS:
        return lambda row: preference_data.checked(row, ds, tok)[1]
    return lambda row: _formatted(row, ds, tok)[1]


def _bad_row_counter():
    """An actor the tokenization tasks count skipped rows on, per dataset (YAML path)."""
    import ray

    @ray.remote(num_cpus=0)
    class BadRows:
        def __init__(self):
            self.counts: dict[str, int] = {}

        def add(self, where: str, n: int) -> None:
            self.counts[where] = self.counts.get(where, 0) + n

        def get(self) -> dict[str, int]:
            return self.counts

    return BadRows.remote()


def _formatted(row: dict[str, Any], ds: DatasetSpec, tok) -> tuple[tuple[list[int], list[int]] | None, str | None]:
    """(token ids and labels, None), or (None, what is wrong with the row); a `prompt` row's
    example is its token ids alone."""
    problem = data_check.row_problem(row, ds)
    if problem:
        return None, problem
    try:
        return (tokenize_prompt(row, ds, tok) if ds.format == "prompt" else tokenize_example(row, ds, tok)), None
    except Exception as e:  # a template error, an odd value: the row is the user's to fix
        return None, f"cannot be formatted: {type(e).__name__}: {e}"


def read_dataset(ds: DatasetSpec):
    """A Ray Dataset of raw rows from a local path, `s3://`, or a hub dataset id."""
    import ray.data

    from trainers import storage

    path = ds.path
    is_file_like = "://" in path or path.endswith(data_check.DATA_SUFFIXES) or _local_exists(path)
    if not is_file_like:
        import datasets

        return ray.data.from_huggingface(datasets.load_dataset(path, split=ds.split))
    fs, fs_path = storage.filesystem(path)
    if fs_path.endswith(".txt") or _dir_has(fs, fs_path, ".txt"):
        # One task per file, its documents (blank-line separated) one row each, as
        # data_check.rows reads them: a corpus streams file by file.
        files = ray.data.read_binary_files(fs_path, filesystem=fs, file_extensions=["txt"])
        return files.flat_map(_txt_documents)
    if fs_path.endswith(".parquet") or _dir_has(fs, fs_path, ".parquet"):
        return ray.data.read_parquet(fs_path, filesystem=fs)
    return ray.data.read_json(fs_path, filesystem=fs)  # newline-delimited or a JSON array


def _txt_documents(row: dict[str, Any]) -> list[dict[str, str]]:
    import io

    return [doc for _, doc in data_check._documents(io.BytesIO(row["bytes"]), None)]


def _local_exists(path: str) -> bool:
    import os

    return os.path.exists(os.path.expanduser(path))


def _dir_has(fs, path: str, suffix: str) -> bool:
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return False
    return any(f.path.endswith(suffix) for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)))


def prepare(spec: AnyRun) -> Prepared:
    """Tokenize and pack every dataset once, split off eval rows, shuffle, materialize."""
    from ray.data import DataContext

    # Blocks in the order of the input, not of task completion: with the seeded shuffle, the
    # same spec sees the same batches in the same order (a search's best.yaml reproduces
    # its trial).
    DataContext.get_current().execution_options.preserve_order = True
    bad = _bad_row_counter() if spec.data.on_bad_rows == "skip" else None
    if spec.data.streaming:
        return _prepare_stream(spec, bad)
    prepared = _prepare_mixture(spec, bad) if spec.method == "multitask" else _prepare_single(spec, bad)
    if bad is not None:
        prepared.bad_rows = bad_row_counts(bad)
    return prepared


def bad_row_counts(counter) -> dict[str, int]:
    """Rows left out per dataset (YAML path), from the tasks' counter actor, which ends here."""
    import ray

    counts = {k: n for k, n in ray.get(counter.get.remote()).items() if n}
    ray.kill(counter)
    return counts


def _prepare_single(spec: AnyRun, bad) -> Prepared:
    d, seed = spec.data, spec.train.seed
    train = _tokenized(spec, [(f"data.train[{i}]", ds) for i, ds in enumerate(d.train)], bad).materialize()
    evaluation = _tokenized(spec, [(f"data.eval[{i}]", ds) for i, ds in enumerate(d.eval)], bad) if d.eval else None
    if evaluation is None and d.eval_fraction > 0:
        train, evaluation = train.train_test_split(test_size=d.eval_fraction, shuffle=True, seed=seed)
    mixture = {}
    if d.replay:  # after the eval split: the held-out rows are the domain's own
        replay = _tokenized(spec, [(f"data.replay[{i}]", ds) for i, ds in enumerate(d.replay)], bad).materialize()
        n, have = train.count(), replay.count()
        if have == 0:
            raise ValueError("data.replay: no sequences after tokenization (are the files empty?)")
        want = max(1, round(d.replay_weight / (1 - d.replay_weight) * n))
        train = train.materialize().union(_sample(replay, have, want, seed + 1))
        mixture = {"train": {"share": n / (n + want), "rows": n, "sequences": n},
                   "replay": {"share": want / (n + want), "rows": want, "sequences": have}}
    return _finish(spec, train, evaluation.materialize() if evaluation is not None else None, mixture=mixture)


def _prepare_stream(spec: AnyRun, bad) -> Prepared:
    """data.streaming: the training rows stay a lazy Ray Dataset, read, tokenized and packed
    while the workers train (Ray Train splits it with streaming_split); nothing is counted or
    shuffled globally up front. Eval data is small and prepared as usual. Skipped rows are
    counted as the stream goes (`Prepared.bad_row_counter`) and reported after the run."""
    from ray.data import DataContext, ExecutionResources

    d = spec.data
    if d.stream_memory_mb:
        # Ray Train's ingest takes the driver's limits (DataConfig.default_ingest_options).
        DataContext.get_current().execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=d.stream_memory_mb << 20)
    train = _tokenized(spec, [(f"data.train[{i}]", ds) for i, ds in enumerate(d.train)], bad)
    evaluation = None
    if d.eval:
        evaluation = _tokenized(spec, [(f"data.eval[{i}]", ds) for i, ds in enumerate(d.eval)], bad).materialize()
    return Prepared(train=train, eval=evaluation, rows=None, eval_rows=evaluation.count() if evaluation else 0,
                    tokens=None, loss_tokens=None, packing_efficiency=None, bad_row_counter=bad)


def _tokenized(spec: AnyRun, datasets: list[tuple[str, DatasetSpec]], bad_rows=None):
    """One Ray Dataset of the packed rows of `datasets` ((YAML path, dataset) pairs)."""
    d = spec.data
    parts = [
        read_dataset(ds).map_batches(
            _tokenize_batch,
            batch_format="pyarrow",
            batch_size=1024,
            fn_kwargs=dict(ds=ds, where=where, model_path=spec.model.path,
                           trust_remote_code=spec.model.trust_remote_code, max_len=d.max_seq_len,
                           packing=d.packing, chat_template=d.chat_template, bad_rows=bad_rows),
        )
        for where, ds in datasets
    ]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _finish(spec: AnyRun, train, evaluation, **extra) -> Prepared:
    """Shuffle (seeded), materialize and count the training rows."""
    if spec.data.shuffle:
        train = train.random_shuffle(seed=spec.train.seed)
    train = train.materialize()
    rows = train.count()
    if rows == 0:
        raise ValueError("data.train: no training sequences after tokenization (are the files empty?)")
    comparisons = spec.method in ("reward", "dpo", "ppo")  # rows that are not packed sequences
    counted = {"reward": _count_record_tokens, "dpo": _count_record_tokens, "ppo": _count_prompt_tokens}.get(
        spec.method, _count_tokens)
    tokens, loss_tokens = _token_sums(train, counted, "pyarrow" if comparisons else "numpy")
    return Prepared(
        train=train,
        eval=evaluation,
        rows=rows,
        eval_rows=sum(ds.count() for ds in [evaluation, *extra.get("task_evals", {}).values()] if ds is not None),
        tokens=tokens,
        loss_tokens=loss_tokens,
        packing_efficiency=None if comparisons else tokens / (rows * spec.data.max_seq_len),
        **extra,
    )


# ---------------------------------------------------------------- multi-task mixtures

def mixture_shares(sizes: dict[str, int], weights: dict[str, float], mixing: str,
                   temperature: float) -> dict[str, float]:
    """Each task's share of the mixture: weight_i / sum(weights) (`weights`), or
    n_i^(1/T) / sum_j n_j^(1/T) over the tasks' sequence counts (`temperature`)."""
    raw = weights if mixing == "weights" else {k: n ** (1.0 / temperature) for k, n in sizes.items()}
    total = sum(raw.values())
    return {k: raw[k] / total for k in sizes}


def mixture_rows(shares: dict[str, float], total: int) -> dict[str, int]:
    """`total` rows split by `shares`, rounded so that they add up to `total` (largest
    remainders first), and at least one row per task."""
    exact = {k: p * total for k, p in shares.items()}
    rows = {k: max(1, int(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - int(exact[k]), reverse=True)[: max(0, total - sum(rows.values()))]:
        rows[k] += 1
    return rows


def _sample(ds, have: int, want: int, seed: int):
    """`want` rows of a dataset of `have`: whole passes over it, then a seeded sample."""
    passes, rest = divmod(want, have)
    parts = [ds] * passes + ([ds.random_shuffle(seed=seed).limit(rest)] if rest else [])
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _with_task(batch: dict[str, np.ndarray], *, task_id: int) -> dict[str, np.ndarray]:
    return {**batch, "task_id": np.full(len(batch["input_ids"]), task_id, dtype=np.int32)}


def _prepare_mixture(spec, bad) -> Prepared:
    """Each task packed on its own (no sequence mixes two tasks) and tagged with its
    `task_id`; the training mixture holds each task's share of rows; each task's eval set
    is a dataset of its own (`eval_<task>`), for its own eval loss."""
    d, seed = spec.data, spec.train.seed
    names = list(d.tasks)
    trains, evals = {}, {}
    for task_id, (name, task) in enumerate(d.tasks.items()):
        train = _tokenized(spec, [(f"data.tasks.{name}.train[{i}]", ds) for i, ds in enumerate(task.train)], bad)
        train = train.map_batches(_with_task, batch_format="numpy", fn_kwargs={"task_id": task_id}).materialize()
        evaluation = None
        if task.eval:
            evaluation = _tokenized(spec, [(f"data.tasks.{name}.eval[{i}]", ds) for i, ds in enumerate(task.eval)], bad)
        elif task.eval_fraction > 0:
            train, evaluation = train.train_test_split(test_size=task.eval_fraction, shuffle=True, seed=seed)
        trains[name] = train.materialize()
        if evaluation is not None:
            evals[f"eval_{name}"] = evaluation.materialize()
    sizes = {name: ds.count() for name, ds in trains.items()}
    empty = [name for name, n in sizes.items() if n == 0]
    if empty:
        raise ValueError(f"data.tasks.{empty[0]}: no training sequences after tokenization (are the files empty?)")
    shares = mixture_shares(sizes, {k: t.weight for k, t in d.tasks.items()}, d.mixing, d.temperature)
    rows = mixture_rows(shares, d.mixture_rows or sum(sizes.values()))
    mixture = [_sample(trains[name], sizes[name], rows[name], seed + i) for i, name in enumerate(names)]
    return _finish(spec, mixture[0].union(*mixture[1:]), None, task_evals=evals,
                   mixture={name: {"share": shares[name], "rows": rows[name], "sequences": sizes[name]}
                            for name in names})


def _count_record_tokens(table) -> dict[str, np.ndarray]:
    from trainers import preference_data

    sizes = [preference_data.record_sizes(r) for r in preference_data.from_table(table)]
    return {"tokens": np.array([t for _, t, _ in sizes], dtype=np.int64),
            "loss_tokens": np.array([n for _, _, n in sizes], dtype=np.int64)}


def _token_sums(ds, counted, batch_format: str) -> tuple[int, int]:
    """Tokens and loss tokens of a materialized dataset: one row of sums per block, added up
    here. `Dataset.sum` would start Ray Data's hash-aggregation actors for it, several
    seconds of every run's start for two numbers."""

    def per_block(batch) -> dict[str, np.ndarray]:
        return {k: np.array([int(np.sum(v))]) for k, v in counted(batch).items()}

    rows = ds.map_batches(per_block, batch_format=batch_format, batch_size=None).take_all()
    return sum(int(r["tokens"]) for r in rows), sum(int(r["loss_tokens"]) for r in rows)


def _count_prompt_tokens(table) -> dict[str, np.ndarray]:
    lengths = np.array([len(ids) for ids in table.column(PROMPT_COLUMN).to_pylist()], dtype=np.int64)
    return {"tokens": lengths, "loss_tokens": np.zeros_like(lengths)}  # the responses train, not the prompts


def collate_comparisons(columns: dict[str, np.ndarray], pad_id: int) -> dict[str, Any]:
    """A micro-batch of preference/ranking rows (numpy columns of a fetch) as torch tensors:
    every response of a prompt in the same micro-batch, padded to the longest in it."""
    import torch

    from trainers import preference_data

    n = len(columns["prompt"])
    records = [preference_data.from_row({k: v[i] for k, v in columns.items()}) for i in range(n)]
    return {k: torch.from_numpy(v) for k, v in preference_data.collate(records, pad_id).items()}


def _count_tokens(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": batch["attention_mask"].sum(axis=1),
        "loss_tokens": (batch["labels"] != IGNORE).sum(axis=1),
    }


# ---------------------------------------------------------------- workers

def split_for_workers(datasets: dict[str, Any], workers: int) -> dict[str, list[Any]]:
    """Each prepared dataset split once, in the driver, into one shard per worker rank
    (Ray Data's `split`, equal row counts: every rank takes the same number of steps and
    evaluation batches), for the loop's config (`worker_shard`).

    Why not Ray Train's `datasets=`: it gives every dataset a SplitCoordinator actor that
    re-runs a `streaming_split` each epoch. For data that is already materialized that is
    one more process per dataset (started when a worker first asks, ~3 s of every run's
    start and of its first evaluation on 2 cores), a stall at every epoch boundary, and no
    promise of the same rows to the same rank (a resumed run skips the right count of
    steps, but not necessarily the same rows). A static split of the materialized blocks
    has none of that; only a stream (`data.streaming`) needs the coordinator."""
    return {name: ds.materialize().split(workers, equal=True) for name, ds in datasets.items()}


def worker_shard(config: dict[str, Any], name: str, rank: int):
    """This rank's shard of dataset `name`: its part of the driver's split, or (a stream)
    Ray Train's streaming shard. Both iterate with `iter_batches` / `iter_torch_batches`."""
    import ray.train

    shards = config.get("shards") or {}
    return shards[name][rank] if name in shards else ray.train.get_dataset_shard(name)


def steps_per_epoch(rows: int, workers: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; every worker takes the same number (an equal split)."""
    return (rows // workers) // (micro_batch_size * grad_accum)


def model_inputs(batch: dict[str, Any], device, attn_implementation: str | None = None) -> dict[str, Any]:
    """The model's keyword arguments for a micro-batch of prepared rows (torch tensors), on
    `device`; `labels` included (the model's loss shifts them itself).

    Unpacked rows go as they always did, with their 2D padding mask. Packed rows go with
    their `position_ids` and no `attention_mask`: transformers' `create_causal_mask`
    (masking_utils) then finds the packed sequences from the restarting positions
    (`find_packed_sequence_indices`) and builds a block-diagonal causal mask for sdpa,
    eager and flex attention. It looks only when there is no 2D mask and no cache, so the
    cache is turned off here (a model whose config says `use_cache: true` would otherwise
    make one, and attend across examples). Right padding needs no mask: it comes after
    every real token, and causal attention never shows a token what comes after it.

    Flash attention reads packing from `position_ids` only for a batch of one row
    (modeling_flash_attention_utils `_is_packed_sequence`), so there the rows are laid end
    to end into one, as `DataCollatorWithFlattening` does: every segment's first label is
    IGNORE, so no row learns to predict the next one's first token."""
    packed = "position_ids" in batch
    names = ("input_ids", "labels", "position_ids") if packed else ("input_ids", "labels", "attention_mask")
    inputs = {k: batch[k].to(device, non_blocking=True) for k in names}
    if packed and attn_implementation and "flash" in attn_implementation:
        inputs = {k: v.reshape(1, -1) for k, v in inputs.items()}
    return {**inputs, "use_cache": False}


def attn_implementation(model) -> str | None:
    """The attention the model runs (`sdpa`, `eager`, `flash_attention_2`, ...); a PEFT
    model answers for its base model."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def micro_batches(shard, *, micro_batch_size: int, grad_accum: int, start_step: int, total_steps: int,
                  steps_per_epoch: int | None, shuffle_buffer: int | None = None, seed: int = 0,
                  steps_per_fetch: int = 1, collate=None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(step, [micro-batch dicts of torch tensors] * grad_accum) from `start_step` on.

    Rows are fetched `steps_per_fetch` optimizer steps at a time and sliced here: Ray Data
    formats batches in threads of this process, so a few large fetches per epoch cost far
    less per step than one per step (see `fetch_steps`).
    A resumed run skips what it already trained on: the steps of the epoch so far or, for a
    stream (`steps_per_epoch` None: not counted), every step since the start, pass by pass.
    `shuffle_buffer`: rows in a local shuffle buffer (streams are not shuffled globally).
    `collate`: rows of variable length (preference pairs) become a micro-batch's tensors
    here, padded to the longest in it, instead of being sliced from fixed-length rows."""
    step = start_step
    rows_per_step = micro_batch_size * grad_accum
    skip = step % steps_per_epoch if steps_per_epoch else step
    passes = 0
    while step < total_steps:
        trained = skipped = 0
        for i, rows in enumerate(_step_rows(shard, rows_per_step, steps_per_fetch if steps_per_epoch else 1,
                                            shuffle_buffer, seed + passes, as_tensors=collate is None)):
            if skip:
                skip, skipped = skip - 1, skipped + 1
                continue
            if (steps_per_epoch and i >= steps_per_epoch) or step >= total_steps:
                break
            micro = [{k: t[j * micro_batch_size:(j + 1) * micro_batch_size] for k, t in rows.items()}
                     for j in range(grad_accum)]
            yield step, micro if collate is None else [collate(m) for m in micro]
            step, trained = step + 1, trained + 1
        passes += 1
        if not trained and not skipped:
            raise RuntimeError(f"dataset shard ran out before step {step}: fewer rows than one optimizer step needs")


def _step_rows(shard, rows_per_step: int, steps_per_fetch: int, shuffle_buffer: int | None,
               seed: int, as_tensors: bool = True) -> Iterator[dict[str, Any]]:
    """One pass over the shard as torch tensors (or the numpy columns, for a collate) of one
    optimizer step's rows each (a last partial step is dropped, as `steps_per_epoch` counts
    whole steps)."""
    import torch

    for chunk in shard.iter_batches(batch_size=rows_per_step * steps_per_fetch, batch_format="numpy",
                                    drop_last=False, prefetch_batches=1 if steps_per_fetch > 1 else 2,
                                    local_shuffle_buffer_size=shuffle_buffer,
                                    local_shuffle_seed=seed if shuffle_buffer else None):
        tensors = ({k: torch.from_numpy(np.require(v, requirements="W")) for k, v in chunk.items()}
                   if as_tensors else chunk)
        n = len(next(iter(tensors.values()))) // rows_per_step
        for c in range(n):
            yield {k: t[c * rows_per_step:(c + 1) * rows_per_step] for k, t in tensors.items()}


FETCH_BYTES = 256 << 20  # rows a worker holds per fetch from its shard (and one more prefetched)


def fetch_steps(rows_per_step: int, max_seq_len: int, steps_per_epoch: int | None) -> int:
    """Optimizer steps per fetch: as many as fit FETCH_BYTES (five int64 columns per
    token), at most an epoch; one for a stream, whose first fetch would otherwise wait
    for that much of the corpus to be tokenized."""
    if not steps_per_epoch:
        return 1
    return max(1, min(steps_per_epoch, FETCH_BYTES // (rows_per_step * max_seq_len * 5 * 8)))
