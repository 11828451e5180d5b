"""Preference and ranking data (`trainers.preference_data`): implicit prompts, tokenization
with the shipped tiny tokenizer and chat templates with and without `{% generation %}` tags,
parity with TRL 1.16's DPO tokenization, truncation, batching, Arrow rows, and the row
checks (`trainers.data_check`).

Expected ids are written as text segments that only the tokenizer turns into ids (never the
code under test), except a few spelled out token by token."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from trainers import chat_templates, data_check
from trainers import preference_data as pd
from trainers.data import IGNORE
from trainers.spec import DatasetSpec

transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "examples" / "tiny-llama"
BOS, EOS, PAD = 0, 1, 2


def U(content: str) -> dict:
    return {"role": "user", "content": content}


def A(content: str) -> dict:
    return {"role": "assistant", "content": content}


@pytest.fixture(scope="module")
def tok():
    """The shipped tokenizer: its template HAS `{% generation %}` tags."""
    t = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    assert chat_templates.has_generation_tags(t.chat_template)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (BOS, EOS, PAD)
    return t


def with_template(tok, template: str):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def chatml(tok):
    return with_template(tok, chat_templates.CHATML)


@pytest.fixture(scope="module")
def llama3(tok):
    return with_template(tok, chat_templates.LLAMA3)


def ds(fmt: str = "preference", **kw) -> DatasetSpec:
    return DatasetSpec(path="x.jsonl", format=fmt, **kw)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def continuation(tok, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Ids of the segments' text and which train; segment ends must be token boundaries."""
    text = "".join(s for s, _ in segments)
    out, trained, done = ids(tok, text), [], ""
    for segment, train in segments:
        done += segment
        n = len(ids(tok, done))
        assert out[:n] == ids(tok, done), f"not a token boundary: {done!r}"
        trained += [train] * (n - len(trained))
    return out, trained


HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}


# ---------------------------------------------------------------- implicit prompts

def test_hh_text_prompt_ends_at_the_last_assistant_marker():
    assert pd.split_prompt(HH["chosen"], HH["rejected"]) == ("\n\nHuman: hi\n\nAssistant:", " hello", " bye")
    multi = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    assert pd.split_prompt(multi + " The sky is blue", multi + " The sky is green") == (
        multi, " The sky is blue", " The sky is green")  # the responses' shared start stays theirs
    with pytest.raises(ValueError, match="differ before their first `\\\\n\\\\nAssistant:`"):
        pd.split_prompt("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: yo\n\nAssistant: a")


def test_string_prompt_without_marker_is_trls_rule():
    pytest.importorskip("trl")
    from trl.data_utils import extract_prompt

    for chosen, rejected in [("The sky is blue", "The sky is green"), (HH["chosen"], HH["rejected"]),
                             ("Q: 2+2? A: 4", "Q: 2+2? A: 5")]:
        theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert pd.split_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    # Deliberately different: with HH markers, a shared start of the responses is not prompt.
    multi = "\n\nHuman: hi\n\nAssistant: The sky is "
    assert extract_prompt({"chosen": multi + "blue", "rejected": multi + "red"})["prompt"] == multi.rstrip()
    assert pd.split_prompt(multi + "blue", multi + "red")[0] == "\n\nHuman: hi\n\nAssistant:"


def test_message_lists_share_the_turns_before_an_assistant_turn():
    chosen, rejected = [U("hi"), A("hello")], [U("hi"), A("bye")]
    assert pd.split_prompt(chosen, rejected) == ([U("hi")], [A("hello")], [A("bye")])
    # A shared assistant turn belongs to the prompt when the next turn is assistant in both ...
    assert pd.split_prompt([U("a"), A("b"), U("c"), A("d")], [U("a"), A("b"), U("c"), A("e")]) == (
        [U("a"), A("b"), U("c")], [A("d")], [A("e")])
    # ... and otherwise the prompt backs up to the last turn both answer as the assistant.
    assert pd.split_prompt([U("a"), A("b"), U("c"), A("d")], [U("a"), A("b"), U("x"), A("e")]) == (
        [U("a")], [A("b"), U("c"), A("d")], [A("b"), U("x"), A("e")])
    # Only role and content count (and are kept).
    assert pd.split_prompt([{**U("a"), "name": "z"}, A("b")], [U("a"), A("c")]) == ([U("a")], [A("b")], [A("c")])
    with pytest.raises(ValueError, match="share no prompt that an assistant turn of each follows"):
        pd.split_prompt([U("a"), A("b")], [U("x"), A("b")])


def test_message_split_matches_trl_when_the_next_turn_is_the_assistants():
    pytest.importorskip("trl")
    from trl.data_utils import extract_prompt, maybe_extract_prompt

    row = {"chosen": [U("a"), A("b"), U("c"), A("d")], "rejected": [U("a"), A("b"), U("c"), A("e")]}
    theirs = extract_prompt(row)
    assert pd.split_prompt(row["chosen"], row["rejected"]) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    # UltraFeedback-binarized: a string prompt beside whole conversations is ignored (TRL's rule).
    uf = {"prompt": "a", **row}
    assert pd.prompt_and_responses(uf, ds()) == (theirs["prompt"], [[A("d")], [A("e")]], [1.0, 0.0])
    assert maybe_extract_prompt(uf)["prompt"] == theirs["prompt"]


# ---------------------------------------------------------------- tokenization

def test_strings_prompt_once_then_each_response_and_eos(tok):
    record = pd.tokenize_preference(HH, ds(), tok)
    # ĊĊ H u m a n : Ġ h i ĊĊ A ssistant :   /  Ġhe l l o EOS  /  Ġb y e EOS
    assert record == {
        "prompt": [BOS, 205, 205, 46, 91, 83, 71, 84, 32, 227, 78, 79, 205, 205, 39, 411, 32],
        "responses": [[426, 82, 82, 85, EOS], [420, 95, 75, EOS]],
        "trained": [[True] * 5, [True] * 4],
        "scores": [1.0, 0.0],
        "margin": None,
    }
    explicit = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " bye"}
    assert pd.tokenize_preference(explicit, ds(), tok) == record


def test_strings_encode_prompt_and_response_on_their_own(tok):
    row = {"q": "Answer: ", "good": "blue", "bad": "red<|end_of_text|>", "m": 0.5}
    record = pd.tokenize_preference(row, ds(prompt_field="q", chosen_field="good", rejected_field="bad",
                                            margin_field="m"), tok)
    assert record["prompt"] == [BOS] + ids(tok, "Answer: ")  # ends in "Ġ", as at inference
    assert record["responses"] == [ids(tok, "blue") + [EOS], ids(tok, "red") + [EOS]]  # no second EOS
    assert record["margin"] == 0.5


def test_messages_with_generation_tags_train_the_tagged_tokens(tok):
    row = {"prompt": [U("hi")], "chosen": [A("hello")], "rejected": [A("a"), U("more"), A("b")]}
    record = pd.tokenize_preference(row, ds(), tok)
    assert record["prompt"] == ids(tok, "<|user|>\nhi<|end|>\n<|assistant|>\n")
    chosen = continuation(tok, [("hello<|end|>", True), ("\n", False)])
    rejected = continuation(tok, [("a<|end|>", True), ("\n<|user|>\nmore<|end|>\n<|assistant|>\n", False),
                                  ("b<|end|>", True), ("\n", False)])
    assert list(zip(record["responses"], record["trained"])) == [chosen, rejected]
    implicit = {"chosen": [U("hi"), A("hello")], "rejected": [U("hi"), A("a"), U("more"), A("b")]}
    assert pd.tokenize_preference(implicit, ds(), tok) == record


def test_messages_without_tags_train_what_follows_each_header(chatml, llama3):
    row = {"prompt": [U("hi")], "chosen": [A("hello")], "rejected": [A("bye")]}
    record = pd.tokenize_preference(row, ds(), chatml)
    assert record["prompt"] == ids(chatml, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert list(zip(record["responses"], record["trained"])) == [
        continuation(chatml, [("hello<|im_end|>\n", True)]), continuation(chatml, [("bye<|im_end|>\n", True)])]
    multi = {"prompt": [U("hi")], "chosen": [A("a"), U("more"), A("b")], "rejected": [A("c")]}
    record = pd.tokenize_preference(multi, ds(), llama3)
    assert record["prompt"] == ids(llama3, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert list(zip(record["responses"], record["trained"])) == [
        continuation(llama3, [("a<|eot_id|>", True),
                              ("<|start_header_id|>user<|end_header_id|>\n\nmore<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("b<|eot_id|>", True)]),
        continuation(llama3, [("c<|eot_id|>", True)])]


def test_ranking_orders_responses_best_first_and_ties_make_no_pair(tok):
    row = {"prompt": "Q:", "responses": [" a", " b", " c", " d"], "scores": [1, 3, 3, 0]}
    record = pd.tokenize_ranking(row, ds("ranking"), tok)
    assert record["prompt"] == [BOS] + ids(tok, "Q:")
    assert record["responses"] == [ids(tok, r) + [EOS] for r in (" b", " c", " a", " d")]
    assert record["scores"] == [3.0, 3.0, 1.0, 0.0]
    assert pd.pairs(record["scores"]) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # not (0, 1): a tie
    assert pd.ranks(record["scores"]) == [0, 0, 1, 2]
    by_index = pd.tokenize_ranking({"prompt": "Q:", "responses": [" a", " b", " c"], "ranking": [2, 0, 1]},
                                   ds("ranking"), tok)
    assert by_index["responses"] == [ids(tok, r) + [EOS] for r in (" c", " a", " b")]
    assert by_index["scores"] == [2.0, 1.0, 0.0]


def test_implicit_ranking_of_conversations(chatml):
    row = {"responses": [[U("q"), A("x")], [U("q"), A("y")], [U("q"), A("z")]], "ranking": [1, 2, 0]}
    record = pd.tokenize_ranking(row, ds("ranking"), chatml)
    assert record["prompt"] == ids(chatml, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    assert record["responses"] == [ids(chatml, f"{r}<|im_end|>\n") for r in "yzx"]


# ---------------------------------------------------------------- parity with TRL 1.16's DPO

def trl_dpo(rows: list[dict], tok) -> list[dict]:
    """prompt_ids, chosen_ids, rejected_ids as DPOTrainer._prepare_dataset makes them."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    args = DPOConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True, dataset_num_proc=None)
    out = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok, args, "train")
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in out]


def ours(rows: list[dict], tok) -> list[dict]:
    records = [pd.tokenize_preference(r, ds(), tok) for r in rows]
    return [{"prompt_ids": r["prompt"], "chosen_ids": r["responses"][0], "rejected_ids": r["responses"][1]}
            for r in records]


STRING_ROWS = [{"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5"},
               {"prompt": "Reverse water:", "chosen": " retaw", "rejected": " water"}]
CHAT_ROWS = [{"prompt": [{"role": "system", "content": "Be brief."}, U("Reverse water")],
              "chosen": [A("retaw")], "rejected": [A("water")]},
             {"prompt": [U("hi")], "chosen": [A("a"), U("more"), A("b")], "rejected": [A("c")]}]


def test_string_and_hh_ids_match_trl_dpo(tok):
    assert ours(STRING_ROWS, tok) == trl_dpo(STRING_ROWS, tok)
    hh = [HH, {"chosen": HH["chosen"] + "\n\nHuman: ok\n\nAssistant: sure", "rejected": HH["chosen"]
               + "\n\nHuman: ok\n\nAssistant: no"}]
    assert ours(hh, tok) == trl_dpo(hh, tok)


@pytest.mark.parametrize("template", ["tiny", "chatml", "llama3"])
def test_chat_ids_match_trl_dpo(tok, chatml, llama3, template):
    t = {"tiny": tok, "chatml": chatml, "llama3": llama3}[template]
    assert ours(CHAT_ROWS, t) == trl_dpo(CHAT_ROWS, t)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CHAT_ROWS]
    assert ours(implicit, t) == trl_dpo(implicit, t)


def test_a_prompt_ending_mid_token_keeps_its_own_tokens_unlike_trl(tok):
    # Deliberate: TRL tokenizes prompt + response as one text, so "Answer: " + "blue" merges
    # into "Ġblue" and the prompt loses its "Ġ"; ours is the prompt as it is at inference.
    row = {"prompt": "Answer: ", "chosen": "blue", "rejected": "red"}
    [theirs] = trl_dpo([row], tok)
    [mine] = ours([row], tok)
    assert theirs["prompt_ids"] == [BOS] + ids(tok, "Answer:") and theirs["chosen_ids"] == ids(tok, " blue") + [EOS]
    assert mine["prompt_ids"] == [BOS] + ids(tok, "Answer: ") and mine["chosen_ids"] == ids(tok, "blue") + [EOS]


# ---------------------------------------------------------------- truncation

def record(prompt, *responses, scores=None, trained=None, margin=None):
    return {"prompt": list(prompt), "responses": [list(r) for r in responses],
            "trained": trained or [[True] * len(r) for r in responses],
            "scores": scores or [float(len(responses) - 1 - i) for i in range(len(responses))], "margin": margin}


def test_truncate_keeps_what_fits():
    r = record([BOS, 10, 11], [20, 21], [30])
    assert pd.truncate(r, 8, BOS) == (r, 0)


def test_truncate_cuts_the_prompt_start_after_bos_then_the_responses_end():
    long_prompt = [BOS] + list(range(10, 30))  # 21 tokens
    # The prompt gives way to the longest response (3): keeps BOS and its last 12 tokens.
    got, lost = pd.truncate(record(long_prompt, [40, 41, 42], [50]), 16, BOS)
    assert got["prompt"] == [BOS] + list(range(18, 30)) and got["responses"] == [[40, 41, 42], [50]] and lost == 0
    # ... but not below half of max_len: the responses keep the start of the rest.
    got, _ = pd.truncate(record(long_prompt, list(range(40, 60)), [50, 51]), 16, BOS)
    assert got["prompt"] == [BOS] + list(range(23, 30)) and got["responses"] == [list(range(40, 48)), [50, 51]]
    # Without a BOS id the prompt's first token is not special.
    got, _ = pd.truncate(record(long_prompt, [40, 41, 42], [50]), 16)
    assert got["prompt"] == list(range(17, 30))


def test_truncate_drops_responses_left_without_labels_or_made_identical():
    prompt = [BOS] + list(range(10, 20))
    # The chosen response's labels start late: cut away, so the pair is dropped, and counted.
    r = record(prompt, list(range(40, 52)), [50], trained=[[False] * 10 + [True] * 2, [True]])
    assert pd.truncate(r, 16, BOS) == (None, 1)
    # Cut to the same tokens, chosen and rejected are no pair.
    assert pd.truncate(record(prompt, list(range(40, 60)), list(range(40, 50)) + [99]), 16, BOS) == (None, 1)
    # A ranking loses the pairs of the response that goes and keeps the rest.
    ranking = record(prompt, [40], [41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [60],
                     trained=[[True], [False] * 9 + [True], [True]], scores=[2.0, 1.0, 0.0])
    got, lost = pd.truncate(ranking, 16, BOS)
    assert got["responses"] == [[40], [60]] and got["scores"] == [2.0, 0.0] and lost == 2


# ---------------------------------------------------------------- batching

def test_collate_pads_to_the_longest_in_the_batch_and_groups_by_prompt():
    a = record([BOS, 10, 11], [20, 21], [30], margin=0.5)
    b = record([BOS, 12], [40, 41, 42, 43], [50, 51], [60], scores=[3.0, 1.0, 1.0],
               trained=[[True, True, True, False], [True, True], [True]])
    batch = pd.collate([a, b], pad_id=PAD)
    assert batch["input_ids"].tolist() == [
        [BOS, 10, 11, 20, 21, PAD],
        [BOS, 10, 11, 30, PAD, PAD],
        [BOS, 12, 40, 41, 42, 43],
        [BOS, 12, 50, 51, PAD, PAD],
        [BOS, 12, 60, PAD, PAD, PAD],
    ]
    I = IGNORE
    assert batch["labels"].tolist() == [
        [I, I, I, 20, 21, I],
        [I, I, I, 30, I, I],
        [I, I, 40, 41, 42, I],
        [I, I, 50, 51, I, I],
        [I, I, 60, I, I, I],
    ]
    assert batch["attention_mask"].sum(axis=1).tolist() == [5, 4, 6, 4, 3]
    assert batch["group"].tolist() == [0, 0, 1, 1, 1]
    assert batch["rank"].tolist() == [0, 1, 0, 1, 1]
    assert batch["score"].tolist() == [1.0, 0.0, 3.0, 1.0, 1.0]
    assert batch["pairs"].tolist() == [[0, 1], [2, 3], [2, 4]]
    assert batch["margin"].tolist() == [0.5, 0.0, 0.0]
    assert "is_chosen" not in batch  # a ranking of three
    assert all(v.dtype == np.int64 for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask"))


def test_collate_pairs_mark_chosen_and_round_up_the_width(tok):
    records = [pd.tokenize_preference(HH, ds(), tok),
               pd.tokenize_preference({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, ds(), tok)]
    batch = pd.collate(records, pad_id=PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (4, 24)  # the longest is 17 + 5 = 22 tokens, not data.max_seq_len
    assert batch["is_chosen"].tolist() == [True, False, True, False]
    assert "margin" not in batch
    chosen = batch["input_ids"][batch["is_chosen"]]
    assert chosen[0, :22].tolist() == records[0]["prompt"] + records[0]["responses"][0]
    n = len(records[1]["prompt"]) + len(records[1]["responses"][0])
    assert chosen[1].tolist() == records[1]["prompt"] + records[1]["responses"][0] + [PAD] * (24 - n)


def test_records_round_trip_through_arrow_rows(tok):
    import pyarrow as pa

    records = [pd.tokenize_preference(HH, ds(), tok), record([BOS, 5], [6, 7], [8], [9], margin=1.5,
                                                             scores=[1.0, 0.5, 0.0])]
    table = pd.to_table(records)
    assert table.schema.field("responses").type == pa.list_(pa.list_(pa.int32()))
    assert pd.from_table(table) == records
    # A numpy-format batch row (Ray Data's nested object arrays) reads the same.
    row = {k: (np.array([np.array(x) for x in v], dtype=object) if k in ("responses", "trained")
               else np.array(v) if isinstance(v, list) else v) for k, v in pd.to_row(records[1]).items()}
    assert pd.from_row(row) == records[1]
    assert pd.record_sizes(records[1]) == (3, 4 + 3 + 3, 4)


def test_precomputed_reference_logps_travel_with_their_rows_into_the_batch():
    import pyarrow as pa

    records = [record([BOS, 10], [20], [30]), record([BOS, 12], [40, 41], [50])]
    assert "ref_logps" not in pd.collate(records, pad_id=PAD)  # only with dpo.precompute_reference
    table = pd.to_table(records).append_column(
        "ref_logps", pa.array([[-1.5, -2.25], [-3.0, -0.5]], type=pa.list_(pa.float32())))
    batch = pd.collate(pd.from_table(table), pad_id=PAD)
    # one per sequence, in the batch's sequence order (record by record, best first)
    assert batch["ref_logps"].tolist() == [-1.5, -2.25, -3.0, -0.5]
    assert batch["ref_logps"][batch["pairs"][:, 0]].tolist() == [-1.5, -3.0]


# ---------------------------------------------------------------- row checks

CONV = {"chosen": [U("hi"), A("hello")], "rejected": [U("hi"), A("bye")]}


@pytest.mark.parametrize("row, spec, expected", [
    (HH, ds(), None),
    (CONV, ds(), None),
    ({"prompt": "a", **CONV}, ds(), None),  # UltraFeedback-binarized
    ({"prompt": [U("hi")], "chosen": [A("x")], "rejected": [A("y")]}, ds(), None),
    ({"prompt": "", "chosen": "x", "rejected": "y"}, ds(), None),
    ({"prompt": "q", "chosen": "x"}, ds(), "no field `rejected`; the row has `prompt`, `chosen` "
                                           "(name the field with `rejected_field`)"),
    ({"prompt": "q", "chosen": 3, "rejected": "y"}, ds(),
     "field `chosen` must be a string or a list of chat turns, got a number"),
    ({"prompt": "q", "chosen": "x", "rejected": [A("y")]}, ds(),
     "fields `chosen` and `rejected` must both be strings or both be lists of chat turns; got a string and a list"),
    ({"prompt": "q", "chosen": "", "rejected": "y"}, ds(), "field `chosen` is an empty response"),
    ({"prompt": "q", "chosen": [], "rejected": [A("y")]}, ds(), "field `chosen` is an empty conversation"),
    ({"prompt": "q", "chosen": [U("x")], "rejected": [A("y")]}, ds(),
     "field `chosen` has no assistant turn: nothing to train on"),
    ({"prompt": "q", "chosen": "x", "rejected": "x"}, ds(),
     "fields `chosen` and `rejected` are identical: no preference to learn"),
    (CONV | {"rejected": CONV["chosen"]}, ds(), "fields `chosen` and `rejected` are identical: no preference to learn"),
    ({"prompt": [U("q")], "chosen": "x", "rejected": "y"}, ds(),
     "field `prompt` is a list of chat turns but the responses are strings: make them all one or the other"),
    ({"prompt": 7, "chosen": "x", "rejected": "y"}, ds(),
     "field `prompt` must be a string or a list of chat turns, got a number"),
    ({"prompt": [U("q")], "chosen": [U("x"), A("y")], "rejected": [A("z")]}, ds(),
     "`chosen[0]` is a user turn: a response starts with the assistant's reply (the turns before it belong in "
     "`prompt`)"),
    ({"prompt": [{"role": "bot", "content": "q"}], "chosen": [A("x")], "rejected": [A("y")]}, ds(),
     "`prompt[0]` has role 'bot'; roles are system, user, assistant, tool"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: x"}, ds(),
     "fields `chosen` and `rejected` differ before their first `\\n\\nAssistant:`: they share no prompt"),
    ({"chosen": [U("a"), A("x")], "rejected": [U("b"), A("x")]}, ds(),
     "fields `chosen` and `rejected` share no prompt that an assistant turn of each follows (they differ at turn 0): "
     "give the prompt in its own field"),
    ({"chosen": "same start", "rejected": "same start, longer"}, ds(),
     "field `chosen` is all prompt: nothing follows the beginning the responses share (with no `prompt` field, "
     "that beginning is the prompt)"),
    (HH, ds(margin_field="margin"), "no field `margin`; the row has `chosen`, `rejected` "
                                    "(name the field with `margin_field`)"),
    (HH | {"margin": "big"}, ds(margin_field="margin"), "field `margin` must be a number, got a string"),
    (HH | {"margin": 2}, ds(margin_field="margin"), None),
    # ranking
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}, ds("ranking"), None),
    ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2.5, 1]}, ds("ranking"), None),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0], "scores": [0, 3]}, ds("ranking"), None),
    ({"responses": [[U("q"), A("a")], [U("q"), A("b")]], "scores": [0, 1]}, ds("ranking"), None),
    ({"prompt": "q", "answers": ["a", "b"]}, ds("ranking"),
     "no field `responses`; the row has `prompt`, `answers` (name the field with `responses_field`)"),
    ({"prompt": "q", "responses": ["a"], "scores": [1]}, ds("ranking"),
     "field `responses` has 1 response: a ranking needs at least 2"),
    ({"prompt": "q", "responses": ["a", "b"]}, ds("ranking"),
     "no field `ranking` or `scores`; the row has `prompt`, `responses` (name one with `ranking_field` or "
     "`scores_field`)"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, ds("ranking"),
     "field `ranking` must list each response index 0..2 once, best first; got [0, 0, 1]"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [1, 3, 2]}, ds("ranking"),
     "field `ranking` must list each response index 0..2 once, best first; got [1, 3, 2] (indices count from 0)"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": "0,1"}, ds("ranking"),
     "field `ranking` must list each response index 0..1 once, best first; got a string"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2]}, ds("ranking"),
     "field `scores` has 2 scores for 3 responses"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "2"]}, ds("ranking"),
     "`scores[1]` must be a number, got a string"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, float("nan")]}, ds("ranking"),
     "`scores[1]` must be a number, got NaN"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [2, 2, 2]}, ds("ranking"),
     "field `scores` gives every response the same score: no preference to learn"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "scores": [0, 3]}, ds("ranking"),
     "fields `ranking` and `scores` disagree: `ranking` puts response 0 before 1, which `scores` scores higher"),
    ({"prompt": "q", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}, ds("ranking"),
     "fields `responses[0]` and `responses[2]` are identical: they cannot rank apart"),
    ({"prompt": "q", "responses": ["a", "b", "a"], "scores": [1, 0, 1]}, ds("ranking"), None),  # a tie: harmless
    ({"prompt": "q", "responses": ["a", [A("b")]], "scores": [1, 0]}, ds("ranking"),
     "fields `responses[0]` and `responses[1]` must both be strings or both be lists of chat turns; got a string "
     "and a list"),
    ({"prompt": "q", "responses": ["a", ""], "scores": [1, 0]}, ds("ranking"), "field `responses[1]` is an empty "
                                                                             "response"),
    ({"responses": [[U("q"), A("a")], [U("r"), A("b")], [U("q"), A("c")]], "scores": [0, 1, 2]}, ds("ranking"),
     "the responses in `responses` share no prompt that an assistant turn of each follows (they differ at turn 0): "
     "give the prompt in its own field"),
])
def test_row_problem(row, spec, expected):
    assert data_check.row_problem(row, spec) == expected


def test_a_valid_row_always_tokenizes(tok, chatml):
    """Every row the check passes tokenizes; checked() reports the rest as the Ray stage does."""
    rows = [HH, CONV, {"prompt": "a", **CONV}, {"prompt": "q", "responses": ["a", "b", "a"], "scores": [1, 0, 1]}]
    for row in rows:
        spec = ds("ranking") if "responses" in row else ds()
        for t in (tok, chatml):
            record, problem = pd.checked(row, spec, t)
            assert problem is None and len(record["responses"]) == (3 if "responses" in row else 2)
    assert pd.checked({"chosen": "x", "rejected": "x"}, ds(), tok) == (
        None, "fields `chosen` and `rejected` are identical: no preference to learn")


def test_spec_fields_and_loss_on():
    from pydantic import ValidationError

    spec = ds("ranking", responses_field="answers", scores_field="rating", margin_field="m")
    assert (spec.chosen_field, spec.rejected_field, spec.ranking_field, spec.margin_field) == (
        "chosen", "rejected", "ranking", "m")
    with pytest.raises(ValidationError, match="applies to formats messages, sharegpt, prompt_completion; format "
                                              "preference trains the response: remove it"):
        ds("preference", loss_on="all")
