"""Property: every spec file, however malformed, makes `launch validate` exit 0 or 2 with
a message, never a traceback (docs/reliability.md).

Specs are mutated from the shipped examples (configs/examples/*.yaml) three ways: as
dicts (typo'd, unknown, dropped and unicode keys; wrong types; out-of-range numbers), as
YAML text with anchors, aliases and merge keys injected (cycles among them), and as raw
bytes (truncation, byte flips, inserted tabs, colons, brackets, NULs...). Each mutant is
written next to the examples, in a temporary copy of configs/, so that the relative paths
it names (data/..., tiny-llama, ../deepspeed/...) resolve as they do for the original.

Run: `.venv/bin/python -m pytest -q tests/unit/test_spec_fuzz.py -s` (prints the counts).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher import preflight
from launcher.cli import main
from launcher.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (REPO / "configs" / "examples").glob("*.yaml"))
TEXTS = {name: (REPO / "configs" / "examples" / name).read_text(encoding="utf-8") for name in EXAMPLES}
DICTS = {name: yaml.safe_load(text) for name, text in TEXTS.items()}
MUTANT = "_fuzz_mutant.yaml"  # not an example's name: lora.yaml's `defaults` must stay intact

# Reproducible by default (derandomize: the same specs on every run and machine).
# LLMLAUNCH_FUZZ_SCALE=10 runs ten times as many; LLMLAUNCH_FUZZ_RANDOM=1 draws new ones each
# run (with `--hypothesis-seed=N` to repeat one).
SCALE = float(os.environ.get("LLMLAUNCH_FUZZ_SCALE", "1"))
FUZZ = dict(deadline=None, derandomize=not os.environ.get("LLMLAUNCH_FUZZ_RANDOM"), database=None,
            print_blob=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


# exit code -> count, per test; printed at the end of the module (docs/reliability.md)
COUNTS: dict[str, Counter] = {}
DS_CHECKS = Counter()  # real runs of DeepSpeed's own check


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> Path:
    """A copy of configs/examples (with configs/deepspeed beside it, as in the repository)."""
    root = tmp_path_factory.mktemp("configs")
    shutil.copytree(REPO / "configs" / "examples", root / "examples")
    shutil.copytree(REPO / "configs" / "deepspeed", root / "deepspeed")
    return root / "examples"


_DS_RULES: dict[str, SpecError | None] = {}


@pytest.fixture
def fuzz_env(examples_dir, monkeypatch, tmp_path_factory):
    """LLMLAUNCH_HOME in a temporary directory; DeepSpeed's own check of a JSON (a subprocess,
    2-3 s) memoised by the config it is given: the real check runs once per distinct config."""
    monkeypatch.setenv("LLMLAUNCH_HOME", str(tmp_path_factory.getbasetemp() / "llmlaunch-home"))
    monkeypatch.delenv("LLMLAUNCH_CLUSTERS", raising=False)
    real = preflight.check_deepspeed_rules

    def memoised(spec, ds_cfg, source):
        key = json.dumps([type(spec.train.deepspeed).__name__, ds_cfg], sort_keys=True, default=repr)
        if key not in _DS_RULES:
            DS_CHECKS["runs"] += 1
            try:
                real(spec, ds_cfg, source)
            except SpecError as e:
                _DS_RULES[key] = e
                raise
            _DS_RULES[key] = None
        if (cached := _DS_RULES[key]) is not None:
            raise SpecError(source, cached.issues, cached.hint)

    monkeypatch.setattr(preflight, "check_deepspeed_rules", memoised)
    return examples_dir


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if not COUNTS:
        return
    lines = ["spec fuzz: `launch validate` exit codes per test"]
    for test, counts in COUNTS.items():
        lines.append(f"  {test}: {sum(counts.values())} specs, exit 0: {counts[0]}, exit 2: {counts[2]}")
    total = sum(COUNTS.values(), Counter())
    lines.append(f"  total: {sum(total.values())} specs, exit 0: {total[0]}, exit 2: {total[2]}")
    lines.append(f"  DeepSpeed's own check (distinct configs): ran {DS_CHECKS['runs']} times")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines))


def validate(directory: Path, content: bytes | str, capsys, test: str) -> int:
    """Write the mutant next to the examples and run `launch validate` on it in-process."""
    path = directory / MUTANT
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    capsys.readouterr()
    code = 0
    try:
        main(["validate", str(path)])  # returns normally on success
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out, out.err
    assert code in (0, 2), (code, out.err)
    if code == 2:
        assert "error: " in out.err and MUTANT in out.err, out.err  # names the file
    COUNTS.setdefault(test, Counter())[code] += 1
    return code


# --- structured mutations (on the example as a dict) ---------------------------------------


def _paths(node, prefix=()):
    """Every (container path, key) in a nested dict/list."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix, key
        yield from _paths(value, (*prefix, key))


def _at(root, prefix):
    for key in prefix:
        root = root[key]
    return root


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "sft", "pretrain", "text", "messages", "alpaca", "lora",
                                           "s3://b/p", "tiny-llama", "data/messages.jsonl", "data", "..", "/",
                                           "~", "~nobody/x", "../deepspeed/zero2.json", "{}", '{"a": 1}',
                                           "${name}", "${nope}", "${oc.env:HOME}", "???", "null", "1e999"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
OUT_OF_RANGE = st.sampled_from([-1, 0, -0.5, 0.5, 1.5, 7, 10**400, -10**400, 2**63, 1e308, 1e-320,
                                float("inf"), float("-inf"), float("nan"), True, "8"]) | st.integers()


def _typo(draw, word: str) -> str:
    word = str(word)
    i = draw(st.integers(0, max(len(word) - 1, 0)))
    kind = draw(st.sampled_from(["drop", "double", "swap", "case", "char", "suffix"]))
    if kind == "drop":
        return word[:i] + word[i + 1:] or "x"
    if kind == "double":
        return word[:i] + word[i:i + 1] * 2 + word[i + 1:]
    if kind == "swap" and len(word) > 1:
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "case":
        return word.upper() if word != word.upper() else word.lower() + "x"
    if kind == "char":
        return word[:i] + draw(st.characters(codec="utf-8")) + word[i + 1:]
    return word + draw(st.sampled_from(["s", "_", "-", " ", ".x", "[0]"]))


def _mutate_dict(draw, spec: dict) -> str:
    sites = list(_paths(spec))
    kind = draw(st.sampled_from(["typo_key", "wrong_type", "out_of_range", "drop", "unknown_key",
                                 "unicode_value", "unicode_key", "drop_section"]))
    if kind == "drop_section":
        key = draw(st.sampled_from(sorted(spec))) if spec else None
        spec.pop(key, None)
        return kind
    if kind == "unknown_key":
        dicts = [()] + [(*p, k) for p, k in sites if isinstance(_at(spec, (*p, k)), dict)]
        target = _at(spec, draw(st.sampled_from(dicts)))
        target[draw(st.text(min_size=1, max_size=10) | st.sampled_from(["lr", "stage", "paths", "epoch"]))] = \
            draw(VALUES)
        return kind
    if not sites:
        return kind
    prefix, key = draw(st.sampled_from(sites))
    parent = _at(spec, prefix)
    if kind == "out_of_range":
        numeric = [(p, k) for p, k in sites if type(_at(spec, (*p, k))) in (int, float)]
        if numeric:
            prefix, key = draw(st.sampled_from(numeric))
            parent = _at(spec, prefix)
        parent[key] = draw(OUT_OF_RANGE)
    elif kind == "wrong_type":
        parent[key] = draw(VALUES)
    elif kind == "unicode_value":
        parent[key] = draw(st.text(min_size=0, max_size=20))
    elif kind == "drop":
        del parent[key]
    elif isinstance(parent, dict):  # typo_key, unicode_key
        new = _typo(draw, key) if kind == "typo_key" else draw(st.text(min_size=1, max_size=10))
        parent[new] = parent.pop(key)
    return kind


@st.composite
def dict_mutants(draw):
    name = draw(st.sampled_from(EXAMPLES))
    spec = copy.deepcopy(DICTS[name])
    kinds = [_mutate_dict(draw, spec) for _ in range(draw(st.integers(1, 3)))]
    text = yaml.safe_dump(spec, sort_keys=draw(st.booleans()), allow_unicode=draw(st.booleans()),
                          default_flow_style=draw(st.sampled_from([False, None, True])))
    return name, kinds, text


@settings(max_examples=examples(600), **FUZZ)
@given(mutant=dict_mutants())
def test_dict_mutations_exit_0_or_2(mutant, fuzz_env, capsys):
    validate(fuzz_env, mutant[2], capsys, "dict mutations")


# --- anchors, aliases and merge keys injected into the YAML text ---------------------------

KEY_LINE = re.compile(r"^( *)(- )?([A-Za-z_][\w-]*):( .*)?$")


def _inject_alias(draw, text: str) -> tuple[str, str]:
    lines = text.splitlines()
    keyed = [i for i, line in enumerate(lines) if KEY_LINE.match(line)]
    if not keyed:
        return "none", text
    kind = draw(st.sampled_from(["anchor_alias", "alias_in_own_block", "self_list", "self_map", "merge",
                                 "merge_self", "undefined", "duplicate_anchor", "alias_key", "bomb"]))
    i = draw(st.sampled_from(keyed))
    indent, dash, key, value = KEY_LINE.match(lines[i]).groups()
    head = f"{indent}{dash or ''}{key}:"
    if kind == "anchor_alias":  # &a on one value, *a on another (possibly inside the first)
        j = draw(st.sampled_from(keyed))
        lines[i] = f"{head} &a{value or ''}"
        m = KEY_LINE.match(lines[j])
        lines[j] = f"{m.group(1)}{m.group(2) or ''}{m.group(3)}: *a" if j != i else lines[j]
    elif kind == "alias_in_own_block":  # a block that contains an alias of itself: a cycle
        lines[i] = f"{head} &a{value or ''}"
        lines.insert(i + 1, f"{indent}  {'  ' if dash else ''}loop: *a")
    elif kind == "self_list":
        lines[i] = f"{head} &x [*x]"
    elif kind == "self_map":
        lines[i] = f"{head} &m {{{key}: *m}}"
    elif kind == "merge":
        j = draw(st.sampled_from(keyed))
        lines[i] = f"{head} &b{value or ''}"
        m = KEY_LINE.match(lines[j])
        lines.insert(j + 1, f"{m.group(1)}{'  ' if m.group(2) else ''}<<: *b")
    elif kind == "merge_self":
        lines[i] = f"{head} &s{value or ''}"
        lines.insert(i + 1, f"{indent}  <<: *s")
    elif kind == "undefined":
        lines[i] = f"{head} *nowhere"
    elif kind == "duplicate_anchor":
        j = draw(st.sampled_from(keyed))
        lines[i] = f"{head} &d{value or ''}"
        m = KEY_LINE.match(lines[j])
        lines[j] = f"{m.group(1)}{m.group(2) or ''}{m.group(3)}: &d{m.group(4) or ''}"
    elif kind == "alias_key":
        lines[i] = f"{indent}{dash or ''}&k {key}:{value or ''}"
        lines.insert(i + 1, f"{indent}{'  ' if dash else ''}*k : 1")
    else:  # a small "billion laughs": 8 levels of 8 aliases
        bomb = ["l0: &l0 [ha]"] + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 8)}]" for n in range(1, 8)]
        lines[i:i] = [indent + b for b in bomb]
    return kind, "\n".join(lines) + "\n"


@st.composite
def alias_mutants(draw):
    name = draw(st.sampled_from(EXAMPLES))
    text = TEXTS[name]
    if draw(st.booleans()):  # the same in flow-free, comment-free form
        text = yaml.safe_dump(DICTS[name], sort_keys=False)
    kinds = []
    for _ in range(draw(st.integers(1, 2))):
        kind, text = _inject_alias(draw, text)
        kinds.append(kind)
    return name, kinds, text


@settings(max_examples=examples(400), **FUZZ)
@given(mutant=alias_mutants())
def test_alias_and_anchor_injection_exits_0_or_2(mutant, fuzz_env, capsys):
    validate(fuzz_env, mutant[2], capsys, "anchors/aliases injected")


# --- raw text mutations --------------------------------------------------------------------

INSERTS = [b"\t", b":", b": ", b"- ", b"{", b"}", b"[", b"]", b"&a ", b"*a", b"!", b"!!binary ", b"!!set ",
           b"!foo ", b"%", b"@", b"`", b"'", b'"', b"#", b"\n", b"\r", b"\x00", b"\xff", b"\xc3", b"${",
           b"${oc.env:NOPE_X}", b"<<: ", b"---\n", b"? ", b"~", b".inf", b"1e999", b"\xef\xbb\xbf", b"  ",
           b"\\", b"|", b">", b"2001-01-01", b"0x", b"\xed\xa0\x80"]


def _mutate_bytes(draw, data: bytes) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate_line", "swap_lines",
                                 "indent"]))
    pos = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return kind, data[:pos]
    if kind == "flip" and data:
        pos = min(pos, len(data) - 1)
        return kind, data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
    if kind == "insert":
        return kind, data[:pos] + draw(st.sampled_from(INSERTS)) + data[pos:]
    if kind == "delete":
        return kind, data[:pos] + data[pos + draw(st.integers(1, 20)):]
    lines = data.split(b"\n")
    i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
    if kind == "duplicate_line":
        lines.insert(j, lines[i])
    elif kind == "swap_lines":
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines[i] = draw(st.sampled_from([b" ", b"  ", b"\t"])) + lines[i] if draw(st.booleans()) else \
            lines[i].lstrip(b" ")
    return kind, b"\n".join(lines)


@st.composite
def byte_mutants(draw):
    name = draw(st.sampled_from(EXAMPLES))
    data = TEXTS[name].encode("utf-8")
    kinds = []
    for _ in range(draw(st.integers(1, 4))):
        kind, data = _mutate_bytes(draw, data)
        kinds.append(kind)
    return name, kinds, data


@settings(max_examples=examples(600), **FUZZ)
@given(mutant=byte_mutants())
def test_raw_text_mutations_exit_0_or_2(mutant, fuzz_env, capsys):
    validate(fuzz_env, mutant[2], capsys, "raw text mutations")


def test_the_examples_themselves_validate(fuzz_env, capsys):
    for name in EXAMPLES:
        assert validate(fuzz_env, TEXTS[name], capsys, "examples unchanged") == 0, name
