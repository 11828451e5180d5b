"""The shipped tiny model and example data (configs/examples) are usable and reproducible."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests` is not a package root under plain `pytest`
    sys.path.insert(0, str(REPO))

from tests.fixtures import tiny_models  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL_DIR = REPO / "configs" / "examples" / "tiny-llama"
DATA_DIR = REPO / "configs" / "examples" / "data"

TWO_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Reverse the word.\n\ncat"},
    {"role": "assistant", "content": "tac"},
    {"role": "user", "content": "Add the two numbers.\n\n2 + 3"},
    {"role": "assistant", "content": "5"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)


def test_shipped_model_dir_is_small_and_complete():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size < 1_500_000


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) >= 384
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    for tok in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tok in tokenizer.all_special_tokens
        assert tokenizer.encode(tok, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(tok)]
    assert tokenizer.model_max_length == 2048
    # Llama-3 style: bos prepended by default, eos never appended.
    ids = tokenizer("hello").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids


def test_forward_loss_is_finite_and_generate_runs(model, tokenizer):
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert cfg.tie_word_embeddings is False
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id

    batch = tokenizer(["Reverse the word.\n\ncat", "Add the two numbers."], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert math.isfinite(out.loss.item())
    assert out.logits.shape[-1] == len(tokenizer)

    prompt = tokenizer.apply_chat_template(TWO_TURNS[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[0] == 1
    assert prompt["input_ids"].shape[1] < gen.shape[1] <= prompt["input_ids"].shape[1] + 5


def test_chat_template_two_turns(tokenizer):
    assert tokenizer.chat_template == tiny_models.CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert text == (
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nReverse the word.\n\ncat<|end|>\n"
        "<|assistant|>\ntac<|end|>\n"
        "<|user|>\nAdd the two numbers.\n\n2 + 3<|end|>\n"
        "<|assistant|>\n5<|end|>\n"
    )
    prompt = tokenizer.apply_chat_template(TWO_TURNS[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nAdd the two numbers.\n\n2 + 3<|end|>\n<|assistant|>\n")
    no_prompt = tokenizer.apply_chat_template(TWO_TURNS[:4], tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")


def test_chat_template_marks_assistant_tokens(tokenizer):
    enc = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = enc["input_ids"]
    masked = [i for i, m in zip(ids, enc["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "tac<|end|>5<|end|>"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces\t\n",
        "Ünïcödé — naïve café, 日本語のテキスト, العربية, emoji 🤖🚀👩‍💻",
        "mixed\r\nline\rendings\n\n\nand \u00a0nbsp \u200b zero-width",
        "code: def f(x):\n    return x ** 2  # 😀",
    ],
)
def test_tokenizer_round_trips_unicode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # With the default bos, skipping special tokens gives the text back too.
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_example_data_files():
    alpaca = _read_jsonl(DATA_DIR / "alpaca.jsonl")
    messages = _read_jsonl(DATA_DIR / "messages.jsonl")
    text = _read_jsonl(DATA_DIR / "text.jsonl")
    assert len(alpaca) == len(messages) == len(text) == 512

    for row in alpaca:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"] and row["output"]
        assert all(isinstance(v, str) for v in row.values())
    assert any(row["input"] == "" for row in alpaca)

    turns = []
    for rec in messages:
        assert set(rec) == {"messages"}
        msgs = rec["messages"]
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(set(m) == {"role", "content"} and m["content"] for m in msgs)
        turns.append(len(roles) // 2)
    assert 1 in turns and 2 in turns
    assert any(rec["messages"][0]["role"] == "system" for rec in messages)

    for rec in text:
        assert set(rec) == {"text"} and rec["text"].strip()

    # The shipped data is exactly what the generator writes.
    assert alpaca == tiny_models.example_rows(512)


def test_write_example_data_matches_shipped(tmp_path):
    tiny_models.write_example_data(tmp_path)
    for name in ("alpaca.jsonl", "messages.jsonl", "text.jsonl", "sharegpt.jsonl", "prompt_completion.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes()


def test_rebuild_is_deterministic(tmp_path, tokenizer):
    out = tiny_models.build_tiny_model_dir(tmp_path / "tiny")
    shipped_cfg = json.loads((MODEL_DIR / "config.json").read_text())
    built_cfg = json.loads((out / "config.json").read_text())
    shipped_cfg.pop("transformers_version", None)
    built_cfg.pop("transformers_version", None)
    assert built_cfg == shipped_cfg

    rebuilt = transformers.AutoTokenizer.from_pretrained(out)
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    assert rebuilt.chat_template == tokenizer.chat_template
    assert rebuilt.all_special_tokens == tokenizer.all_special_tokens

    from safetensors.torch import load_file

    a = load_file(MODEL_DIR / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
