"""trainers.data, the pure parts: tokenize_example (text / alpaca / messages), pack,
steps_per_epoch. Expected ids are built by hand from the tokenizer's pieces (BOS/EOS ids,
encodings of hand-written strings), never by calling the code under test twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainers import data
from trainers.data import IGNORE, pack, steps_per_epoch, tokenize_example
from trainers.spec import DatasetSpec

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "configs" / "examples" / "tiny-llama"

# The shipped tokenizer's special tokens (tests/fixtures/tiny_models.py).
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = 3, 4, 5, 6


@pytest.fixture(scope="module")
def tok():
    t = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    # The ids this file relies on; if the fixture tokenizer changes, say so here first.
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert t.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]) == [
        SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID]
    return t


def enc(tok, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and BOS_ID not in ids and EOS_ID not in ids, "encode() must not add specials here"
    return ids


def trained(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, lab in zip(ids, labels) if lab != IGNORE]


def spans(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained labels."""
    out: list[list[int]] = []
    current: list[int] = []
    for lab in labels:
        if lab == IGNORE:
            if current:
                out.append(current)
            current = []
        else:
            current.append(lab)
    if current:
        out.append(current)
    return out


# ---------------------------------------------------------------- text

def test_text_is_bos_tokens_eos_and_every_token_is_trained(tok):
    ds = DatasetSpec(path="x.jsonl", format="text")
    text = 'Task: Reverse the word. The input is "water" and the answer is "retaw".'
    ids, labels = tokenize_example({"text": text, "other": "ignored"}, ds, tok)
    expected = [BOS_ID] + enc(tok, text) + [EOS_ID]
    assert ids == expected
    assert labels == expected
    assert tok.decode(ids[1:-1]) == text


def test_text_reads_the_configured_field(tok):
    ds = DatasetSpec(path="x.jsonl", format="text", text_field="body")
    ids, labels = tokenize_example({"text": "wrong column", "body": "green apple"}, ds, tok)
    assert ids == [BOS_ID] + enc(tok, "green apple") + [EOS_ID]
    assert labels == ids


# ---------------------------------------------------------------- alpaca

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nReverse the word.\n\n"
    "### Input:\nwater\n\n"
    "### Response:\n"
)
PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a fruit.\n\n"
    "### Response:\n"
)


def test_alpaca_with_input_masks_the_prompt_and_trains_response_plus_eos(tok):
    ds = DatasetSpec(path="x.jsonl", format="alpaca")
    ids, labels = tokenize_example({"instruction": "Reverse the word.", "input": "water", "output": "retaw"}, ds, tok)
    prompt = [BOS_ID] + enc(tok, PROMPT_WITH_INPUT)
    response = enc(tok, "retaw") + [EOS_ID]
    assert ids == prompt + response
    assert labels == [IGNORE] * len(prompt) + response
    assert tok.decode(trained(ids, labels)) == "retaw<|end_of_text|>"


@pytest.mark.parametrize("row_input", [{}, {"input": ""}, {"input": None}], ids=["no-key", "empty", "null"])
def test_alpaca_without_input_uses_the_short_prompt(tok, row_input):
    ds = DatasetSpec(path="x.jsonl", format="alpaca")
    ids, labels = tokenize_example({"instruction": "Name a fruit.", "output": "apple", **row_input}, ds, tok)
    prompt = [BOS_ID] + enc(tok, PROMPT_WITHOUT_INPUT)
    response = enc(tok, "apple") + [EOS_ID]
    assert ids == prompt + response
    assert labels == [IGNORE] * len(prompt) + response
    assert "Input" not in tok.decode(ids)


def test_alpaca_output_is_stringified(tok):
    ds = DatasetSpec(path="x.jsonl", format="alpaca")
    ids, labels = tokenize_example({"instruction": "Add the two numbers.", "input": "2 + 3", "output": 5}, ds, tok)
    assert trained(ids, labels) == enc(tok, "5") + [EOS_ID]


# ---------------------------------------------------------------- messages (chat template)

ONE_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Add the two numbers.\n\n24 + 48"},
    {"role": "assistant", "content": "72"},
]
# What the shipped template renders for ONE_TURN, written out by hand.
ONE_TURN_TEXT = (
    "<|system|>\nYou are a helpful assistant.<|end|>\n"
    "<|user|>\nAdd the two numbers.\n\n24 + 48<|end|>\n"
    "<|assistant|>\n72<|end|>\n"
)
TWO_TURNS = [
    {"role": "user", "content": "Reverse the word.\n\nwater"},
    {"role": "assistant", "content": "retaw"},
    {"role": "user", "content": "Reverse the word.\n\nhouse"},
    {"role": "assistant", "content": "esuoh", "name": "extra keys are dropped"},
]


def chat(tok, messages, field="messages"):
    ds = DatasetSpec(path="x.jsonl", format="messages", messages_field=field)
    return tokenize_example({field: messages}, ds, tok)


def test_messages_ids_are_the_rendered_conversation(tok):
    ids, labels = chat(tok, ONE_TURN)
    assert ids == enc(tok, ONE_TURN_TEXT)
    assert len(labels) == len(ids)


def test_messages_masks_system_user_and_assistant_header(tok):
    ids, labels = chat(tok, ONE_TURN)
    header = enc(tok, "<|assistant|>\n")
    prefix = enc(tok, ONE_TURN_TEXT.split("<|assistant|>\n")[0]) + header  # system + user turns + header
    assert ids[: len(prefix)] == prefix
    assert labels[: len(prefix)] == [IGNORE] * len(prefix)
    for special in (SYSTEM_ID, USER_ID, ASSISTANT_ID):
        assert all(lab == IGNORE for i, lab in zip(ids, labels) if i == special)


def test_messages_trains_assistant_content_and_end_marker(tok):
    ids, labels = chat(tok, ONE_TURN)
    start = ids.index(ASSISTANT_ID) + len(enc(tok, "<|assistant|>\n"))
    target = enc(tok, "72") + [END_ID]
    assert ids[start:start + len(target)] == target
    assert labels[start:start + len(target)] == target


def test_messages_two_turns_trains_both_assistant_turns_only(tok):
    ids, labels = chat(tok, TWO_TURNS, field="conversation")
    assert ids == enc(tok, "<|user|>\nReverse the word.\n\nwater<|end|>\n<|assistant|>\nretaw<|end|>\n"
                           "<|user|>\nReverse the word.\n\nhouse<|end|>\n<|assistant|>\nesuoh<|end|>\n")
    header = len(enc(tok, "<|assistant|>\n"))
    starts = [i + header for i, t in enumerate(ids) if t == ASSISTANT_ID]
    assert len(starts) == 2
    for start, content in zip(starts, ["retaw", "esuoh"]):
        target = enc(tok, content) + [END_ID]
        assert labels[start:start + len(target)] == target
    # Both user turns (role token .. their <|end|>\n) are masked.
    for u in [i for i, t in enumerate(ids) if t == USER_ID]:
        end = ids.index(END_ID, u) + 2  # through "<|end|>\n"
        assert labels[u:end] == [IGNORE] * (end - u)
    assert len(spans(labels)) == 2


def test_messages_trained_tokens_decode_to_exactly_contents_plus_end_markers(tok):
    _, labels = chat(tok, TWO_TURNS)
    assert [tok.decode(s) for s in spans(labels)] == ["retaw<|end|>", "esuoh<|end|>"]
    _, labels = chat(tok, ONE_TURN)
    assert [tok.decode(s) for s in spans(labels)] == ["72<|end|>"]


# ---------------------------------------------------------------- pack

def test_pack_concatenates_in_order_and_cuts_full_rows():
    examples = [
        ([10, 11, 12], [IGNORE, 11, 12]),
        ([20, 21], [20, 21]),
        ([30, 31, 32, 33], [30, 31, 32, 33]),
        ([40, 41], [40, 41]),
    ]
    out = pack(examples, max_len=4, pad_id=PAD_ID, packing=True)
    assert set(out) == {"input_ids", "labels", "attention_mask", "position_ids", "seq_ids"}
    assert all(out[k].dtype == np.int64 for k in ("input_ids", "labels", "attention_mask", "position_ids"))
    assert out["seq_ids"].dtype == np.int32
    assert out["input_ids"].tolist() == [[10, 11, 12, 20], [21, 30, 31, 32], [33, 40, 41, PAD_ID]]
    # The first token of every segment (an example, or the rest of one a row cut) has no
    # label: it would be predicted from the example before it, or from nothing.
    assert out["labels"].tolist() == [[IGNORE, 11, 12, IGNORE], [IGNORE, IGNORE, 31, 32], [IGNORE, IGNORE, 41, IGNORE]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 1, 2]]  # padding continues
    assert out["seq_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    # The numbers prepare() reports: 11 real tokens in 3 rows of 4, 5 of them with loss.
    counts = data._count_tokens(out)
    assert counts["tokens"].tolist() == [4, 4, 3]
    assert counts["loss_tokens"].tolist() == [2, 2, 1]
    assert counts["tokens"].sum() / (len(out["input_ids"]) * 4) == pytest.approx(11 / 12)


def test_pack_drops_a_row_whose_only_label_starts_a_segment():
    # [33] is the rest of an example a row boundary cut: its label would be predicted from
    # the row before, which it cannot see, so the row has nothing to train on.
    examples = [([10, 11, 12], [IGNORE, 11, 12]), ([20, 21], [20, 21]), ([30, 31, 32, 33], [30, 31, 32, 33])]
    out = pack(examples, max_len=4, pad_id=PAD_ID, packing=True)
    assert out["input_ids"].tolist() == [[10, 11, 12, 20], [21, 30, 31, 32]]


def test_pack_exact_multiple_has_no_padding_row():
    examples = [([1, 2, 3], [1, 2, 3]), ([4, 5, 6], [4, 5, 6])]
    out = pack(examples, max_len=3, pad_id=99, packing=True)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert out["attention_mask"].all()


def test_pack_drops_rows_without_any_loss_token():
    examples = [
        ([7, 7, 7, 7], [IGNORE] * 4),  # a prompt filling a whole row: nothing to learn from it
        ([8, 9], [IGNORE, 9]),
        ([5], [IGNORE]),  # the tail row: masked only
    ]
    out = pack(examples, max_len=4, pad_id=0, packing=True)
    # Rows before dropping: [7,7,7,7] (all masked), [8,9,5] (one loss token) -> one row kept.
    assert out["input_ids"].tolist() == [[8, 9, 5, 0]]
    assert out["labels"].tolist() == [[IGNORE, 9, IGNORE, IGNORE]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0]]


def test_pack_without_packing_truncates_and_pads_each_example():
    examples = [
        ([1, 2, 3, 4, 5, 6], [IGNORE, 2, 3, 4, 5, 6]),  # truncated to 4
        ([7, 8], [7, 8]),  # padded
        ([9, 9, 9, 9, 10], [IGNORE] * 4 + [10]),  # its only loss token is cut off: dropped
        ([11, 12, 13, 14], [11, 12, 13, 14]),  # exactly max_len
    ]
    out = pack(examples, max_len=4, pad_id=PAD_ID, packing=False)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, PAD_ID, PAD_ID], [11, 12, 13, 14]]
    assert out["labels"].tolist() == [[IGNORE, 2, 3, 4], [7, 8, IGNORE, IGNORE], [11, 12, 13, 14]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert data._count_tokens(out)["tokens"].sum() / (3 * 4) == pytest.approx(10 / 12)


def test_pack_of_nothing_is_empty_arrays_of_the_right_width():
    out = pack([], max_len=8, pad_id=0, packing=True)
    assert all(v.shape == (0, 8) for v in out.values())


def test_pack_with_real_examples_round_trips(tok):
    """Packing text examples (every token trained) loses nothing: the unpadded rows concatenate back."""
    ds = DatasetSpec(path="x.jsonl", format="text")
    rows = [{"text": f"Task: Reverse the word. The input is {w} and the answer is {w[::-1]}."}
            for w in ("water", "house", "stone")]
    examples = [tokenize_example(r, ds, tok) for r in rows]
    out = pack(examples, max_len=16, pad_id=PAD_ID, packing=True)
    flat = [t for ids, _ in examples for t in ids]
    assert out["input_ids"][out["attention_mask"] == 1].tolist() == flat
    assert out["input_ids"].shape == (-(-len(flat) // 16), 16)


# ---------------------------------------------------------------- steps_per_epoch

@pytest.mark.parametrize(
    "rows, workers, micro, accum, expected",
    [
        (100, 2, 4, 2, 6),  # 50 rows per worker, 8 per step -> 6 (2 rows left over)
        (16, 2, 4, 2, 1),  # exactly one step
        (15, 2, 4, 2, 0),  # 7 per worker < 8: not even one step
        (101, 2, 1, 1, 50),  # the odd row is not split across workers
        (7, 1, 1, 1, 7),
        (1000, 8, 2, 4, 15),  # 125 per worker // 8
    ],
)
def test_steps_per_epoch(rows, workers, micro, accum, expected):
    assert steps_per_epoch(rows, workers, micro, accum) == expected
