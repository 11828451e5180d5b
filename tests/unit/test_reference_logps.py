"""`dpo.precompute_reference`: the Ray Data scorer's log-probs, checked against each response
scored alone (no padding, no batch) with log-softmax written out here."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from trainers import preference_data as pd
from trainers.spec import parse_spec

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
MODEL = str(REPO / "configs/examples/tiny-llama")


def spec(**dpo) -> dict:
    return {"name": "t", "method": "dpo", "model": {"path": MODEL},
            "data": {"train": [{"path": "x.jsonl", "format": "preference"}]}, "dpo": dpo}


def test_scorer_gives_each_response_its_own_sum_of_label_log_probs():
    from trainers.reference_logps import COLUMN, Scorer

    torch.manual_seed(0)
    scorer = Scorer(parse_spec(spec(precompute_reference=True)).model_dump(mode="json"), use_gpu=False)
    records = [
        {"prompt": [1, 10, 11], "responses": [[20, 21, 22], [30]], "trained": [[True, True, False], [True]],
         "scores": [1.0, 0.0], "margin": None},
        {"prompt": [1, 12], "responses": [[40, 41], [50, 51, 52, 53]], "trained": [[True, True], [True] * 4],
         "scores": [1.0, 0.0], "margin": None},
    ]
    got = pd.from_table(scorer(pd.to_table(records)))
    for r, row in zip(records, got):
        expected = []
        for cont, mask in zip(r["responses"], r["trained"]):
            ids = torch.tensor([r["prompt"] + cont])
            with torch.no_grad():
                logp = torch.log_softmax(scorer.model(input_ids=ids).logits[0].float(), -1)
            start = len(r["prompt"])
            expected.append(sum(float(logp[start + i - 1, t]) for i, (t, m) in enumerate(zip(cont, mask)) if m))
        assert row[COLUMN] == pytest.approx(expected, abs=1e-4)
        assert {k: v for k, v in row.items() if k != COLUMN} == r  # the row itself unchanged


def test_simpo_has_no_reference_to_precompute():
    with pytest.raises(Exception, match="dpo.precompute_reference: simpo has no reference"):
        parse_spec(spec(loss="simpo", precompute_reference=True))
