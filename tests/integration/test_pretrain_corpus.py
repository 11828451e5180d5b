"""Continued pre-training on raw text corpora through the real path (Ray Data, Ray Train,
DeepSpeed): a directory of .txt files with a replay share of a general corpus, and the same
corpus streamed while it trains, including a resume into the middle of the stream."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO, output
from tests.integration.test_training import assert_ok, run_dir, train_metrics
from trainers import checkpoint, storage

pytestmark = pytest.mark.integration


def test_txt_corpus_with_replay_trains_and_evaluates_on_held_out_text(launch, tmp_path):
    proc = launch("configs/examples/pretrain_corpus.yaml", f"checkpoint.storage={tmp_path / 'runs'}",
                  "train.max_steps=10", "train.eval_every=5")
    assert_ok(proc)
    log = output(proc)
    mix = re.search(r"mixture \(replay\): train (\d+) sequences \(80\.0%.*replay (\d+) sequences \(20\.0%; "
                    r"[\d.]+ passes over its (\d+)\)", log)
    assert mix, log[-3000:]
    domain, replayed = int(mix.group(1)), int(mix.group(2))
    assert replayed == round(0.25 * domain)  # 20% of the mix: 0.2 / 0.8 of the domain's sequences
    assert re.search(rf"data: {domain + replayed} train sequences of 128 tokens, \d+ eval", log)
    run = run_dir(proc)
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    evals = [m["eval_loss"] for m in rows if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]


def big_corpus(directory, files: int, mb_per_file: float) -> int:
    """`files` .txt files of the shipped corpus's documents repeated to about `mb_per_file` MB each."""
    directory.mkdir()
    text = "".join(p.read_text() + "\n" for p in sorted((REPO / "configs/examples/data/corpus").glob("*.txt")))
    copies = max(1, int(mb_per_file * 2**20 / len(text.encode())))
    for i in range(files):
        (directory / f"part-{i:03d}.txt").write_text(text * copies)
    return sum(p.stat().st_size for p in directory.iterdir())


def test_streamed_corpus_trains_and_resumes_mid_stream(launch, tmp_path):
    """The corpus is larger than the memory the stream may hold (data.stream_memory_mb; its
    packed rows are ~10x its text): the run trains from it without ever preparing it whole,
    then resumes mid-stream. Workers that leave no CPU to the stream's tasks are refused."""
    storage_dir = tmp_path / "runs"
    size = big_corpus(tmp_path / "corpus", files=48, mb_per_file=0.25)
    assert size > 8 * 2**20
    options = [f"data.train[0].path={tmp_path / 'corpus'}", "data.stream_memory_mb=8",
               f"checkpoint.storage={storage_dir}", "checkpoint.every_n_steps=3", "train.eval_every=3"]
    first = launch("configs/examples/pretrain_stream.yaml", *options, "train.max_steps=6")
    assert_ok(first)
    assert "data: streaming the training data (read, tokenized and packed as it trains" in output(first)
    run = run_dir(first)
    assert len(train_metrics(run)) == 6
    ckpt = checkpoint.complete_checkpoints(run)[-1]
    assert ckpt.endswith(checkpoint.step_dir_name(6))

    second = launch("configs/examples/pretrain_stream.yaml", *options, "train.max_steps=9", f"checkpoint.resume={ckpt}")
    assert_ok(second)
    assert "starting at step 6/9" in output(second)
    steps = [m["step"] for m in train_metrics(run_dir(second))]
    assert steps == list(range(1, 10))
    assert storage.exists(storage.join(run_dir(second), "model", "config.json"))

    starved = launch("configs/examples/pretrain_stream.yaml", *options, "resources.cpus_per_worker=1",
                     "name=pretrain-starved")
    assert starved.returncode == 2, output(starved)[-3000:]
    assert "error: data.streaming: the workers reserve 2 of the cluster's 2 CPUs" in starved.stderr
