"""Rollouts: left padding, the response mask at the first EOS, sampling with transformers
`generate` on the shipped tiny Llama, and per-token log-probs that equal each sample scored
alone (no padding) with log-softmax written out here."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import REPO  # noqa: E402
from trainers import generation as gen  # noqa: E402

MODEL = REPO / "configs/examples/tiny-llama"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def test_left_pad_right_aligns_prompts():
    ids, mask = gen.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_response_mask_keeps_up_to_the_first_eos():
    r = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 3, 3]])
    assert gen.response_mask(r, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert gen.response_mask(r, [2, 8]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert gen.response_mask(torch.tensor([[5, 8, 6]]), [2, 8]).tolist() == [[1, 1, 0]]


def test_generate_lays_out_samples_by_prompt(model):
    cfg = model.config
    eos, pad = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0], 0
    prompts = [[1, 20, 21, 22], [1, 30]]
    torch.manual_seed(1)
    ro = gen.hf_generate(model, prompts, samples_per_prompt=3, max_new_tokens=6, pad_id=pad, eos_id=eos)
    assert ro.sequences.shape[0] == 6 and ro.prompt_width == 4 and ro.responses.shape[1] <= 6
    assert ro.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert ro.sequences[:3, :4].tolist() == [[1, 20, 21, 22]] * 3
    assert ro.sequences[3:, :4].tolist() == [[pad, pad, 1, 30]] * 3
    assert ro.attention_mask[3:, :4].tolist() == [[0, 0, 1, 1]] * 3
    assert (ro.responses[ro.response_mask == 0] == pad).all()
    assert len({tuple(r) for r in ro.responses.tolist()}) > 1  # sampled, not greedy


def test_response_logps_equal_each_sample_scored_alone(model):
    torch.manual_seed(2)
    prompts = [[1, 20, 21, 22, 23], [1, 30]]  # different lengths: the second is left-padded
    ro = gen.hf_generate(model, prompts, samples_per_prompt=2, max_new_tokens=5, pad_id=0, eos_id=2)
    with torch.no_grad():
        logp, logits = gen.response_logps(model, ro, temperature=0.7)
    assert logits.shape[:2] == ro.responses.shape
    for i in range(len(ro.group)):
        n = int(ro.response_mask[i].sum())
        alone = prompts[int(ro.group[i])] + ro.responses[i, :n].tolist()
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([alone])).logits[0].float() / 0.7, -1)
        start = len(alone) - n
        expected = [float(lp[start + j - 1, alone[start + j]]) for j in range(n)]
        assert logp[i, :n].tolist() == pytest.approx(expected, abs=1e-4)
        assert (logp[i, n:] == 0).all()
