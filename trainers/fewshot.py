"""Few-shot evaluation: k solved examples, then a held-out question; accuracy by exact-match
generation or by multiple-choice log-likelihood. Scored before training and after, the two
accuracies say what the fine-tune bought over k-shot prompting (`compare`).

Read top to bottom: the rows are read and checked (`read_rows`, `load`); every scored row
draws its own shots (`pick_shots`) and becomes a prompt (`build_prompt`); `evaluate` scores
its rank's share of the rows (`score_generate` or `score_choice`) and sums the counts over
the ranks.

The model is a plain Hugging Face model or a DeepSpeed engine's `.module`, ZeRO-3 included
(see `evaluate`). torch is imported inside the scoring functions: reading and checking the
rows needs no torch, so the job's driver can check the files (`load`) before any worker
starts.
"""

from __future__ import annotations

import math
import random
from typing import Any

from trainers import data_check, storage
from trainers.data import _common_prefix
from trainers.spec import FewshotSpec
from trainers.user_errors import JobUserError

SPEC_KEY = "eval.fewshot"  # where the spec sits in a run spec: error messages name its fields
ROWS_HINT = "fix the rows, or eval.fewshot's question_field, answer_field, choices_field and template"


# ---------------------------------------------------------------- rows

def read_rows(uri: str, spec: FewshotSpec, field: str = "path") -> list[dict[str, Any]]:
    """Every row of the file at `uri` (or of the data files of that directory), each checked
    for what `spec` reads from it. `field` is the spec field that named `uri` (`path` or
    `pool`). A missing, unreadable or empty file, a line that is not JSON and a row that lacks
    a field raise JobUserError, naming the file, the line and the field."""
    where = f"{SPEC_KEY}.{field}"
    rows = []
    try:
        # data_check reads what the training data may be (jsonl, json arrays, parquet; local
        # or s3:// through trainers.storage) and numbers lines as an editor does.
        files = data_check.data_files(uri)
        if not files:
            raise JobUserError(f"{where}: {uri} is not a .jsonl, .json or .parquet file, nor a directory of them",
                               hint="give a local path or an s3:// URI of the questions")
        for file in files:
            for line, row in data_check.rows(file):
                if problem := row_problem(row, spec):
                    raise JobUserError(f"{where}: {file} line {line}: {problem}", hint=ROWS_HINT)
                rows.append(row)
    except storage.StorageError as e:
        raise JobUserError(f"{where}: {e}", hint=e.hint) from None
    except data_check.DataError as e:
        raise JobUserError(f"{where}: {e.message}", hint=ROWS_HINT) from None
    if not rows:
        raise JobUserError(f"{where}: {uri} has no rows", hint="give a file with one question per line")
    return rows


def row_problem(row: Any, spec: FewshotSpec) -> str | None:
    """What stops one row from being a question or a shot under `spec`, or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {data_check._type(row)}"
    q, a, c = spec.question_field, spec.answer_field, spec.choices_field
    needed = [(q, "question_field"), (a, "answer_field")] + ([(c, "choices_field")] if spec.mode == "choice" else [])
    for key, option in needed:
        if row.get(key) is None:  # Arrow fills a field that some rows lack with null
            have = ", ".join(f"`{k}`" for k, v in row.items() if v is not None) or "no fields"
            return f"no field `{key}`; the row has {have} (name the field with `{option}`)"
    if not isinstance(row[q], str):
        return f"field `{q}` must be a string, got {data_check._type(row[q])}"
    try:
        question_text(row, spec)
    except KeyError as e:
        return f"the template names `{{{e.args[0]}}}`, which the row lacks"
    except (IndexError, AttributeError, ValueError) as e:
        return f"the template cannot be written with this row: {e}"
    answer = row[a]
    if spec.mode == "generate":
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            return f"field `{a}` must be a string or a number, got {data_check._type(answer)}"
        return None
    choices = row[c]
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(x, str) and x.strip() for x in choices)):
        return f"field `{c}` must be a list of at least two non-empty strings"
    if isinstance(answer, str):
        return None if answer in choices else f"field `{a}` ({answer!r}) is none of the `{c}`"
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"field `{a}` must be the index of a choice (0 to {len(choices) - 1}) or its text, got {answer!r}"
    return None


def load(spec: FewshotSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the rows to score, the pool of shots), checked: the same on every rank. Cheap enough to
    call on the job's driver first, so that a bad file is reported before training starts."""
    rows = read_rows(spec.path, spec)
    pool = rows if spec.pool is None else read_rows(spec.pool, spec, "pool")
    drawable = len(pool) - (spec.pool is None)  # a row is never a shot in its own prompt
    if spec.k > drawable:
        source = f"{SPEC_KEY}.pool" if spec.pool is not None else f"{SPEC_KEY}.path (less the row scored)"
        raise JobUserError(f"{SPEC_KEY}.k is {spec.k}, but {source} has {drawable} rows to draw shots from",
                           hint=f"lower {SPEC_KEY}.k or give a larger {SPEC_KEY}.pool")
    return rows[: spec.max_rows], pool


# ---------------------------------------------------------------- prompts

def question_text(row: dict[str, Any], spec: FewshotSpec) -> str:
    """The row written with the template: `{question}` is its question field, any other
    `{name}` its field of that name."""
    return spec.template.format(**{**row, "question": row[spec.question_field]})


def answer_text(row: dict[str, Any], spec: FewshotSpec) -> str:
    """The right answer as written after a shot: the answer, or the right choice's text."""
    answer = row[spec.answer_field]
    if spec.mode == "choice" and not isinstance(answer, str):
        return row[spec.choices_field][answer]
    return str(answer)


def choice_index(row: dict[str, Any], spec: FewshotSpec) -> int:
    """Mode `choice`: the index of the right choice (the answer is an index or the choice's text)."""
    answer = row[spec.answer_field]
    return row[spec.choices_field].index(answer) if isinstance(answer, str) else answer


def append_answer(prompt: str, answer: str) -> str:
    """The prompt followed by the answer, a space between them unless the prompt ends in
    whitespace already. Shots are written so, and so is a choice being scored: the model is
    asked for what it was shown."""
    return prompt + answer if prompt[-1:].isspace() else f"{prompt} {answer}"


def pick_shots(pool: list[dict[str, Any]], k: int, seed: int, index: int,
               exclude: int | None = None) -> list[dict[str, Any]]:
    """The k shots for scored row `index`: drawn without replacement from `pool`, never
    `pool[exclude]` (the scored row itself, when the pool is the scored file).

    The generator is seeded by (seed, index) alone, so a row's shots depend neither on the
    other rows scored nor on which rank scores it: accuracy does not change with the number
    of workers. (A string seed: `seed + index` would give row i + 1 under seed s the shots of
    row i under seed s + 1.)"""
    candidates = [i for i in range(len(pool)) if i != exclude]
    return [pool[i] for i in random.Random(f"{seed}:{index}").sample(candidates, k)]


def build_prompt(row: dict[str, Any], shots: list[dict[str, Any]], spec: FewshotSpec) -> str:
    """The shots, each with its answer, then the row's question, joined by the separator."""
    solved = [append_answer(question_text(shot, spec), answer_text(shot, spec)) for shot in shots]
    return spec.separator.join([*solved, question_text(row, spec)])


# ---------------------------------------------------------------- scoring

def first_line(text: str) -> str:
    """What a generation answers: its first non-blank line, stripped. The model goes on after
    its answer (with the next shot, as the prompt taught it); that is not part of it."""
    return text.strip().split("\n", 1)[0].strip()


def score_generate(model, tokenizer, prompts: list[str], answers: list[str], max_new_tokens: int,
                   batch_size: int, *, device=None, synced: bool = False) -> list[bool]:
    """Whether greedy generation after each prompt answers it: `first_line` of the new tokens
    equals the answer, stripped.

    Batches are padded on the left, so every row's continuation starts at the last position
    (generate derives positions from the attention mask). `synced`: every rank generates
    until all ranks are done (generate's `synced_gpus`); ZeRO-3 needs it, as each forward
    gathers the parameters from all ranks."""
    import torch

    device = device or _device(model)
    pad = _pad_id(tokenizer)
    correct = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad([tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]], pad)
        with torch.no_grad():
            # The cache is off in some training configs (gradient checkpointing); it is
            # only speed here. do_sample=False overrides a sampling generation_config.
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad, synced_gpus=synced)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        correct += [first_line(t) == a.strip() for t, a in zip(texts, answers[start:start + batch_size])]
    return correct


def choice_tokens(tokenizer, prompt: str, choice: str) -> tuple[list[int], int]:
    """(ids of the prompt followed by the choice, position of the first token of the choice).

    The boundary is where the ids of the prompt alone stop being a prefix of the whole, as
    trainers.data finds its turn boundaries: when the prompt's last token merges with the
    choice's first (a template ending in a space: `A: ` + `yes` is `A`, `:`, ` yes`), the
    merged token is scored as part of the choice."""
    ids = tokenizer(append_answer(prompt, choice))["input_ids"]
    begin = _common_prefix(tokenizer(prompt)["input_ids"], ids)
    return ids, max(begin, 1)  # the first token has no prediction (no BOS and a merge there)


def choice_loglikelihoods(model, tokenizer, prompts: list[str], choices: list[list[str]], *, normalize: bool,
                           batch_size: int, device=None) -> list[list[float]]:
    """For each prompt, the log-likelihood of each of its choices after it: the sum of the
    log-probabilities of the choice's tokens, or their mean (`normalize`). One forward pass
    per `batch_size` prompts, all their choices in it."""
    import torch

    device = device or _device(model)
    pad = _pad_id(tokenizer)
    scores: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        seqs, spans = [], []  # spans: (prompt in this batch, tokens of the choice)
        for j, (prompt, options) in enumerate(zip(prompts[start:start + batch_size],
                                                  choices[start:start + batch_size])):
            for choice in options:
                ids, begin = choice_tokens(tokenizer, prompt, choice)
                seqs.append(ids)
                spans.append((j, len(ids) - begin))
        # Left padding puts every choice at the end of its row, so the logits of the last
        # positions are enough: the vocabulary's logits over whole prompts may not fit.
        ids, mask = _left_pad(seqs, pad)
        keep = max(n for _, n in spans) + 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=_positions(mask).to(device), logits_to_keep=keep).logits
        batch: list[list[float]] = [[] for _ in prompts[start:start + batch_size]]
        for row, (j, n) in enumerate(spans):
            # Token t is predicted at position t - 1: the n tokens of the choice (the last n of
            # the row) from the n positions before the last.
            logprobs = torch.log_softmax(logits[row, keep - 1 - n:keep - 1].float(), dim=-1)
            total = logprobs.gather(-1, ids[row, -n:, None].to(logprobs.device)).sum().item()
            batch[j].append(total / n if normalize else total)
        scores += batch
    return scores


def score_choice(model, tokenizer, prompts: list[str], choices: list[list[str]], answers: list[int],
                 normalize: bool, batch_size: int, *, device=None) -> list[bool]:
    """Whether the choice with the highest log-likelihood after each prompt is its answer (an
    index into its choices; a tie goes to the first). See `choice_loglikelihoods`."""
    scores = choice_loglikelihoods(model, tokenizer, prompts, choices, normalize=normalize,
                                   batch_size=batch_size, device=device)
    return [max(range(len(s)), key=s.__getitem__) == a for s, a in zip(scores, answers)]


def _left_pad(seqs: list[list[int]], pad_id: int):
    """(ids, attention mask) as [len(seqs), longest] tensors, padded on the left. By hand: the
    tokenizer's padding side stays as the training code set it."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _positions(mask):
    # Positions counted from each row's first real token, as generate counts them: a
    # left-padded row scores as it would alone.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # masked out anyway


def _device(model):
    return next(model.parameters()).device


# ---------------------------------------------------------------- the evaluation

def evaluate(model, tokenizer, spec: FewshotSpec, *, rank: int, world_size: int, device=None) -> dict[str, Any]:
    """`{fewshot_accuracy, fewshot_correct, fewshot_total}` over the scored rows of `spec.path`.

    Rank r scores rows r, r + world_size, ...; when torch.distributed is initialized the
    counts are summed over the ranks (call it on every rank then: all get the same result),
    else they are this process's. Under ZeRO-3 each forward pass gathers the parameters from all ranks, so every
    rank must run as many: the shares are padded to equal length with repeats of the first
    row, scored and not counted (equal rows make equal batches; generation is synced over the
    ranks). `model` is a plain Hugging Face (or PEFT) model or a DeepSpeed engine's `.module`
    (pass the engine's `device` then); it is put in eval mode and back as it was."""
    import torch
    import torch.distributed as dist

    rows, pool = load(spec)
    distributed = dist.is_available() and dist.is_initialized()
    mine = list(range(rank, len(rows), world_size))
    counted = len(mine)
    mine += [0] * (math.ceil(len(rows) / world_size) - counted)
    prompts = [build_prompt(rows[i], pick_shots(pool, spec.k, spec.seed, i, i if spec.pool is None else None), spec)
               for i in mine]
    device = device or _device(model)

    was_training = model.training
    model.eval()
    try:
        if spec.mode == "generate":
            correct = score_generate(model, tokenizer, prompts, [answer_text(rows[i], spec) for i in mine],
                                     spec.max_new_tokens, spec.batch_size, device=device,
                                     synced=distributed and world_size > 1)
        else:
            correct = score_choice(model, tokenizer, prompts, [rows[i][spec.choices_field] for i in mine],
                                   [choice_index(rows[i], spec) for i in mine], spec.normalize, spec.batch_size,
                                   device=device)
    finally:
        model.train(was_training)

    counts = torch.tensor([sum(correct[:counted]), counted], dtype=torch.long, device=device)
    if distributed:
        dist.all_reduce(counts)
    right, total = (int(x) for x in counts.tolist())
    return {"fewshot_accuracy": right / total, "fewshot_correct": right, "fewshot_total": total}


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The metrics to report at the end: the accuracy before training, after, and the gain."""
    b, a = before["fewshot_accuracy"], after["fewshot_accuracy"]
    return {"fewshot_accuracy_before": round(b, 6), "fewshot_accuracy_after": round(a, 6),
            "fewshot_accuracy_gain": round(a - b, 6), "fewshot_total": after["fewshot_total"]}
