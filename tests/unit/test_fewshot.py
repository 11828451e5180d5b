"""Few-shot evaluation (trainers.fewshot) on the shipped tiny model: prompts written out by
hand, choice log-likelihoods against a direct forward pass, a learnable task whose accuracy
rises with training, the split over ranks, and the errors a bad file gets.

Expected prompts and log-likelihoods are computed here from the text and one forward pass
of the model, never with the code under test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests` is not a package root under plain `pytest`
    sys.path.insert(0, str(REPO))

from trainers import fewshot  # noqa: E402
from trainers.spec import FewshotSpec  # noqa: E402
from trainers.user_errors import JobUserError  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL_DIR = REPO / "configs" / "examples" / "tiny-llama"
# A learnable task: a fixed mapping. The pool teaches it; the held-out rows ask it in another order.
COLOURS = {"red": "apple", "yellow": "banana", "green": "lime", "purple": "grape"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's ops are too small to share between threads: on a busy 2-core machine
    # two threads run many times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def colour_rows(order) -> list[dict]:
    return [{"question": q, "answer": COLOURS[q]} for q in order]


# ---------------------------------------------------------------- prompts

def test_prompt_with_two_shots_is_written_exactly():
    spec = FewshotSpec(path="x.jsonl", k=2)
    shots = [{"question": "2 + 2", "answer": 4}, {"question": "1 + 2", "answer": "3"}]
    prompt = fewshot.build_prompt({"question": "3 + 4", "answer": 7}, shots, spec)
    assert prompt == "Question: 2 + 2\nAnswer: 4\n\nQuestion: 1 + 2\nAnswer: 3\n\nQuestion: 3 + 4\nAnswer:"


def test_prompt_template_fields_separator_and_trailing_space():
    # Other fields of the row fill the template; a template ending in a space gets no second one.
    spec = FewshotSpec(path="x.jsonl", k=1, template="Q ({topic}): {question}\nA: ", separator="\n###\n",
                       question_field="q", answer_field="a")
    row = {"q": "capital of France", "a": "Paris", "topic": "geo"}
    shot = {"q": "capital of Italy", "a": "Rome", "topic": "geo"}
    assert fewshot.build_prompt(row, [shot], spec) == (
        "Q (geo): capital of Italy\nA: Rome\n###\nQ (geo): capital of France\nA: ")
    assert fewshot.build_prompt(row, [], spec) == "Q (geo): capital of France\nA: "


def test_choice_shots_are_answered_with_the_choice_text():
    spec = FewshotSpec(path="x.jsonl", k=2, mode="choice")
    shots = [{"question": "sky?", "choices": ["green", "blue"], "answer": 1},
             {"question": "grass?", "choices": ["green", "blue"], "answer": "green"}]
    prompt = fewshot.build_prompt({"question": "sea?", "choices": ["blue", "red"], "answer": 0}, shots, spec)
    assert prompt == "Question: sky?\nAnswer: blue\n\nQuestion: grass?\nAnswer: green\n\nQuestion: sea?\nAnswer:"


def test_shots_never_include_the_scored_row_and_are_deterministic():
    pool = [{"question": f"q{i}", "answer": str(i)} for i in range(6)]
    drawn = [fewshot.pick_shots(pool, 5, seed=0, index=i, exclude=i) for i in range(6)]
    for i, shots in enumerate(drawn):
        assert pool[i] not in shots and len(shots) == 5 and len({s["question"] for s in shots}) == 5
    assert drawn == [fewshot.pick_shots(pool, 5, seed=0, index=i, exclude=i) for i in range(6)]
    # Each row draws its own shots (in their order too), and the seed changes them.
    assert len({tuple(s["question"] for s in fewshot.pick_shots(pool, 3, 0, i)) for i in range(6)}) > 1
    assert [fewshot.pick_shots(pool, 3, 1, i) for i in range(6)] != [fewshot.pick_shots(pool, 3, 0, i)
                                                                     for i in range(6)]
    assert fewshot.pick_shots(pool, 0, 0, 3, exclude=3) == []


# ---------------------------------------------------------------- multiple choice

def direct_loglikelihood(model, tok, prompt: str, choice: str, *, normalize: bool = False) -> float:
    """log p(choice tokens | prompt) from one forward pass of prompt + " " + choice alone."""
    prompt_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + " " + choice)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # these texts merge no token across the boundary
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    terms = [float(logprobs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))]
    return sum(terms) / len(terms) if normalize else sum(terms)


def test_choice_loglikelihoods_match_a_direct_forward_pass(model, tok):
    # Two prompts of different lengths in one left-padded batch; choices of 1 and several tokens.
    prompts = ["Question: what colour is the sky?\nAnswer:", "Question: 2 + 3?\nAnswer:"]
    choices = [["blue", "a deep shade of red"], ["5", "six"]]
    for normalize in (False, True):
        got = fewshot.choice_loglikelihoods(model, tok, prompts, choices, normalize=normalize, batch_size=2)
        want = [[direct_loglikelihood(model, tok, p, c, normalize=normalize) for c in cs]
                for p, cs in zip(prompts, choices)]
        assert [len(g) for g in got] == [2, 2]
        assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-4)
        # score_choice picks the argmax: right when the answer is it, wrong otherwise.
        best = [max(range(2), key=w.__getitem__) for w in want]
        assert fewshot.score_choice(model, tok, prompts, choices, best, normalize, batch_size=1) == [True, True]
        assert fewshot.score_choice(model, tok, prompts, choices, [1 - b for b in best], normalize, 2) == [False, False]


def test_choice_boundary_when_the_prompt_token_merges_with_the_choice(model, tok):
    # A template ending in a space: alone, the prompt ends with the token "Ġ"; followed by
    # the choice that space is part of "Ġred". The merged token is the choice's first.
    prompt = "Answer: "
    assert tok.convert_ids_to_tokens(tok(prompt)["input_ids"])[-1] == "Ġ"
    ids, begin = fewshot.choice_tokens(tok, prompt, "red")
    assert tok.convert_ids_to_tokens(ids) == ["<|begin_of_text|>", "Answer", ":", "Ġred"]
    assert begin == 3 < len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids[:3]])).logits[0, -1].double(), -1)
    [[got]] = fewshot.choice_loglikelihoods(model, tok, [prompt], [["red"]], normalize=False, batch_size=1)
    assert got == pytest.approx(float(logprobs[ids[3]]), abs=1e-4)
    # Without the trailing space the same choice text is the same tokens after the same boundary.
    assert fewshot.choice_tokens(tok, "Answer:", "red") == (ids, 3)


def test_evaluate_splits_rows_over_ranks_with_equal_forward_passes(model, tok, tmp_path):
    rows = [{"question": f"is {w} a colour?", "choices": ["yes", "no", "maybe"], "answer": i % 3}
            for i, w in enumerate(["red", "cat", "blue", "dog", "green"])]
    spec = FewshotSpec(path=write_jsonl(tmp_path / "mc.jsonl", rows), k=2, mode="choice", batch_size=1)
    whole = fewshot.evaluate(model, tok, spec, rank=0, world_size=1)
    assert whole["fewshot_total"] == 5 and whole["fewshot_accuracy"] == whole["fewshot_correct"] / 5

    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        parts = []
        for rank in range(3):  # 5 rows: 2, 2 and 1 (padded to 2) per rank
            forwards.clear()
            parts.append(fewshot.evaluate(model, tok, spec, rank=rank, world_size=3))
            assert len(forwards) == 2  # ZeRO-3: every rank runs as many forward passes
    finally:
        hook.remove()
    assert [p["fewshot_total"] for p in parts] == [2, 2, 1]
    assert sum(p["fewshot_correct"] for p in parts) == whole["fewshot_correct"]  # shots do not depend on the rank


RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist, transformers
repo, model_dir, store, rank, world, specs = sys.argv[1:7]
sys.path.insert(0, repo)
from trainers import fewshot
from trainers.spec import FewshotSpec
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + store, rank=int(rank), world_size=int(world))
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
forwards = []
model.register_forward_hook(lambda *_: forwards.append(1))
out = []
for spec in json.loads(specs):
    forwards.clear()
    result = fewshot.evaluate(model, tok, FewshotSpec(**spec), rank=int(rank), world_size=int(world))
    out.append({**result, "forwards": len(forwards)})
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
"""


def test_two_ranks_sum_their_counts_and_run_equal_forward_passes(model, tok, tmp_path):
    # Two real processes in a gloo group. 5 rows: rank 0 scores 3, rank 1 scores 2 and a
    # repeat. Generation is synced over the ranks (every generate step is a collective), so
    # unequal shares would hang here: the timeout fails the test instead.
    import os
    import subprocess

    held = write_jsonl(tmp_path / "held.jsonl", [{"question": f"say {w}", "answer": w, "choices": [w, "no"]}
                                                 for w in ("red", "blue", "green", "cat", "dog")])
    specs = [{"path": held, "k": 1, "max_new_tokens": 8, "batch_size": 2},
             {"path": held, "k": 1, "mode": "choice", "template": "{question}? ", "batch_size": 2}]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(REPO), str(MODEL_DIR), str(store), str(rank), "2",
                               json.dumps(specs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(2)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=180)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.split("RESULT ", 1)[1]))
    finally:
        for p in procs:
            p.kill()
    alone = [fewshot.evaluate(model, tok, FewshotSpec(**spec), rank=0, world_size=1) for spec in specs]
    for mode in range(2):
        first, second = outs[0][mode], outs[1][mode]
        assert first.pop("forwards") == second.pop("forwards")
        assert first == second == alone[mode]


# ---------------------------------------------------------------- generation, learned

def train_on_shots(model, tok, pool: list[dict], spec: FewshotSpec, steps: int) -> None:
    """Plain AdamW on k-shot prompts from the pool (fresh shots each step), the loss on the
    answer and EOS only."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        seqs, starts = [], []
        for i, row in enumerate(pool):
            prompt = fewshot.build_prompt(row, fewshot.pick_shots(pool, spec.k, 1000 + step, i, exclude=i), spec)
            prompt_ids = tok(prompt)["input_ids"]
            ids = tok(prompt + " " + row["answer"])["input_ids"] + [tok.eos_token_id]
            assert ids[: len(prompt_ids)] == prompt_ids
            seqs.append(ids)
            starts.append(len(prompt_ids))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = torch.tensor([[-100] * b + s[b:] + [-100] * (width - len(s)) for s, b in zip(seqs, starts)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_generation_accuracy_rises_with_training_on_a_learnable_task(model, tok, tmp_path):
    torch.manual_seed(0)
    pool = colour_rows(list(COLOURS) * 2)
    held = colour_rows(list(reversed(COLOURS)) * 2)
    spec = FewshotSpec(path=write_jsonl(tmp_path / "held.jsonl", held), pool=write_jsonl(tmp_path / "pool.jsonl", pool),
                       k=2, max_new_tokens=6)
    before = fewshot.evaluate(model, tok, spec, rank=0, world_size=1)
    assert before == fewshot.evaluate(model, tok, spec, rank=0, world_size=1)  # deterministic
    assert before == {"fewshot_accuracy": 0.0, "fewshot_correct": 0, "fewshot_total": 8}  # random weights

    train_on_shots(model, tok, pool, spec, steps=150)
    after = fewshot.evaluate(model, tok, spec, rank=0, world_size=1)
    assert after["fewshot_accuracy"] > before["fewshot_accuracy"]
    assert after["fewshot_accuracy"] >= 0.75, after
    # Left padding: a batch answers as its prompts do one by one.
    one_by_one = spec.model_copy(update={"batch_size": 1})
    assert fewshot.evaluate(model, tok, one_by_one, rank=0, world_size=1) == after
    assert fewshot.compare(before, after) == {
        "fewshot_accuracy_before": 0.0, "fewshot_accuracy_after": after["fewshot_accuracy"],
        "fewshot_accuracy_gain": after["fewshot_accuracy"], "fewshot_total": 8}


def test_evaluate_restores_train_mode(model, tok, tmp_path):
    spec = FewshotSpec(path=write_jsonl(tmp_path / "held.jsonl", colour_rows(COLOURS)), k=1, max_new_tokens=2)
    model.train()
    fewshot.evaluate(model, tok, spec, rank=0, world_size=1)
    assert model.training
    model.eval()
    fewshot.evaluate(model, tok, spec, rank=0, world_size=1)
    assert not model.training


def test_first_line_is_the_answer():
    assert fewshot.first_line(" apple\n\nQuestion: red") == "apple"
    assert fewshot.first_line("\n  42  \nmore") == "42"
    assert fewshot.first_line("") == ""


# ---------------------------------------------------------------- files and errors

def test_rows_read_from_jsonl_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = colour_rows(COLOURS)
    spec = FewshotSpec(path="x.jsonl")
    write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("rows.jsonl", "rows.json", "rows.parquet"):
        assert fewshot.read_rows(str(tmp_path / name), spec) == rows


def test_a_row_without_its_answer_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": "d"}\n'
                    '{"question": "e", "ans": "f"}\n')
    with pytest.raises(JobUserError) as e:
        fewshot.read_rows(str(path), FewshotSpec(path=str(path)))
    assert e.value.message == (f"eval.fewshot.path: {path} line 4: no field `answer`; the row has `question`, `ans` "
                               "(name the field with `answer_field`)")
    assert e.value.hint


@pytest.mark.parametrize("line, spec_fields, problem", [
    ('not json', {}, "line 2: not valid JSON"),
    ('{"question": 3, "answer": "x"}', {}, "line 2: field `question` must be a string, got a number"),
    ('{"question": "q", "answer": "x"}', {"template": "{topic}: {question}"},
     "line 2: the template names `{topic}`, which the row lacks"),
    ('{"question": "q", "answer": "x"}', {"mode": "choice"}, "line 2: no field `choices`"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', {"mode": "choice"},
     "line 2: field `answer` must be the index of a choice (0 to 1) or its text, got 2"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', {"mode": "choice"},
     "line 2: field `answer` ('c') is none of the `choices`"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', {"mode": "choice"},
     "line 2: field `choices` must be a list of at least two non-empty strings"),
])
def test_bad_rows_are_user_errors(tmp_path, line, spec_fields, problem):
    good = {"question": "q", "choices": ["a", "b"], "answer": "a", "topic": "t"}
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    spec = FewshotSpec(path="held.jsonl", pool=str(path), **spec_fields)
    with pytest.raises(JobUserError) as e:
        fewshot.read_rows(str(path), spec, "pool")
    assert e.value.message.startswith(f"eval.fewshot.pool: {path} {problem}"), e.value.message


def test_missing_or_empty_files_and_too_few_shots(tmp_path):
    with pytest.raises(JobUserError, match=r"eval\.fewshot\.path: .*nope\.jsonl.*does not exist"):
        fewshot.read_rows(str(tmp_path / "nope.jsonl"), FewshotSpec(path="x.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(JobUserError, match="has no rows"):
        fewshot.read_rows(str(tmp_path / "empty.jsonl"), FewshotSpec(path="x.jsonl"))
    held = write_jsonl(tmp_path / "held.jsonl", colour_rows(COLOURS))  # 4 rows: 3 to draw from for each
    assert len(fewshot.load(FewshotSpec(path=held, k=3, max_rows=2))[0]) == 2
    with pytest.raises(JobUserError, match=r"eval\.fewshot\.k is 4, but eval\.fewshot\.path \(less the row scored\) "
                                           r"has 3 rows"):
        fewshot.load(FewshotSpec(path=held, k=4))


# ---------------------------------------------------------------- the spec

def test_spec_defaults_and_validation():
    spec = FewshotSpec(path="s3://bucket/held.jsonl")
    assert (spec.pool, spec.k, spec.mode, spec.normalize, spec.template, spec.separator, spec.max_new_tokens,
            spec.max_rows, spec.seed) == (None, 3, "generate", False, "Question: {question}\nAnswer:", "\n\n", 16,
                                          None, 0)
    assert FewshotSpec(path="p", k=0).k == 0
    for bad, where in [({"k": -1}, "k"), ({"mode": "loglik"}, "mode"), ({"path": ""}, "path"),
                       ({"template": "Answer:"}, "template"), ({"template": "{} {question}"}, "template"),
                       ({"template": "{question"}, "template"), ({"max_new_tokens": 0}, "max_new_tokens"),
                       ({"max_rows": 0}, "max_rows"), ({"shots": 2}, "shots")]:
        with pytest.raises(ValidationError) as e:
            FewshotSpec(**{"path": "p", **bad})
        assert e.value.errors()[0]["loc"] == (where,), bad
    assert "held-out" in FewshotSpec.model_json_schema()["properties"]["path"]["description"].lower()
