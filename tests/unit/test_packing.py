"""Packing without cross-contamination: a packed example attends only to itself, its
positions restart, and no label predicts another example's token. Checked on the shipped
tiny Llama in float32 against each example run alone, with per-token losses computed here
from the logits (the model's own loss only gives one number per batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainers import data
from trainers.data import IGNORE, model_inputs, pack, tokenize_example
from trainers.spec import DatasetSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "examples" / "tiny-llama"
PAD_ID = 2
ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    # The shipped config says use_cache: true, as most checkpoints do (load_model turns it
    # off; model_inputs must not rely on that).
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32,
                                                          attn_implementation=request.param)
    assert m.config.use_cache
    return m.eval()


@pytest.fixture(scope="module")
def examples(tok) -> list[tuple[list[int], list[int]]]:
    """Text (every token trained) and prompt-completion (prompt masked) examples of
    different lengths, all shorter than MAX_LEN."""
    text = DatasetSpec(path="x.jsonl", format="text")
    pc = DatasetSpec(path="x.jsonl", format="prompt_completion")
    words = ["water", "house", "stone", "river", "cloud"]
    out = [tokenize_example({"text": f"Reverse {w}: {w[::-1]}." * (i + 1)}, text, tok) for i, w in enumerate(words)]
    out += [tokenize_example({"prompt": f"Reverse the word {w}:", "completion": " " + w[::-1]}, pc, tok)
            for w in words[:3]]
    assert [len(ids) for ids, _ in out] == [10, 22, 29, 42, 52, 11, 13, 12]  # GROUPS fit these
    return out


MAX_LEN = 64
GROUPS = [[0, 1, 2], [3, 5], [4, 7], [6]]  # examples that fill rows of MAX_LEN without being split


def packed_rows(examples) -> dict[str, np.ndarray]:
    """Rows of whole examples (2 to 3 a row, padded), each row packed by `pack`; and the
    examples in the order the rows hold them."""
    parts = [pack([examples[i] for i in g], max_len=MAX_LEN, pad_id=PAD_ID, packing=True) for g in GROUPS]
    assert all(len(p["input_ids"]) == 1 for p in parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def in_row_order(examples):
    return [examples[i] for g in GROUPS for i in g]


def token_losses(logits, labels) -> list[tuple[int, float]]:
    """(column, loss) of every label token of one row: the label at column j is predicted
    from the logits at column j - 1, as the model's own loss shifts them."""
    losses = torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:].clamp(min=0), reduction="none")
    return [(j + 1, float(losses[j])) for j in range(len(losses)) if labels[j + 1] != IGNORE]


def alone(model, ids: list[int], labels: list[int]) -> tuple[torch.Tensor, list[float]]:
    """Logits and per-token losses of one example, run on its own (no padding, no mask)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits, [loss for _, loss in token_losses(logits, torch.tensor(labels))]


def run(model, rows: dict[str, np.ndarray], attention: str | None = None):
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    inputs = model_inputs(batch, "cpu", attention)
    with torch.no_grad():
        out = model(**inputs)
    return out, inputs


def per_segment_losses(logits, rows) -> dict[tuple[int, int], list[float]]:
    """{(row, segment): per-token losses} of a packed micro-batch."""
    out: dict[tuple[int, int], list[float]] = {}
    for r in range(len(rows["input_ids"])):
        for j, loss in token_losses(logits[r], torch.from_numpy(rows["labels"][r])):
            out.setdefault((r, int(rows["seq_ids"][r, j])), []).append(loss)
    return out


# ---------------------------------------------------------------- layout (no model)

def test_segments_positions_and_labels_of_a_packed_row_with_a_split_example():
    short, long_, tail = list(range(10, 13)), list(range(100, 112)), [50, 51, 52]
    examples = [(short, list(short)), (long_, list(long_)), (tail, list(tail))]
    out = pack(examples, max_len=8, pad_id=PAD_ID, packing=True)
    # Laid end to end and cut every 8 tokens, as before: the 12-token example runs over
    # into row 1, where its rest is a segment of its own with positions from 0; so does
    # the rest of `tail` in row 2.
    assert out["input_ids"].tolist() == [short + long_[:5], long_[5:] + tail[:1], tail[1:] + [PAD_ID] * 6]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 0],
                                            [0, 1, 2, 3, 4, 5, 6, 7]]  # padding continues the segment
    assert out["seq_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1], [0] * 8]
    assert out["attention_mask"].tolist() == [[1] * 8, [1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]]
    # Every segment's first token is unlabelled (it would be predicted from another example
    # or from nothing): 10, 100, 105 (the long example's rest), 50 and 51 (tail's rest).
    assert out["labels"].tolist() == [[IGNORE, 11, 12, IGNORE, 101, 102, 103, 104],
                                      [IGNORE, 106, 107, 108, 109, 110, 111, IGNORE],
                                      [IGNORE, 52] + [IGNORE] * 6]


def test_the_first_label_of_every_example_after_the_first_is_ignored(examples):
    out = packed_rows(examples)
    starts = out["position_ids"] == 0
    assert (out["labels"][starts] == IGNORE).all()
    # Every other label is the example's own: nothing else was masked.
    kept = np.concatenate([np.array(lab[1:]) for _, lab in examples])
    assert sorted(out["labels"][~starts & (out["attention_mask"] == 1)].tolist()) == sorted(kept.tolist())
    assert (out["seq_ids"].max(axis=1) >= 1).any()  # some row really holds several examples


def test_transformers_reads_the_same_segments_from_the_position_ids(examples):
    """What model_inputs relies on: transformers finds packed sequences where positions do
    not go up by one; padding, continuing the last segment's positions, belongs to it."""
    from transformers.masking_utils import find_packed_sequence_indices

    out = pack(examples, max_len=MAX_LEN, pad_id=PAD_ID, packing=True)
    found = find_packed_sequence_indices(torch.from_numpy(out["position_ids"]))
    assert found is not None and found.tolist() == out["seq_ids"].tolist()


def test_unpacked_rows_are_as_before(examples):
    out = pack(examples, max_len=16, pad_id=PAD_ID, packing=False)
    assert set(out) == {"input_ids", "labels", "attention_mask"}  # no packing columns
    # Each example truncated and padded on its own, every label kept.
    assert out["input_ids"].tolist() == [(ids + [PAD_ID] * 16)[:16] for ids, _ in examples]
    assert out["labels"].tolist() == [(labels + [IGNORE] * 16)[:16] for _, labels in examples]
    inputs = model_inputs({k: torch.from_numpy(v) for k, v in out.items()}, "cpu")
    assert set(inputs) == {"input_ids", "labels", "attention_mask", "use_cache"}
    assert all(torch.equal(inputs[k], torch.from_numpy(out[k])) for k in ("input_ids", "labels", "attention_mask"))


# ---------------------------------------------------------------- on the model

def test_packed_loss_of_every_example_equals_its_loss_alone(model, examples):
    rows = packed_rows(examples)
    assert rows["attention_mask"].min() == 0 and rows["seq_ids"].max() >= 2  # padding, and rows of 3 examples
    out, inputs = run(model, rows)
    assert "attention_mask" not in inputs and inputs["use_cache"] is False
    packed = list(per_segment_losses(out.logits, rows).values())  # one segment per example
    expected = [alone(model, ids, labels)[1] for ids, labels in in_row_order(examples)]
    assert len(packed) == len(expected)
    for got, want in zip(packed, expected):
        assert len(got) == len(want)
        assert sum(got) == pytest.approx(sum(want), abs=ATOL)
        assert np.mean(got) == pytest.approx(np.mean(want), abs=ATOL)
    # The model's own loss (which shifts the labels itself) is the mean over all of them.
    every = [x for losses in expected for x in losses]
    assert float(out.loss) == pytest.approx(np.mean(every), abs=ATOL)


def test_the_second_example_of_a_row_sees_only_itself(model, examples):
    (a, la), (b, lb) = examples[0], examples[5]
    rows = pack([(a, la), (b, lb)], max_len=len(a) + len(b) + 3, pad_id=PAD_ID, packing=True)
    assert len(rows["input_ids"]) == 1
    out, _ = run(model, rows)
    own, _ = alone(model, b, lb)
    torch.testing.assert_close(out.logits[0, len(a):len(a) + len(b)], own, atol=ATOL, rtol=0)
    first, _ = alone(model, a, la)
    torch.testing.assert_close(out.logits[0, :len(a)], first, atol=ATOL, rtol=0)


def test_without_position_ids_or_with_a_cache_the_examples_would_see_each_other(model, examples):
    """Why model_inputs passes position_ids and turns the cache off: either one missing and
    transformers builds a plain causal mask over the whole row."""
    (a, la), (b, lb) = examples[0], examples[5]
    rows = pack([(a, la), (b, lb)], max_len=len(a) + len(b), pad_id=PAD_ID, packing=True)
    ids, pos = torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["position_ids"])
    own, _ = alone(model, b, lb)
    with torch.no_grad():
        for kwargs in ({"position_ids": pos, "use_cache": True}, {"use_cache": False}):
            crossed = model(input_ids=ids, **kwargs).logits[0, len(a):]
            assert (crossed - own).abs().max() > 1e-3


def test_a_split_example_continues_as_an_example_of_its_own(model, tok):
    """The documented choice: the rest of an example cut by a row boundary starts at
    position 0 and sees only itself, exactly as if it were an example on its own."""
    text = DatasetSpec(path="x.jsonl", format="text")
    ids, labels = tokenize_example({"text": "Reverse water: retaw. " * 6}, text, tok)
    head = ([7, 8, 9, 10, 11], [IGNORE, 8, 9, 10, 11])
    max_len = 24
    rows = pack([head, (ids, labels)], max_len=max_len, pad_id=PAD_ID, packing=True)
    cut = max_len - len(head[0])  # tokens of the example in row 0
    rest = ids[cut:cut + max_len]
    assert rows["input_ids"][1, : len(rest)].tolist() == rest and rows["seq_ids"][1, 0] == 0
    out, _ = run(model, rows)
    own, _ = alone(model, rest, labels[cut:cut + max_len])
    torch.testing.assert_close(out.logits[1, : len(rest)], own, atol=ATOL, rtol=0)


def test_flattened_rows_for_flash_attention_keep_every_example_apart(model, examples):
    """With flash attention the rows go as one (its packed path needs a batch of one); the
    same flattening run through sdpa/eager shows it keeps the examples and labels apart."""
    rows = packed_rows(examples)
    out, inputs = run(model, rows, attention="flash_attention_2")
    assert inputs["input_ids"].shape == (1, rows["input_ids"].size)
    flat = {k: v.reshape(1, -1) for k, v in rows.items()}
    flat["seq_ids"] = np.cumsum(flat["position_ids"] == 0, axis=1) - 1  # segments across the flattened rows
    packed = list(per_segment_losses(out.logits, flat).values())
    expected = [alone(model, ids, labels)[1] for ids, labels in in_row_order(examples)]
    assert [sum(x) for x in packed] == pytest.approx([sum(x) for x in expected], abs=ATOL)
    assert float(out.loss) == pytest.approx(np.mean([x for xs in expected for x in xs]), abs=ATOL)


def test_unpacked_loss_is_what_it_was(model, examples):
    rows = pack(examples, max_len=48, pad_id=PAD_ID, packing=False)
    out, inputs = run(model, rows)
    with torch.no_grad():  # the call the training loop made before packed rows existed
        before = model(**{k: torch.from_numpy(v) for k, v in rows.items()}).loss
    assert float(out.loss) == pytest.approx(float(before), abs=1e-6)
    expected = [alone(model, ids[:48], labels[:48])[1] for ids, labels in examples]
    assert float(out.loss) == pytest.approx(np.mean([x for xs in expected for x in xs]), abs=ATOL)


def test_a_lora_model_gets_the_same_inputs(examples):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM", init_lora_weights=False)).eval()
    assert data.attn_implementation(lora) == "sdpa"
    (a, la), (b, lb) = examples[0], examples[5]
    rows = pack([(a, la), (b, lb)], max_len=len(a) + len(b), pad_id=PAD_ID, packing=True)
    out, _ = run(lora, rows)
    own, _ = alone(lora, b, lb)
    torch.testing.assert_close(out.logits[0, len(a):], own, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the worker's loops

class FakeShard:
    """The two ways the workers read a Ray Data shard, over numpy rows."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows

    def _batches(self, batch_size: int, drop_last: bool = False):
        n = len(self.rows["input_ids"])
        for i in range(0, n, batch_size):
            if drop_last and i + batch_size > n:
                return
            yield {k: v[i:i + batch_size] for k, v in self.rows.items()}

    def iter_batches(self, *, batch_size, batch_format, drop_last, prefetch_batches, local_shuffle_buffer_size=None,
                     local_shuffle_seed=None):
        assert batch_format == "numpy" and local_shuffle_buffer_size is None
        yield from self._batches(batch_size, drop_last)

    def iter_torch_batches(self, *, batch_size):
        for b in self._batches(batch_size):
            yield {k: torch.from_numpy(v) for k, v in b.items()}


def test_micro_batches_carry_the_packing_columns(examples):
    rows = pack(examples * 4, max_len=32, pad_id=PAD_ID, packing=True)
    steps = list(data.micro_batches(FakeShard(rows), micro_batch_size=2, grad_accum=2, start_step=0,
                                    total_steps=1, steps_per_epoch=1))
    (_, micro), = steps
    assert set(micro[0]) == set(rows)
    assert micro[1]["position_ids"].tolist() == rows["position_ids"][2:4].tolist()


def test_a_stream_resumes_by_skipping_every_step_since_the_start_pass_by_pass():
    """steps_per_epoch None (data.streaming): 3 steps per pass over the shard; resuming at
    step 4 skips one whole pass and one step of the next, then goes on where it left off."""
    rows = {"input_ids": np.arange(12).reshape(12, 1)}
    shard = FakeShard(rows)
    whole = [(s, m[0]["input_ids"].flatten().tolist()) for s, m in data.micro_batches(
        shard, micro_batch_size=4, grad_accum=1, start_step=0, total_steps=7, steps_per_epoch=None)]
    assert [s for s, _ in whole] == list(range(7))
    assert [b for _, b in whole][3] == [0, 1, 2, 3]  # the second pass starts over
    resumed = [(s, m[0]["input_ids"].flatten().tolist()) for s, m in data.micro_batches(
        shard, micro_batch_size=4, grad_accum=1, start_step=4, total_steps=7, steps_per_epoch=None)]
    assert resumed == whole[4:]


@pytest.mark.parametrize("start", [0, 2, 5])
def test_fetching_several_steps_at_once_gives_the_same_steps(start):
    rows = {"input_ids": np.arange(26).reshape(26, 1), "labels": np.arange(26).reshape(26, 1) + 100}
    def steps(per_fetch):
        return [(s, [{k: v.tolist() for k, v in m.items()} for m in micro]) for s, micro in data.micro_batches(
            FakeShard(rows), micro_batch_size=2, grad_accum=2, start_step=start, total_steps=9, steps_per_epoch=6,
            steps_per_fetch=per_fetch)]
    assert steps(4) == steps(1) and [s for s, _ in steps(4)] == list(range(start, 9))
    assert data.fetch_steps(rows_per_step=16, max_seq_len=2048, steps_per_epoch=10_000) == 204
    assert data.fetch_steps(rows_per_step=16, max_seq_len=128, steps_per_epoch=30) == 30
    assert data.fetch_steps(rows_per_step=16, max_seq_len=128, steps_per_epoch=None) == 1


class FakeEngine:
    """What evaluate() uses of a DeepSpeed engine."""

    def __init__(self, model):
        self.module, self.device = model, torch.device("cpu")

    def eval(self):
        self.module.eval()

    def __call__(self, **kwargs):
        return self.module(**kwargs)


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("packing", [True, False])
def test_eval_loss_is_the_token_mean_of_every_example_alone(model, examples, one_rank_group, packing):
    from trainers.eval import evaluate

    rows = packed_rows(examples) if packing else pack(examples, max_len=48, pad_id=PAD_ID, packing=False)
    loss = evaluate(FakeEngine(model), FakeShard(rows), micro_batch_size=3)  # the last batch is short
    cut = MAX_LEN if packing else 48  # unpacked rows truncate the longest example
    expected = [alone(model, ids[:cut], labels[:cut])[1] for ids, labels in examples]
    assert loss == pytest.approx(np.mean([x for xs in expected for x in xs]), abs=ATOL)
