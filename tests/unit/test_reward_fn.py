"""`ppo.reward_fn`: a user's reward function found beside the spec, imported, its signature
and its return values checked, every problem naming the field."""

from __future__ import annotations

import sys

import pytest

from trainers import reward_fn


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    pkg = tmp_path / "myrules"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rules.py").write_text(
        "def score(prompts, responses):\n"
        "    return [float('blue' in r) for r in responses]\n"
        "def one_arg(responses):\n    return []\n"
        "def bad_len(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # imports below must not leak into other tests
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(("myrules", "broken"))]:
        del sys.modules[name]


def test_a_function_beside_the_spec_is_found_loaded_and_called(spec_dir):
    where = reward_fn.locate("myrules.rules:score", spec_dir)
    assert where.root == str((spec_dir / "myrules").resolve()) and where.module == "myrules.rules"
    fn = reward_fn.load("myrules.rules:score", spec_dir)
    assert reward_fn.scores(fn, ["q", "q"], ["the sky is blue", "green"]) == [1.0, 0.0]


@pytest.mark.parametrize("ref, message", [
    ("myrules.rules", "not an import path; write it as `package.module:function`"),
    ("nowhere.mod:score", "no module `nowhere` next to the spec"),
    ("myrules.rules:missing", "`myrules.rules` has no function `missing`"),
    ("myrules.rules:one_arg", "must take two arguments (prompts, responses)"),
    ("broken:score", "importing `broken` from"),
])
def test_problems_name_the_field_before_anything_starts(spec_dir, ref, message):
    with pytest.raises(ValueError) as e:
        reward_fn.load(ref, spec_dir)
    assert str(e.value).startswith("ppo.reward_fn: ") and message in str(e.value)


@pytest.mark.parametrize("name, message", [("bad_len", "returned 1 scores for 2 responses"),
                                           ("nan", "non-finite score for response 0")])
def test_what_the_function_returns_is_checked(spec_dir, name, message):
    fn = reward_fn.load(f"myrules.rules:{name}", spec_dir)
    with pytest.raises(ValueError, match=message):
        reward_fn.scores(fn, ["q", "q"], ["a", "b"])
