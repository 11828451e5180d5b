"""Training data: read, format, tokenize and pack ONCE with Ray Data in the job's driver;
workers then read their shard with `ray.train.get_dataset_shard` and never re-tokenize.

Every row of the prepared dataset is one fixed-length sequence:
`input_ids`, `labels` (-100 where no loss is taken) and `attention_mask`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from trainers import data_check
from trainers.spec import AnyRun, DatasetSpec

IGNORE = -100
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
    return _tokenize_chat(row[ds.messages_field], tok)


def _tokenize_chat(messages: list[dict[str, str]], tok) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; loss only on assistant turns.

    Templates that mark assistant output with `{% generation %}` say exactly which tokens
    to train (Hugging Face's assistant mask). Otherwise each turn is tokenized as the text
    the template adds for it, so the mask lines up with the ids; the assistant header (the
    generation prompt) stays masked, everything else the template adds to the turn trains."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if "{% generation %}" in (tok.chat_template or "") or "{%- generation %}" in (tok.chat_template or ""):
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            header = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            seg = tok.encode(header[len(rendered):], add_special_tokens=False)
            ids += seg
            labels += [IGNORE] * len(seg)
            rendered = header
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        seg = tok.encode(full[len(rendered):], add_special_tokens=False)
        ids += seg
        labels += seg if msg["role"] == "assistant" else [IGNORE] * len(seg)
        rendered = full
    return ids, labels


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def _eos(tok) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def pack(examples: list[tuple[list[int], list[int]]], max_len: int, pad_id: int, packing: bool) -> dict[str, np.ndarray]:
    """Fixed-length rows. With packing, examples are concatenated and cut every
    `max_len` tokens; without, each example is truncated and padded on its own."""
    if packing:
        flat_ids = [t for ids, _ in examples for t in ids]
        flat_labels = [t for _, labels in examples for t in labels]
        chunks = [(flat_ids[i:i + max_len], flat_labels[i:i + max_len]) for i in range(0, len(flat_ids), max_len)]
    else:
        chunks = [(ids[:max_len], labels[:max_len]) for ids, labels in examples]
    chunks = [(ids, labels) for ids, labels in chunks if any(x != IGNORE for x in labels)]
    n = len(chunks)
    input_ids = np.full((n, max_len), pad_id, dtype=np.int64)
    labels = np.full((n, max_len), IGNORE, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    for row, (ids, lab) in enumerate(chunks):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(lab)] = lab
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------- Ray Data (driver)

@dataclass
class Prepared:
    train: Any  # ray.data.Dataset
    eval: Any | None
    rows: int
    eval_rows: int
    tokens: int
    loss_tokens: int
    packing_efficiency: float


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str, trust_remote_code: bool):
    """Loaded once per Ray worker process. Tasks may run on any node, so an `s3://` model's
    tokenizer files are fetched (once per node, without weights) where the task runs."""
    from trainers import models, secrets_env

    secrets_env.load()  # an s3:// model: this task may run in a process that has not loaded them
    return models.load_tokenizer(models.local_model_dir(model_path, weights=False), trust_remote_code)


def _tokenize_batch(batch, *, ds: DatasetSpec, where: str, model_path: str, trust_remote_code: bool, max_len: int,
                    packing: bool):
    tok = _tokenizer(model_path, trust_remote_code)
    examples = []
    for row in batch.to_pylist():
        example, problem = _formatted(row, ds, tok)
        if problem:
            # Only on failure: find the file and line of the first bad row (a task knows neither).
            located = data_check.scan(ds, lambda r: _formatted(r, ds, tok)[1])
            raise data_check.DataError(f"{where} (format {ds.format}): {located or f'{ds.path}: a row {problem}'}")
        examples.append(example)
    return pack(examples, max_len, tok.pad_token_id, packing)


def _formatted(row: dict[str, Any], ds: DatasetSpec, tok) -> tuple[tuple[list[int], list[int]] | None, str | None]:
    """(token ids and labels, None), or (None, what is wrong with the row)."""
    problem = data_check.row_problem(row, ds)
    if problem:
        return None, problem
    try:
        return tokenize_example(row, ds, tok), None
    except Exception as e:  # a template error, an odd value: the row is the user's to fix
        return None, f"cannot be formatted: {type(e).__name__}: {e}"


def read_dataset(ds: DatasetSpec):
    """A Ray Dataset of raw rows from a local path, `s3://`, or a hub dataset id."""
    import ray.data

    from trainers import storage

    path = ds.path
    is_file_like = "://" in path or path.endswith((".json", ".jsonl", ".parquet")) or _local_exists(path)
    if not is_file_like:
        import datasets

        return ray.data.from_huggingface(datasets.load_dataset(path, split=ds.split))
    fs, fs_path = storage.filesystem(path)
    if fs_path.endswith(".parquet") or _dir_has(fs, fs_path, ".parquet"):
        return ray.data.read_parquet(fs_path, filesystem=fs)
    return ray.data.read_json(fs_path, filesystem=fs)  # newline-delimited or a JSON array


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
    d = spec.data

    def tokenized(split: str):
        parts = [
            read_dataset(ds).map_batches(
                _tokenize_batch,
                batch_format="pyarrow",
                batch_size=1024,
                fn_kwargs=dict(ds=ds, where=f"data.{split}[{i}]", model_path=spec.model.path,
                               trust_remote_code=spec.model.trust_remote_code, max_len=d.max_seq_len,
                               packing=d.packing),
            )
            for i, ds in enumerate(getattr(d, split))
        ]
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    train = tokenized("train").materialize()
    evaluation = tokenized("eval").materialize() if d.eval else None
    if evaluation is None and d.eval_fraction > 0:
        train, evaluation = train.train_test_split(test_size=d.eval_fraction, shuffle=True, seed=spec.train.seed)
    if d.shuffle:
        train = train.random_shuffle(seed=spec.train.seed)
    train = train.materialize()
    rows = train.count()
    if rows == 0:
        raise ValueError("data.train: no training sequences after tokenization (are the files empty?)")
    stats = train.map_batches(_count_tokens, batch_format="numpy").sum(["tokens", "loss_tokens"])
    tokens, loss_tokens = int(stats["sum(tokens)"]), int(stats["sum(loss_tokens)"])
    return Prepared(
        train=train,
        eval=evaluation.materialize() if evaluation is not None else None,
        rows=rows,
        eval_rows=evaluation.count() if evaluation is not None else 0,
        tokens=tokens,
        loss_tokens=loss_tokens,
        packing_efficiency=tokens / (rows * d.max_seq_len),
    )


def _count_tokens(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": batch["attention_mask"].sum(axis=1),
        "loss_tokens": (batch["labels"] != IGNORE).sum(axis=1),
    }


# ---------------------------------------------------------------- workers

def steps_per_epoch(rows: int, workers: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; every worker takes the same number (an equal split)."""
    return (rows // workers) // (micro_batch_size * grad_accum)


def micro_batches(shard, *, micro_batch_size: int, grad_accum: int, start_step: int, total_steps: int,
                  steps_per_epoch: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(step, [micro-batch dicts of torch tensors] * grad_accum) from `start_step` on.

    One optimizer step's rows are fetched at once and sliced here: Ray Data formats
    batches in threads of this process, so fewer, larger fetches cost less per step."""
    import torch

    step = start_step
    rows_per_step = micro_batch_size * grad_accum
    while step < total_steps:
        skip = step % steps_per_epoch  # resuming mid-epoch: skip what was already trained on
        epoch_start = step
        for i, batch in enumerate(shard.iter_batches(batch_size=rows_per_step, batch_format="numpy",
                                                    drop_last=True, prefetch_batches=2)):
            if i < skip:
                continue
            if i >= steps_per_epoch or step >= total_steps:
                break
            tensors = {k: torch.from_numpy(np.require(v, requirements='W')) for k, v in batch.items()}
            yield step, [
                {k: t[j * micro_batch_size:(j + 1) * micro_batch_size] for k, t in tensors.items()}
                for j in range(grad_accum)
            ]
            step += 1
        if step == epoch_start:
            raise RuntimeError(f"dataset shard ran out before step {step}: fewer rows than steps_per_epoch expects")
