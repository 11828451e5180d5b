"""Preference and ranking data (formats `preference`, `ranking`): formatting, tokenization,
truncation and batching, as pure functions (numpy; a tokenizer passed in).

A row becomes one *record*, what one row of the prepared Ray Dataset stores and what a
worker's micro-batch is made of:

    {"prompt":    [int, ...],          # the prompt's token ids, stored once
     "responses": [[int, ...], ...],   # each response as the ids that continue the prompt, best first
     "trained":   [[bool, ...], ...],  # per continuation token: a label (True) or markup (False)
     "scores":    [float, ...],        # per response, higher is better; equal scores are a tie
     "margin":    float | None,        # reward modeling: what each better response should win by
     "ref_logps": [float, ...]}        # DPO with dpo.precompute_reference: the reference's, per response

`prompt + responses[k]` is the k-th whole sequence. A `preference` row is a record of two
responses, chosen (score 1) then rejected (score 0); a `ranking` row one of K. The pairs that
train are every (better, worse) of a record's responses by score (`pairs`): ties make none.
`collate` lays a micro-batch of records out as the sum of their K sequences, padded to the
longest of that batch.

Prompts: given in `prompt_field`, or implicit, the beginning the responses share
(`split_responses`), as TRL's `maybe_extract_prompt` decides: when the row has no prompt, or
its prompt is a string while the responses are turn lists (UltraFeedback-binarized's
`prompt` column beside whole conversations).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from trainers.data import IGNORE, _bos, _common_prefix, _encode_rendered, _eos, _render, _tokenize_chat
from trainers.spec import DatasetSpec

HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH's text form: the prompt ends at the last one
PREFERENCE_SCORES = (1.0, 0.0)  # chosen, rejected


# ---------------------------------------------------------------- formatting (no tokenizer)

def split_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen's rest, rejected's rest) of an implicit-prompt pair; see `split_responses`."""
    prompt, (c, r) = split_responses([chosen, rejected], "fields `chosen` and `rejected`")
    return prompt, c, r


def split_responses(responses: Sequence[str | list], what: str = "the responses") -> tuple[str | list, list]:
    """(prompt, each response's rest) of responses that are whole conversations sharing a
    beginning. Raises ValueError (naming `what`) when they cannot be split.

    Turn lists: the longest run of identical leading turns (role and content) followed by an
    assistant turn in every response; the rests then start with that assistant turn. TRL's
    `extract_prompt` takes the common turns as they are, whatever comes next.

    Strings: the longest common prefix, cut back to the end of its last `\\n\\nAssistant:`
    (Anthropic HH), so a shared beginning of the responses ("\\n\\nAssistant: The sky is" before
    " blue" / " green") stays in them; without that marker, TRL's rule: the common prefix,
    less a final space (which goes with the responses)."""
    if all(isinstance(r, str) for r in responses):
        common = os.path.commonprefix(list(responses))
        at = common.rfind(HH_ASSISTANT)
        if at < 0 and all(HH_ASSISTANT in r for r in responses):
            raise ValueError(f"{what} differ before their first `\\n\\nAssistant:`: they share no prompt")
        cut = at + len(HH_ASSISTANT) if at >= 0 else len(common) - common.endswith(" ")
        return responses[0][:cut], [r[cut:] for r in responses]
    if all(isinstance(r, list) for r in responses):
        turns = [[_turn(m) for m in r] for r in responses]
        shared = 0
        while all(shared < len(t) for t in turns) and all(t[shared] == turns[0][shared] for t in turns):
            shared += 1
        cut = next((i for i in range(shared, -1, -1)
                    if all(i < len(t) and t[i]["role"] == "assistant" for t in turns)), None)
        if cut is None:
            raise ValueError(f"{what} share no prompt that an assistant turn of each follows (they differ at "
                             f"turn {shared}): give the prompt in its own field")
        return turns[0][:cut], [t[cut:] for t in turns]
    raise ValueError(f"{what} must all be strings or all be lists of chat turns")


def prompt_and_responses(row: dict[str, Any], ds: DatasetSpec) -> tuple[str | list, list, list[float]]:
    """(prompt, responses, scores) of a valid row (`data_check.row_problem` found nothing),
    the responses in the row's order; turns keep only `role` and `content`."""
    if ds.format == "preference":
        responses, scores = [row[ds.chosen_field], row[ds.rejected_field]], list(PREFERENCE_SCORES)
    else:
        responses, scores = list(row[ds.responses_field]), ranking_scores(row, ds)
    prompt = row.get(ds.prompt_field)
    if prompt is None or isinstance(prompt, str) != isinstance(responses[0], str):
        return (*split_responses(responses), scores)
    if isinstance(prompt, list):
        return [_turn(m) for m in prompt], [[_turn(m) for m in r] for r in responses], scores
    return prompt, responses, scores


def ranking_scores(row: dict[str, Any], ds: DatasetSpec) -> list[float]:
    """A ranking row's score per response: its `scores` when it has them (ties allowed),
    else from `ranking` (response indices, best first): K - 1 for the best, ..., 0."""
    if row.get(ds.scores_field) is not None:
        return [float(s) for s in row[ds.scores_field]]
    ranking = list(row[ds.ranking_field])
    scores = [0.0] * len(ranking)
    for position, i in enumerate(ranking):
        scores[i] = float(len(ranking) - 1 - position)
    return scores


def row_margin(row: dict[str, Any], ds: DatasetSpec) -> float | None:
    return None if ds.margin_field is None or row.get(ds.margin_field) is None else float(row[ds.margin_field])


def _turn(m: dict[str, Any]) -> dict[str, str]:
    return {"role": m["role"], "content": m["content"]}


# ---------------------------------------------------------------- tokenization

def tokenize_preference(row: dict[str, Any], ds: DatasetSpec, tok) -> dict[str, Any]:
    """The record of a `preference` row: chosen, then rejected."""
    return tokenize_record(row, ds, tok)


def tokenize_ranking(row: dict[str, Any], ds: DatasetSpec, tok) -> dict[str, Any]:
    """The record of a `ranking` row: its K responses best first (ties in the row's order)."""
    return tokenize_record(row, ds, tok)


def tokenize_record(row: dict[str, Any], ds: DatasetSpec, tok) -> dict[str, Any]:
    """A valid row's record (see the module docstring), untruncated.

    Strings: BOS and the prompt's tokens, encoded once; each response encoded on its own,
    then EOS (unless its text already ends with the EOS token, as TRL adds it), all of it
    trained. Each part is tokenized as it is at inference: the prompt alone, the response
    as the model writes it after the prompt.

    Turn lists: prompt + response rendered with the chat template, per response; the prompt
    is the tokens every rendering shares with the prompt rendered alone with the generation
    prompt (TRL's DPO split, `common_prefix_length`), and a response trains what `sft`
    trains of its assistant turns (`trainers.data._tokenize_chat`: the `{% generation %}`
    tags, or without tags what the template writes for a turn after its header)."""
    prompt, responses, scores = prompt_and_responses(row, ds)
    order = sorted(range(len(responses)), key=lambda i: -scores[i])  # stable: ties keep the row's order
    responses, scores = [responses[i] for i in order], [scores[i] for i in order]
    if isinstance(prompt, str):
        prompt_ids = _bos(tok) + tok.encode(prompt, add_special_tokens=False)
        continuations = [tok.encode(r, add_special_tokens=False) + _eos_unless_there(tok, r) for r in responses]
        trained = [[True] * len(c) for c in continuations]
    else:
        prompt_ids, continuations, trained = _chat_continuations(prompt, responses, tok)
    return {"prompt": prompt_ids, "responses": continuations, "trained": trained, "scores": scores,
            "margin": row_margin(row, ds)}


def _eos_unless_there(tok, text: str) -> list[int]:
    return [] if tok.eos_token and text.endswith(tok.eos_token) else _eos(tok)


def _chat_continuations(prompt: list[dict], responses: list[list[dict]], tok):
    alone = _encode_rendered(tok, _render(tok, prompt, generation_prompt=True))
    sequences = [_tokenize_chat(prompt + r, tok, "assistant", first_trained=len(prompt)) for r in responses]
    # The shared prompt ends where any rendering departs from the prompt alone, and before
    # any label (a token that merges across the header may be tagged as generated).
    n = min(min(_common_prefix(alone, ids), next((j for j, x in enumerate(labels) if x != IGNORE), len(labels)))
            for ids, labels in sequences)
    return (alone[:n], [ids[n:] for ids, _ in sequences],
            [[x != IGNORE for x in labels[n:]] for _, labels in sequences])


def checked(row: Any, ds: DatasetSpec, tok) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), or (None, what is wrong with the row): `trainers.data._formatted` for
    these formats."""
    from trainers import data_check

    problem = data_check.row_problem(row, ds)
    if problem:
        return None, problem
    try:
        return tokenize_record(row, ds, tok), None
    except Exception as e:  # a template error, an odd value: the row is the user's to fix
        return None, f"cannot be formatted: {type(e).__name__}: {e}"


# ---------------------------------------------------------------- truncation

def truncate(record: dict[str, Any], max_len: int, bos_id: int | None = None) -> tuple[dict[str, Any] | None, int]:
    """(the record with every prompt + response within `max_len`, or None when no pair is
    left; the pairs it lost).

    The rule, when the prompt and the longest response do not fit together: the prompt keeps
    its end (and its first token when that is `bos_id`), giving way to the longest response
    down to half of `max_len` and no further; then every response keeps its start, up to
    what is left. One prompt for all responses, cut once.

    Then a response goes when it keeps no label token, or when its ids repeat those of a
    better (or tied) response kept before it (cut to the same tokens, nothing sets them
    apart); the pairs it was in are lost. A record with no pair left is dropped."""
    prompt, continuations, trained = list(record["prompt"]), record["responses"], record["trained"]
    longest = max(len(c) for c in continuations)
    if len(prompt) + longest > max_len:
        keep = min(len(prompt), max(max_len - longest, max_len // 2))
        if keep < len(prompt):
            head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] else []
            prompt = head + prompt[len(prompt) - max(0, keep - len(head)):]
        room = max_len - len(prompt)
        continuations, trained = [c[:room] for c in continuations], [m[:room] for m in trained]
    kept: list[int] = []
    for k, (c, m) in enumerate(zip(continuations, trained)):
        if any(m) and all(list(c) != list(continuations[j]) for j in kept):
            kept.append(k)
    scores = [record["scores"][k] for k in kept]
    lost = len(pairs(record["scores"])) - len(pairs(scores))
    if not pairs(scores):
        return None, len(pairs(record["scores"]))
    return {"prompt": prompt, "responses": [list(continuations[k]) for k in kept],
            "trained": [list(trained[k]) for k in kept], "scores": scores, "margin": record.get("margin")}, lost


def pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """(better, worse) response indices: every two responses whose scores differ."""
    return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] > scores[j]]


def ranks(scores: Sequence[float]) -> list[int]:
    """Each response's rank, 0 for the best; tied scores share a rank (dense ranking)."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def record_sizes(record: dict[str, Any]) -> tuple[int, int, int]:
    """(sequences, tokens, label tokens) a record trains, as `collate` lays it out."""
    p = len(record["prompt"])
    return (len(record["responses"]), sum(p + len(c) for c in record["responses"]),
            sum(int(sum(m)) for m in record["trained"]))


# ---------------------------------------------------------------- batching (workers)

def collate(records: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, np.ndarray]:
    """One micro-batch of P records (prompts) as the sum of their K sequences, record by
    record and best first within one, right padded to the longest sequence of THIS batch
    (rounded up to `pad_to_multiple_of`):

    - `input_ids`, `labels` (IGNORE on prompts, markup and padding), `attention_mask`:
      int64 (N, L); each sequence is its record's one stored prompt + a continuation.
    - `group` int64 (N,): the record (0..P-1) each sequence belongs to.
    - `score` float32 (N,), `rank` int64 (N,): within its record, 0 best, ties share a rank.
    - `pairs` int64 (M, 2): (better, worse) sequence indices, every pair of every record.
    - `margin` float32 (M,), per pair: only when some record has a margin (0 for the rest:
      no margin is margin 0).
    - `is_chosen` bool (N,): only when every record is a pair (K = 2); `x[is_chosen]` and
      `x[~is_chosen]` are then the chosen and rejected sequences, aligned by record.
    - `ref_logps` float32 (N,): only when every record carries the reference's log-probs."""
    sequences, label_rows, group, score, rank, pair_rows, margins = [], [], [], [], [], [], []
    for g, r in enumerate(records):
        base, prompt = len(sequences), list(r["prompt"])
        for cont, mask in zip(r["responses"], r["trained"]):
            sequences.append(prompt + list(cont))
            label_rows.append([IGNORE] * len(prompt) + [t if m else IGNORE for t, m in zip(cont, mask)])
        group += [g] * len(r["responses"])
        score += list(r["scores"])
        rank += ranks(r["scores"])
        record_pairs = pairs(r["scores"])
        pair_rows += [(base + i, base + j) for i, j in record_pairs]
        margins += [r.get("margin") or 0.0] * len(record_pairs)
    n = len(sequences)
    longest = max((len(s) for s in sequences), default=0)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "input_ids": np.full((n, width), pad_id, dtype=np.int64),
        "labels": np.full((n, width), IGNORE, dtype=np.int64),
        "attention_mask": np.zeros((n, width), dtype=np.int64),
    }
    for row, (ids, labels) in enumerate(zip(sequences, label_rows)):
        out["input_ids"][row, : len(ids)] = ids
        out["labels"][row, : len(ids)] = labels
        out["attention_mask"][row, : len(ids)] = 1
    out["group"] = np.array(group, dtype=np.int64)
    out["score"] = np.array(score, dtype=np.float32)
    out["rank"] = np.array(rank, dtype=np.int64)
    out["pairs"] = np.array(pair_rows, dtype=np.int64).reshape(-1, 2)
    if any(r.get("margin") is not None for r in records):
        out["margin"] = np.array(margins, dtype=np.float32)
    if records and all(r.get("ref_logps") is not None for r in records):
        out["ref_logps"] = np.array([x for r in records for x in r["ref_logps"]], dtype=np.float32)
    if records and all(len(r["responses"]) == 2 for r in records):
        out["is_chosen"] = out["rank"] == 0
    return out


# ---------------------------------------------------------------- Ray Dataset rows

def arrow_schema():
    """The columns of a prepared row: one record, variable-length lists (int32 ids, bit-packed masks)."""
    import pyarrow as pa

    return pa.schema([
        ("prompt", pa.list_(pa.int32())),
        ("responses", pa.list_(pa.list_(pa.int32()))),
        ("trained", pa.list_(pa.list_(pa.bool_()))),
        ("scores", pa.list_(pa.float32())),
        ("margin", pa.float32()),  # null: none
    ])


def to_row(record: dict[str, Any]) -> dict[str, Any]:
    """A record as one row of plain Python values (the columns of `arrow_schema`)."""
    margin = record.get("margin")
    return {"prompt": [int(t) for t in record["prompt"]],
            "responses": [[int(t) for t in c] for c in record["responses"]],
            "trained": [[bool(m) for m in mask] for mask in record["trained"]],
            "scores": [float(s) for s in record["scores"]],
            "margin": None if margin is None or math.isnan(float(margin)) else float(margin)}


def to_table(records: Sequence[dict[str, Any]]):
    """A pyarrow Table of records, one a row (what a Ray Data `map_batches` task returns)."""
    import pyarrow as pa

    return pa.Table.from_pylist([to_row(r) for r in records], schema=arrow_schema())


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The record a row holds, from a pyarrow `to_pylist()` row or a numpy-format batch's
    (nested object arrays)."""
    margin = row.get("margin")
    record = {"prompt": np.asarray(row["prompt"], dtype=np.int64).tolist(),
              "responses": [np.asarray(c, dtype=np.int64).tolist() for c in row["responses"]],
              "trained": [np.asarray(m, dtype=bool).tolist() for m in row["trained"]],
              "scores": np.asarray(row["scores"], dtype=np.float64).tolist(),
              "margin": None if margin is None or math.isnan(float(margin)) else float(margin)}
    if row.get("ref_logps") is not None:  # a column only runs with dpo.precompute_reference have
        record["ref_logps"] = np.asarray(row["ref_logps"], dtype=np.float64).tolist()
    return record


def from_table(table) -> list[dict[str, Any]]:
    """The records of a pyarrow Table (a worker's fetched rows)."""
    return [from_row(r) for r in table.to_pylist()]
