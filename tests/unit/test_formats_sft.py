"""Supervised formats beyond text/alpaca: `messages`, `sharegpt`, `prompt_completion`, each
`loss_on`, chat templates with and without `{% generation %}` tags, and loss parity with
TRL's own tokenization on the shipped tiny model.

Expected ids and labels are written out as the text each template renders, in segments
marked trained or not; only the tokenizer turns that text into ids (never the code under
test)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from trainers import chat_templates, data
from trainers.data import IGNORE, pack, tokenize_example
from trainers.spec import DatasetSpec

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "configs" / "examples" / "tiny-llama"
DATA_DIR = REPO / "configs" / "examples" / "data"
QUICKSTART = REPO / "configs" / "examples" / "quickstart.yaml"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


@pytest.fixture(scope="module")
def tok():
    """The shipped tokenizer: its template HAS `{% generation %}` tags."""
    t = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    assert chat_templates.has_generation_tags(t.chat_template)
    return t


def with_template(tok, template: str):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def llama3(tok):
    """Llama 3's template (no generation tags) on the tiny vocabulary: its markers other than
    BOS are plain text here, which is fine for checking which tokens train."""
    return with_template(tok, chat_templates.LLAMA3)


@pytest.fixture(scope="module")
def chatml(tok):
    return with_template(tok, chat_templates.CHATML)


def expect(tok, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids of the whole text, and labels trained where the segment says so. Segment
    boundaries must be token boundaries (asserted), as they are in these examples."""
    text = "".join(s for s, _ in segments)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    labels, done = [], ""
    for segment, trained in segments:
        done += segment
        n = len(tok(done, add_special_tokens=False)["input_ids"])
        assert ids[:n] == tok(done, add_special_tokens=False)["input_ids"], f"not a token boundary: {done!r}"
        labels += ids[len(labels):n] if trained else [IGNORE] * (n - len(labels))
    return ids, labels


def spans(ids: list[int], labels: list[int], tok) -> list[str]:
    """The trained runs of tokens, decoded."""
    out, current = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if current:
                out.append(tok.decode(current))
            current = []
        else:
            assert lab == i
            current.append(i)
    return out + ([tok.decode(current)] if current else [])


def ds(fmt: str, **kw) -> DatasetSpec:
    return DatasetSpec(path="x.jsonl", format=fmt, **kw)


MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse the word.\n\nwater"},
    {"role": "assistant", "content": "retaw"},
    {"role": "user", "content": "Reverse the word.\n\nhouse"},
    {"role": "assistant", "content": "esuoh"},
]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in MULTI]


def messages_row(messages, field="messages"):
    return {field: messages}


# ---------------------------------------------------------------- the tiny template (generation tags)

def tiny_segments(loss_on: str) -> list[tuple[str, bool]]:
    a = loss_on == "assistant"
    return [
        ("<|system|>\nBe brief.<|end|>\n<|user|>\nReverse the word.\n\nwater<|end|>\n<|assistant|>\n", False),
        ("retaw<|end|>", a),
        ("\n<|user|>\nReverse the word.\n\nhouse<|end|>\n<|assistant|>\n", False),
        ("esuoh<|end|>", True),
        ("\n", False),
    ]


@pytest.mark.parametrize("loss_on", ["assistant", "last_turn"])
def test_messages_generation_tags_train_the_tagged_content_of_the_chosen_turns(tok, loss_on):
    got = tokenize_example(messages_row(MULTI), ds("messages", loss_on=loss_on), tok)
    assert got == expect(tok, tiny_segments(loss_on))


def test_messages_default_is_every_assistant_turn(tok):
    assert tokenize_example(messages_row(MULTI), ds("messages"), tok) == expect(tok, tiny_segments("assistant"))
    ids, labels = tokenize_example(messages_row(MULTI), ds("messages"), tok)
    assert spans(ids, labels, tok) == ["retaw<|end|>", "esuoh<|end|>"]


def test_messages_loss_on_all_trains_every_token(tok):
    ids, labels = tokenize_example(messages_row(MULTI), ds("messages", loss_on="all"), tok)
    assert labels == ids == expect(tok, tiny_segments("assistant"))[0]


def test_sharegpt_is_the_same_conversation_as_messages(tok):
    for loss_on in ("assistant", "last_turn", "all"):
        assert (tokenize_example({"conversations": SHAREGPT}, ds("sharegpt", loss_on=loss_on), tok)
                == tokenize_example(messages_row(MULTI), ds("messages", loss_on=loss_on), tok))


def test_sharegpt_reads_the_configured_field_and_role_names(tok):
    turns = [{"from": {"system": "sys", "user": "person", "assistant": "bot"}[m["role"]], "value": m["content"],
              "weight": 1} for m in MULTI]
    spec = ds("sharegpt", conversations_field="dialog", roles={"sys": "system", "person": "user", "bot": "assistant"})
    assert tokenize_example({"dialog": turns}, spec, tok) == expect(tok, tiny_segments("assistant"))


# ---------------------------------------------------------------- Llama 3 (no generation tags)

def llama3_segments(loss_on: str) -> list[tuple[str, bool]]:
    a = loss_on == "assistant"
    return [
        (f"{BOS}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nReverse the word.\n\nwater<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("retaw<|eot_id|>", a),
        ("<|start_header_id|>user<|end_header_id|>\n\nReverse the word.\n\nhouse<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("esuoh<|eot_id|>", True),
    ]


@pytest.mark.parametrize("loss_on", ["assistant", "last_turn"])
def test_llama3_without_tags_trains_each_turn_after_its_header(llama3, loss_on):
    got = tokenize_example(messages_row(MULTI), ds("messages", loss_on=loss_on), llama3)
    assert got == expect(llama3, llama3_segments(loss_on))
    assert got[0][0] == llama3.bos_token_id  # the template's own BOS, once


def test_llama3_loss_on_all(llama3):
    ids, labels = tokenize_example(messages_row(MULTI), ds("messages", loss_on="all"), llama3)
    assert labels == ids == expect(llama3, llama3_segments("assistant"))[0]


def test_chatml_without_tags_trains_what_the_turn_adds_after_its_header(chatml):
    got = tokenize_example({"conversations": SHAREGPT}, ds("sharegpt"), chatml)
    assert got == expect(chatml, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nReverse the word.\n\nwater<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("retaw<|im_end|>\n", True),  # the template's newline after the end marker is the turn's
        ("<|im_start|>user\nReverse the word.\n\nhouse<|im_end|>\n<|im_start|>assistant\n", False),
        ("esuoh<|im_end|>\n", True),
    ])


def test_a_token_merging_across_the_header_boundary_trains_from_the_first_differing_token(tok):
    # The header ends in "t" and the content starts with "a": the tokenizer has "ta".
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|assistant|>t' + m.content + '<|end|>' }}"
                "{% else %}{{ '<|user|>' + m.content + '<|end|>' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>t' }}{% endif %}")
    t = with_template(tok, template)
    assert t.convert_ids_to_tokens(t("ta", add_special_tokens=False)["input_ids"]) == ["ta"]
    ids, labels = tokenize_example(messages_row([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
                                   ds("messages"), t)
    assert ids == t("<|user|>q<|end|><|assistant|>ta<|end|>", add_special_tokens=False)["input_ids"]
    assert spans(ids, labels, t) == ["ta<|end|>"]


def test_an_opening_assistant_turn(tok, chatml, llama3):
    row = messages_row([{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}])
    assert spans(*tokenize_example(row, ds("messages"), tok), tok) == ["Hello.<|end|>", "a<|end|>"]
    assert spans(*tokenize_example(row, ds("messages"), chatml), chatml) == ["Hello.<|im_end|>\n", "a<|im_end|>\n"]
    # Llama 3 writes BOS with its first turn only: an empty conversation renders no BOS.
    _, problem = data._formatted(row, ds("messages"), llama3)
    assert problem.startswith("cannot be formatted: TemplateError: the conversation opens with an assistant turn")


def test_a_template_that_rewrites_earlier_turns_is_a_row_problem_not_wrong_masks(tok):
    # Mistral-style: the system prompt goes into the LAST user turn, so prefixes differ.
    template = ("{% set sys = messages[0].content if messages[0].role == 'system' else '' %}"
                "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}"
                "{{ '[INST] ' + (sys + ' ' if loop.last or loop.revindex == 2 else '') + m.content + ' [/INST]' }}"
                "{% else %}{{ m.content + '</s>' }}{% endif %}{% endfor %}")
    t = with_template(tok, template)
    row = messages_row(MULTI)
    example, problem = data._formatted(row, ds("messages"), t)
    assert example is None
    assert problem.startswith("cannot be formatted: TemplateError: the chat template renders the turns before "
                              "assistant turn 2 differently once later turns follow")
    assert "{% generation %}" in problem and "loss_on: all" in problem
    # every token trains with loss_on: all, which needs no turn boundaries
    ids, labels = tokenize_example(row, ds("messages", loss_on="all"), t)
    assert labels == ids


# ---------------------------------------------------------------- prompt_completion

def test_prompt_completion_strings_train_the_completion_and_eos(tok):
    row = {"prompt": "Question: Reverse the word.\n\nwater\nAnswer:", "completion": " retaw"}
    prompt = [tok.bos_token_id] + tok.encode(row["prompt"], add_special_tokens=False)
    completion = tok.encode(" retaw", add_special_tokens=False) + [tok.eos_token_id]
    for loss_on in (None, "assistant", "last_turn"):
        assert tokenize_example(row, ds("prompt_completion", loss_on=loss_on), tok) == (
            prompt + completion, [IGNORE] * len(prompt) + completion)
    ids, labels = tokenize_example(row, ds("prompt_completion", loss_on="all"), tok)
    assert ids == labels == prompt + completion
    assert tok.decode(completion) == f" retaw{EOS}"


def test_prompt_completion_reads_the_configured_fields(tok):
    got = tokenize_example({"q": "2+2=", "a": " 4"}, ds("prompt_completion", prompt_field="q", completion_field="a"),
                           tok)
    assert got == tokenize_example({"prompt": "2+2=", "completion": " 4"}, ds("prompt_completion"), tok)


FEW_SHOT_PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse the word.\n\nwater"},
    {"role": "assistant", "content": "retaw"},  # part of the prompt: never trained unless loss_on: all
    {"role": "user", "content": "Reverse the word.\n\nhouse"},
]


def test_conversational_prompt_completion_trains_only_the_completions_assistant_turns(tok, llama3):
    row = {"prompt": FEW_SHOT_PROMPT, "completion": [{"role": "assistant", "content": "esuoh"}]}
    for loss_on in (None, "assistant", "last_turn"):
        spec = ds("prompt_completion", loss_on=loss_on)
        assert tokenize_example(row, spec, tok) == expect(tok, tiny_segments("last_turn"))
        assert tokenize_example(row, spec, llama3) == expect(llama3, llama3_segments("last_turn"))
    ids, labels = tokenize_example(row, ds("prompt_completion", loss_on="all"), llama3)
    assert ids == labels == expect(llama3, llama3_segments("assistant"))[0]


def test_conversational_completion_of_several_turns(tok):
    row = {"prompt": MULTI[:2], "completion": MULTI[2:]}
    assert spans(*tokenize_example(row, ds("prompt_completion"), tok), tok) == ["retaw<|end|>", "esuoh<|end|>"]
    assert spans(*tokenize_example(row, ds("prompt_completion", loss_on="last_turn"), tok), tok) == ["esuoh<|end|>"]


# ---------------------------------------------------------------- chat templates

def test_builtin_templates(tok):
    assert chat_templates.resolve("chatml") == chat_templates.CHATML
    assert chat_templates.resolve("llama3") == chat_templates.LLAMA3
    assert chat_templates.resolve(None) is None
    assert chat_templates.resolve("{{ messages }}") == "{{ messages }}"
    assert not chat_templates.has_generation_tags(chat_templates.LLAMA3)
    assert chat_templates.has_generation_tags("{%- generation -%}x{% endgeneration %}")
    with_template(tok, chat_templates.CHATML).apply_chat_template(MULTI, tokenize=False)  # renders


def test_builtin_llama3_is_the_upstream_text():
    trl = pytest.importorskip("trl")
    upstream = Path(trl.__file__).parent / "chat_templates" / "llama3.jinja"
    if not upstream.exists():
        pytest.skip("this TRL ships no llama3.jinja")
    assert upstream.read_text() == chat_templates.LLAMA3


def test_template_from_a_file_and_a_missing_one(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(chat_templates.CHATML)
    assert chat_templates.resolve(str(path)) == chat_templates.CHATML
    with pytest.raises(chat_templates.TemplateError, match=r"data.chat_template: .*nope.jinja is not a built-in "
                                                           r"\(chatml, llama3\) and cannot be read"):
        chat_templates.resolve(str(tmp_path / "nope.jinja"))


def test_model_dir_has_template(tmp_path):
    assert chat_templates.model_dir_has_template(str(MODEL_DIR)) is True
    bare = no_template_model(tmp_path)
    assert chat_templates.model_dir_has_template(str(bare)) is False
    (bare / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert chat_templates.model_dir_has_template(str(bare)) is True
    assert chat_templates.model_dir_has_template("meta-llama/Llama-3.2-1B-Instruct") is None
    assert chat_templates.model_dir_has_template("s3://bucket/model") is None


def test_load_tokenizer_applies_the_spec_template(tmp_path):
    from trainers import models

    tok = models.load_tokenizer(str(no_template_model(tmp_path)), chat_template="llama3")
    assert tok.chat_template == chat_templates.LLAMA3
    tok.save_pretrained(tmp_path / "export")  # the exported model carries it
    assert chat_templates.model_dir_has_template(str(tmp_path / "export")) is True


def no_template_model(tmp_path) -> Path:
    """The tiny model's tokenizer (no weights) without its chat template."""
    out = tmp_path / "no-template"
    out.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, out / name)
    return out


# ---------------------------------------------------------------- pre-flight: a missing template is exit 2

def validate(capsys, spec=QUICKSTART, *args) -> tuple[int, str]:
    from launcher.cli import main

    with pytest.raises(SystemExit) as info:
        main(["validate", str(spec), *args])
    return info.value.code, capsys.readouterr().err


def test_validate_chat_data_without_a_template_is_exit_2_naming_the_field(tmp_path, capsys):
    code, err = validate(capsys, QUICKSTART, f"model.path={no_template_model(tmp_path)}")
    assert code == 2
    assert (f"data.chat_template: the tokenizer of {tmp_path}/no-template has no chat template, and data.train[0] "
            "(format messages) is chat data") in err
    assert "hint: set data.chat_template to a built-in (chatml, llama3)" in err
    assert "Traceback" not in err
    # messages in a bucket offline: chat data whatever its rows, so the same error
    code, err = validate(capsys, QUICKSTART, f"model.path={no_template_model(tmp_path / 'b')}",
                         "data.train[0].path=s3://no-such-bucket/chat.jsonl")
    assert code == 2 and "data.train[0] (format messages) is chat data" in err


def test_validate_conversational_prompt_completion_without_a_template(tmp_path, capsys):
    data_file = tmp_path / "pc.jsonl"
    data_file.write_text(json.dumps({"prompt": FEW_SHOT_PROMPT, "completion": [{"role": "assistant",
                                                                                "content": "x"}]}) + "\n")
    model = no_template_model(tmp_path)
    code, err = validate(capsys, QUICKSTART, f"model.path={model}", f"data.train[0].path={data_file}",
                         "data.train[0].format=prompt_completion")
    assert code == 2 and "data.train[0] (format prompt_completion) is chat data" in err
    # string pairs need no template
    data_file.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    from launcher.cli import main

    main(["validate", str(QUICKSTART), f"model.path={model}", f"data.train[0].path={data_file}",
          "data.train[0].format=prompt_completion"])
    assert ": ok (" in capsys.readouterr().err


def test_validate_accepts_a_builtin_or_a_file_next_to_the_spec(tmp_path, capsys):
    from launcher.cli import main
    from launcher.config import for_cluster, load_spec

    model = no_template_model(tmp_path)
    main(["validate", str(QUICKSTART), f"model.path={model}", "data.chat_template=chatml"])
    assert ": ok (" in capsys.readouterr().err
    # A file relative to the spec; the cluster receives its text.
    shutil.copytree(REPO / "configs" / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "examples" / "mine.jinja").write_text(chat_templates.CHATML)
    spec_file = tmp_path / "examples" / "run.yaml"
    spec_file.write_text(f"defaults: [quickstart.yaml]\nmodel: {{path: {model}}}\ndata: {{chat_template: mine.jinja}}\n")
    main(["validate", str(spec_file)])
    assert ": ok (" in capsys.readouterr().err
    spec = load_spec(spec_file)
    assert spec.data.chat_template == str(tmp_path / "examples" / "mine.jinja")
    assert for_cluster(spec)["data"]["chat_template"] == chat_templates.CHATML


def test_validate_names_a_template_file_that_does_not_exist(capsys):
    code, err = validate(capsys, QUICKSTART, "data.chat_template=chatlm")
    assert code == 2
    assert "data.chat_template: chatlm is not a built-in (chatml, llama3) and cannot be read as a jinja file" in err


def test_loss_on_for_a_format_that_is_not_chat_is_an_error_naming_the_field(capsys):
    code, err = validate(capsys, REPO / "configs" / "examples" / "alpaca_zero3.yaml", "data.train[0].loss_on=all")
    assert code == 2
    assert "data.train[0].loss_on: applies to formats messages, sharegpt, prompt_completion; format alpaca" in err


def test_the_job_refuses_chat_data_without_a_template_before_starting(tmp_path):
    from trainers import entry
    from trainers.spec import parse_spec
    from trainers.user_errors import JobUserError

    model = no_template_model(tmp_path)
    spec = {"name": "t", "method": "sft", "model": {"path": str(model)},
            "data": {"train": [{"path": str(DATA_DIR / "sharegpt.jsonl"), "format": "sharegpt"}]}}
    with pytest.raises(JobUserError) as info:
        entry.check_chat_template(parse_spec(spec))
    assert info.value.message.startswith(f"data.chat_template: the tokenizer of {model} has no chat template")
    assert "data.train[0] (format sharegpt) is chat data" in info.value.message
    spec["data"]["chat_template"] = "llama3"
    entry.check_chat_template(parse_spec(spec))  # passes
    spec["data"]["chat_template"] = str(tmp_path / "gone.jinja")  # a path only the launcher's machine had
    with pytest.raises(JobUserError, match="cannot be read as a jinja file"):
        entry.check_chat_template(parse_spec(spec))


# ---------------------------------------------------------------- loss parity with TRL

def read_jsonl(name: str, n: int) -> list[dict]:
    with open(DATA_DIR / name) as f:
        return [json.loads(line) for line in f][:n]


@pytest.fixture(scope="module")
def model():
    torch = pytest.importorskip("torch")
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return m.eval()


def trl_tokenized(rows: list[dict], template: str | None, tmp_path, **config) -> list[dict]:
    """The rows as TRL's SFTTrainer prepares them (input_ids and labels)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    t = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    if template is not None:
        t.chat_template = template
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=None, **config)
    trainer = SFTTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=t)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


def trl_loss(model, examples: list[dict]) -> float:
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=2)(examples)
    with torch.no_grad():
        return model(**batch).loss.item()


def our_loss(model, examples: list[tuple[list[int], list[int]]]) -> float:
    import torch

    rows = pack(examples, max_len=max(len(ids) for ids, _ in examples), pad_id=2, packing=False)
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in rows.items()}).loss.item()


def assert_parity(model, ours: list[tuple[list[int], list[int]]], theirs: list[dict]):
    assert [list(ids) for ids, _ in ours] == [list(r["input_ids"]) for r in theirs]
    assert [list(lab) for _, lab in ours] == [list(r["labels"]) for r in theirs]
    assert our_loss(model, ours) == pytest.approx(trl_loss(model, theirs), abs=1e-5)


PARITY_CHATS = [{"messages": MULTI}, *read_jsonl("messages.jsonl", 8)]


@pytest.mark.parametrize("template", [None, chat_templates.LLAMA3], ids=["generation-tags", "llama3-no-tags"])
def test_messages_loss_matches_trl_assistant_only_loss(model, tok, llama3, template, tmp_path):
    # TRL swaps Llama 3's template for its training variant with generation tags; ours
    # splits the untagged template by rendering prefixes. Both must train the same tokens.
    t = llama3 if template else tok
    ours = [tokenize_example(r, ds("messages"), t) for r in PARITY_CHATS]
    assert_parity(model, ours, trl_tokenized(PARITY_CHATS, template, tmp_path, assistant_only_loss=True))


def test_messages_loss_on_all_matches_trl_full_sequence(model, tok, tmp_path):
    ours = [tokenize_example(r, ds("messages", loss_on="all"), tok) for r in PARITY_CHATS]
    assert_parity(model, ours, trl_tokenized(PARITY_CHATS, None, tmp_path))


def test_prompt_completion_strings_loss_matches_trl_completion_only_loss(model, tok, tmp_path):
    rows = read_jsonl("prompt_completion.jsonl", 8)
    ours = [tokenize_example(r, ds("prompt_completion"), tok) for r in rows]
    assert_parity(model, ours, trl_tokenized(rows, None, tmp_path))  # completion_only_loss: TRL's default here
    ours = [tokenize_example(r, ds("prompt_completion", loss_on="all"), tok) for r in rows]
    assert_parity(model, ours, trl_tokenized(rows, None, tmp_path, completion_only_loss=False))


@pytest.mark.parametrize("template", [None, chat_templates.LLAMA3], ids=["generation-tags", "llama3-no-tags"])
def test_conversational_prompt_completion_loss_matches_trl(model, tok, llama3, template, tmp_path):
    rows = [{"prompt": FEW_SHOT_PROMPT, "completion": [{"role": "assistant", "content": "esuoh"}]}]
    rows += [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in read_jsonl("messages.jsonl", 8)]
    t = llama3 if template else tok
    ours = [tokenize_example(r, ds("prompt_completion"), t) for r in rows]
    assert_parity(model, ours, trl_tokenized(rows, template, tmp_path, assistant_only_loss=True))


def test_tokenize_batch_reads_arrow_rows_of_each_new_format_with_the_spec_template():
    """The Ray Data task's function, called directly on an Arrow batch (no Ray)."""
    import pyarrow as pa

    def batch(name: str, fmt: str, template: str | None) -> dict:
        table = pa.Table.from_pylist(read_jsonl(name, 16))
        return data._tokenize_batch(table, ds=ds(fmt), where="data.train[0]", model_path=str(MODEL_DIR),
                                    trust_remote_code=False, max_len=64, packing=True, chat_template=template)

    sharegpt = batch("sharegpt.jsonl", "sharegpt", None)
    assert sharegpt["input_ids"].tolist() == batch("messages.jsonl", "messages", None)["input_ids"].tolist()
    chatml = batch("sharegpt.jsonl", "sharegpt", "chatml")
    t = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    assert t.decode(chatml["input_ids"][0]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    pc = batch("prompt_completion.jsonl", "prompt_completion", None)
    assert t.decode(pc["input_ids"][0]).startswith(f"{BOS}Question: Add the two numbers.")
    assert (pc["labels"] != IGNORE).sum() < (pc["attention_mask"] == 1).sum()
