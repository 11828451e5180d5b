"""launcher.config: YAML -> defaults -> overrides -> interpolation -> paths -> validation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from launcher import config
from launcher.config import issues_from_validation_error, load_spec, load_yaml_mapping
from launcher.errors import SpecError
from trainers.spec import METHODS, PretrainRun, SftRun, ZeroSpec, parse_spec

VALID = """
name: demo
method: sft
model:
  path: meta-llama/Llama-3.1-8B
data:
  train:
    - path: s3://bucket/train.jsonl
      format: messages
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def spec_error(path: Path, overrides: list[str] = ()) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value


def by_path(err: SpecError) -> dict:
    return {issue.path: issue for issue in err.issues}


def test_valid_spec_loads(tmp_path):
    run = load_spec(write(tmp_path, "run.yaml", VALID))
    assert isinstance(run, SftRun)
    assert run.name == "demo"
    assert run.data.train[0].format == "messages"
    assert run.defaults == []


def test_pretrain_method_selects_pretrain_model(tmp_path):
    run = load_spec(write(tmp_path, "run.yaml", VALID.replace("method: sft", "method: pretrain")
                          .replace("format: messages", "format: text")))
    assert isinstance(run, PretrainRun)


def test_defaults_are_merged_under_the_spec(tmp_path):
    write(tmp_path, "base/common.yaml", """
        train: {lr: 3.0e-4, epochs: 3}
        resources: {workers: 4}
    """)
    path = write(tmp_path, "run.yaml", VALID + "defaults: [base/common.yaml]\ntrain: {lr: 1.0e-5}\n")
    run = load_spec(path)
    assert run.train.lr == 1e-5  # the spec wins
    assert run.train.epochs == 3  # the default fills in, merged per key
    assert run.resources.workers == 4
    assert run.defaults == []


def test_nested_defaults_resolve_relative_to_their_own_file(tmp_path):
    write(tmp_path, "base/root.yaml", "train: {seed: 7, epochs: 5}\n")
    write(tmp_path, "base/mid.yaml", "defaults: [root.yaml]\ntrain: {epochs: 2}\n")
    run = load_spec(write(tmp_path, "run.yaml", VALID + "defaults: [base/mid.yaml]\n"))
    assert (run.train.seed, run.train.epochs) == (7, 2)


def test_paths_in_a_defaults_file_are_relative_to_that_file(tmp_path):
    """A spec elsewhere built on a shipped example: the example's model and data (relative
    to configs/examples/) are found there, not next to the spec that names it."""
    examples = Path(__file__).resolve().parents[2] / "configs" / "examples"
    run = load_spec(write(tmp_path, "mine/run.yaml", f"defaults: [{examples / 'lora.yaml'}]\nname: mine\n"))
    assert run.model.path == str(examples / "tiny-llama")
    assert run.data.train[0].path == str(examples / "data" / "messages.jsonl")
    # ...and the spec's own relative paths stay relative to it
    write(tmp_path, "mine/local.jsonl", '{"messages": []}\n')
    run = load_spec(write(tmp_path, "mine/run2.yaml", f"defaults: [{examples / 'lora.yaml'}]\nname: mine\n"
                          "data: {train: [{path: local.jsonl, format: messages}]}\n"))
    assert run.data.train[0].path == str(tmp_path / "mine" / "local.jsonl")


def test_defaults_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    err = spec_error(write(tmp_path, "run.yaml", VALID + "defaults: [a.yaml]\n"))
    assert [i.path for i in err.issues] == ["defaults"]
    assert "cycle" in err.issues[0].message
    assert "a.yaml -> " in err.issues[0].message


def test_missing_defaults_file_is_named(tmp_path):
    err = spec_error(write(tmp_path, "run.yaml", VALID + "defaults: [nope.yaml]\n"))
    assert err.source.endswith("nope.yaml")
    assert "not found" in err.issues[0].message


def test_overrides_win_and_are_typed(tmp_path):
    path = write(tmp_path, "run.yaml", VALID + "train: {lr: 3.0e-4}\n")
    run = load_spec(path, ["train.lr=1e-4", "resources.workers=8", "data.train[0].format=text"])
    assert run.train.lr == 1e-4
    assert run.resources.workers == 8
    assert run.data.train[0].format == "text"


def test_overrides_are_typed_before_validation(tmp_path, monkeypatch):
    # pydantic would coerce "1e-4" too: look at the dict it is given
    seen = {}
    monkeypatch.setattr(config, "parse_spec", lambda data: seen.update(data) or parse_spec(data))
    load_spec(write(tmp_path, "run.yaml", VALID), ["train.lr=1e-4", "resources.workers=8"])
    assert seen["train"]["lr"] == 1e-4 and isinstance(seen["train"]["lr"], float)
    assert seen["resources"]["workers"] == 8 and isinstance(seen["resources"]["workers"], int)
    assert "defaults" not in seen


def test_malformed_override_names_the_override(tmp_path):
    err = spec_error(write(tmp_path, "run.yaml", VALID), ["train.lr", "resources.workers=2", "=3"])
    assert [i.path for i in err.issues] == ["train.lr", "=3"]


def test_interpolation_is_resolved(tmp_path):
    path = write(tmp_path, "run.yaml", VALID + """
        env:
          RUN_NAME: ${name}
          FIRST: ${data.train[0].path}
        checkpoint: {storage: "s3://runs/${name}"}
    """.replace("\n        ", "\n"))
    run = load_spec(path)
    assert run.env == {"RUN_NAME": "demo", "FIRST": "s3://bucket/train.jsonl"}
    assert run.checkpoint.storage == "s3://runs/demo"


def test_interpolation_error_has_its_path(tmp_path):
    err = spec_error(write(tmp_path, "run.yaml", VALID + "env: {X: '${nope.key}'}\n"))
    assert [i.path for i in err.issues] == ["env.X"]
    assert "nope" in err.issues[0].message


def test_relative_paths_resolve_against_the_spec_directory(tmp_path, monkeypatch):
    spec_dir = tmp_path / "specs"
    (spec_dir / "data").mkdir(parents=True)
    (spec_dir / "data" / "train.jsonl").write_text("{}\n")
    (spec_dir / "data" / "eval.jsonl").write_text("{}\n")
    (spec_dir / "ds.json").write_text("{}")
    path = write(spec_dir, "run.yaml", """
        name: demo
        method: sft
        model: {path: meta-llama/Llama-3.1-8B}
        data:
          train: [{path: data/train.jsonl}, {path: org/hub-dataset}]
          eval: [{path: data/eval.jsonl}]
        train: {deepspeed: ds.json}
        checkpoint: {storage: out/runs}
    """)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = load_spec(path)
    assert run.data.train[0].path == str(spec_dir / "data" / "train.jsonl")
    assert run.data.train[1].path == "org/hub-dataset"  # does not exist locally: a hub id
    assert run.data.eval[0].path == str(spec_dir / "data" / "eval.jsonl")
    assert run.model.path == "meta-llama/Llama-3.1-8B"
    assert run.train.deepspeed == str(spec_dir / "ds.json")
    assert run.checkpoint.storage == str(cwd / "out" / "runs")


def test_storage_expands_user_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = load_spec(write(tmp_path, "run.yaml", VALID + "checkpoint: {storage: ~/runs}\n"))
    assert run.checkpoint.storage == str(tmp_path / "home" / "runs")
    run = load_spec(write(tmp_path, "run.yaml", VALID + "checkpoint: {storage: s3://b/p}\n"))
    assert run.checkpoint.storage == "s3://b/p"


def test_deepspeed_shorthand_is_not_treated_as_a_path(tmp_path):
    run = load_spec(write(tmp_path, "run.yaml", VALID + "train: {deepspeed: {stage: 3}}\n"))
    assert run.train.deepspeed == ZeroSpec(stage=3)


def test_three_mistakes_give_three_issues_at_once(tmp_path):
    path = write(tmp_path, "run.yaml", """
        name: Bad_Name
        method: sft
        model: {path: m, dtyp: bfloat16}
        data:
          train: [{path: a.jsonl}]
        train: {micro_batchsize: 4}
    """)
    err = spec_error(path)
    assert err.source == str(path)
    issues = by_path(err)
    assert set(issues) == {"name", "model.dtyp", "train.micro_batchsize"}
    assert len(err.issues) == 3
    assert issues["model.dtyp"].suggestion == "dtype"
    assert issues["model.dtyp"].value is None
    assert issues["train.micro_batchsize"].suggestion == "micro_batch_size"
    assert issues["name"].value == "Bad_Name"
    assert not issues["name"].message.startswith("Value error")
    assert "did you mean `dtype`?" in err.message


def test_list_index_paths(tmp_path):
    path = write(tmp_path, "run.yaml", VALID.replace("format: messages", "format: chatml"))
    err = spec_error(path)
    assert [i.path for i in err.issues] == ["data.train[0].format"]
    assert err.issues[0].value == "chatml"


def test_union_member_errors_are_not_duplicated(tmp_path):
    err = spec_error(write(tmp_path, "run.yaml", VALID + "train: {deepspeed: {stag: 3}}\n"))
    assert [(i.path, i.suggestion) for i in err.issues] == [("train.deepspeed.stag", "stage")]
    err = spec_error(write(tmp_path, "run.yaml", VALID + "train: {deepspeed: 5}\n"))
    assert [i.path for i in err.issues] == ["train.deepspeed"]
    assert "mapping" in err.issues[0].message and "string" in err.issues[0].message


@pytest.mark.parametrize("line, value", [("", None), ("method: sfft\n", "sfft")])
def test_missing_or_unknown_method_lists_valid_ones(tmp_path, line, value):
    err = spec_error(write(tmp_path, "run.yaml", VALID.replace("method: sft\n", line)))
    assert [i.path for i in err.issues] == ["method"]
    for method in METHODS:
        assert method in err.issues[0].message
    assert err.issues[0].value == value
    assert err.issues[0].suggestion == ("sft" if value else None)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "run.yaml", "name: demo\nmethod: sft\nmodel: path: m\ndata: {}\n")
    err = spec_error(path)
    assert err.source == str(path)
    assert "YAML syntax error at line" in err.issues[0].message
    assert "line 3" in err.issues[0].message


def test_top_level_must_be_a_mapping(tmp_path):
    err = spec_error(write(tmp_path, "run.yaml", "- a\n- b\n"))
    assert "mapping" in err.issues[0].message and "list" in err.issues[0].message


def test_missing_file(tmp_path):
    err = spec_error(tmp_path / "nope.yaml")
    assert err.source == str(tmp_path / "nope.yaml")
    assert "not found" in err.issues[0].message
    assert err.exit_code == 2


def test_load_yaml_mapping_uses_the_safe_loader(tmp_path):
    path = write(tmp_path, "x.yaml", "a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError):
        load_yaml_mapping(path)
    assert load_yaml_mapping(write(tmp_path, "y.yaml", "a: 1\n")) == {"a": 1}


def test_issues_from_validation_error_works_for_a_plain_model():
    class Group(BaseModel):
        model_config = ConfigDict(extra="forbid")
        replicas: int = 1

    class Cluster(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: str
        workers: list[Group] = []
        head: Group | None = None

    with pytest.raises(ValidationError) as info:
        Cluster.model_validate({"kind": "aws", "workers": [{"replica": 2}], "head": {"replicas": "x"}})
    issues = {i.path: i for i in issues_from_validation_error(info.value, Cluster)}
    assert set(issues) == {"workers[0].replica", "head.replicas"}
    assert issues["workers[0].replica"].suggestion == "replicas"
    assert issues["head.replicas"].value == "x"


def test_config_does_not_import_heavy_modules():
    code = "import sys, launcher.config; print([m for m in ('torch','ray','deepspeed') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- every file gives exit 0 or 2 with a message, never a traceback ------------------------

BASE_SPEC = VALID.lstrip("\n")
DEEP = 10_000


def _validate(path: Path, capsys) -> tuple[int, str]:
    """`launch validate PATH` in-process: (exit code, stderr)."""
    from launcher.cli import main

    with pytest.raises(SystemExit) as info:
        main(["validate", str(path)])
        raise SystemExit(0)  # a normal return is exit 0 as well
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return info.value.code or 0, err


MALFORMED = {
    # anchors and aliases
    "self_alias_list": "a: &x [*x]\n" + BASE_SPEC,
    "self_alias_map": BASE_SPEC.replace("model:\n  path: meta-llama/Llama-3.1-8B", "model: &m {path: *m}"),
    "self_alias_deep": BASE_SPEC + "env: &e {A: {B: [1, *e]}}\n",
    "alias_bomb": BASE_SPEC + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" if i else "l0: &l0 [x]\n"
                                      for i in range(9)),
    "alias_undefined": BASE_SPEC + "x: *nope\n",
    "merge_key_scalar": BASE_SPEC + "train:\n  <<: 5\n",
    # duplicate and non-string keys
    "duplicate_key": BASE_SPEC + "name: other\n",
    "duplicate_nested_key": BASE_SPEC + "train: {lr: 1.0e-3, lr: 2.0e-3}\n",
    "int_key": BASE_SPEC + "1: a\n",
    "null_key": BASE_SPEC + "~: a\n",
    "bool_key": BASE_SPEC + "env: {true: a}\n",
    "list_key": BASE_SPEC + "? [a, b]\n: c\n",
    "map_key": BASE_SPEC + "? {a: b}\n: c\n",
    # tags and values OmegaConf cannot hold
    "python_object": BASE_SPEC + "x: !!python/object:os.system {}\n",
    "binary": BASE_SPEC + "env: {X: !!binary aGVsbG8=}\n",
    "timestamp": BASE_SPEC + "env: {X: !!timestamp 2001-12-14}\n",
    "implicit_date": BASE_SPEC + "env: {X: 2001-12-14}\n",
    "set": BASE_SPEC + "env: !!set {a, b}\n",
    "omap": BASE_SPEC + "env: !!omap [a: 1]\n",
    "custom_tag": BASE_SPEC + "x: !foo bar\n",
    "bad_int_tag": BASE_SPEC + "train: {seed: !!int abc}\n",
    "empty_int_tag": BASE_SPEC + "train: {seed: !!int ''}\n",
    "bad_bool_tag": BASE_SPEC + "resources: {accelerator_type: !!bool maybe}\n",
    "bad_float_tag": BASE_SPEC + "train: {lr: !!float fast}\n",
    # bytes
    "invalid_utf8": BASE_SPEC + "x: \udcff\udcfe\n",
    "nul_byte": BASE_SPEC + "x: a\x00b\n",
    "nul_escape": BASE_SPEC + 'checkpoint: {storage: "~\\0"}\n',
    "nul_in_defaults": BASE_SPEC + 'defaults: ["a\\0b.yaml"]\n',
    "lone_surrogate": BASE_SPEC + 'env: {X: "\\ud800"}\n',
    "utf8_bom": "\ufeff" + BASE_SPEC,
    "utf16": BASE_SPEC.encode("utf-16"),
    "binary_file": bytes(range(256)) * 4,
    # numbers
    "inf": BASE_SPEC + "train: {lr: .inf}\n",
    "nan": BASE_SPEC + "train: {lr: .nan}\n",
    "1e999": BASE_SPEC + "train: {epochs: 1e999}\n",
    "10**400": BASE_SPEC + f"train: {{seed: {10**400}}}\n",
    "10**5000": BASE_SPEC + "train: {seed: 1" + "0" * 5000 + "}\n",
    "huge_hex": BASE_SPEC + "train: {seed: 0x" + "f" * 5000 + "}\n",
    # nesting
    "deep_flow_list": BASE_SPEC + "x: " + "[" * DEEP + "]" * DEEP + "\n",
    "deep_flow_map": BASE_SPEC + "x: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n",
    "deep_block": BASE_SPEC + "x:\n" + "".join(" " * i + "-\n" for i in range(1, 3000)),
    "deep_env": BASE_SPEC + "env: " + "{a: " * 60 + "1" + "}" * 60 + "\n",
    # documents
    "empty": "",
    "empty_document": "---\n",
    "comment_only": "# nothing\n",
    "two_documents": BASE_SPEC + "---\n" + BASE_SPEC,
    "top_level_list": "- a\n",
    "top_level_scalar": "42\n",
    # interpolation
    "unclosed_interpolation": BASE_SPEC + "env: {X: '${'}\n",
    "missing_env_var": BASE_SPEC + "env: {X: '${oc.env:LLMLAUNCH_TEST_UNSET_VARIABLE}'}\n",
    "unknown_resolver": BASE_SPEC + "env: {X: '${nope:bar}'}\n",
    "interpolation_cycle": BASE_SPEC + "env: {X: '${env.Y}', Y: '${env.X}'}\n",
    "self_interpolation": BASE_SPEC.replace("name: demo", "name: ${name}"),
    "missing_value": BASE_SPEC.replace("path: meta-llama/Llama-3.1-8B", "path: '???'"),
    "interpolation_to_container": BASE_SPEC + "env: {X: '${data}'}\n",
    # files the spec names
    "deepspeed_directory": BASE_SPEC + "train: {deepspeed: .}\n",
    "deepspeed_binary": BASE_SPEC + "train: {deepspeed: bin.json}\n",
    "deepspeed_nul": BASE_SPEC + 'train: {deepspeed: "a\\0b.json"}\n',
    "defaults_directory": BASE_SPEC + "defaults: ['.']\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_spec_exits_0_or_2_without_traceback(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMLAUNCH_HOME", str(tmp_path / "home"))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    path = tmp_path / "run.yaml"
    text = MALFORMED[name]
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))
    code, err = _validate(path, capsys)
    assert code in (0, 2), err
    if code == 2:
        assert str(path) in err, err  # names the file


def issue_of(text: str, tmp_path: Path) -> str:
    """The one issue a spec (VALID + text) gives, as printed."""
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    err = spec_error(path)
    assert err.source == str(path)
    assert len(err.issues) == 1, err.message
    return str(err.issues[0])


@pytest.mark.parametrize("text, expected", [
    ("a: &x [*x]\n" + BASE_SPEC, ["a[0]: ", "alias *x", "cycle", "line 1"]),
    (BASE_SPEC.replace("model:\n  path: meta-llama/Llama-3.1-8B", "model: &m {path: *m}"),
     ["model.path: ", "alias *m", "cycle", "line 3"]),
    (BASE_SPEC + "name: other\n", ["name: ", "duplicate key 'name'", "line 9", "first at line 1"]),
    (BASE_SPEC + "train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", ["train.lr: ", "duplicate key 'lr'", "line 11"]),
    (BASE_SPEC + "env: {1: a}\n", ["env: ", "key 1", "not a string", "line 9"]),
    (BASE_SPEC + "~: a\n", ["(spec): ", "key ~", "not a string", "line 9"]),
    (BASE_SPEC + "? [a, b]\n: c\n", ["(spec): ", "key", "list", "line 9"]),
    (BASE_SPEC + "env: {X: !!binary aGVsbG8=}\n", ["env.X: ", "binary", "line 9"]),
    (BASE_SPEC + "env: {X: 2001-12-14}\n", ["env.X: ", "date", "quote", "line 9"]),
    (BASE_SPEC + "env: !!set {a, b}\n", ["env: ", "!!set", "line 9"]),
    (BASE_SPEC + "x: !foo bar\n", ["x: ", "!foo", "line 9"]),
    (BASE_SPEC + "train: {seed: !!int abc}\n", ["train.seed: ", "!!int", "line 9"]),
    (BASE_SPEC + "train: {seed: 1" + "0" * 5000 + "}\n", ["train.seed: ", "too large", "line 9"]),
    (BASE_SPEC + "x: " + "[" * DEEP + "]" * DEEP + "\n", ["x", "nested more than", "line 9"]),
    (BASE_SPEC + "x: a\x00b\n", ["(spec): ", "line 9", "NUL"]),
    (BASE_SPEC + 'env: {X: "a\\0b"}\n', ["env.X: ", "NUL", "line 9"]),
    (BASE_SPEC + "x: \udcff\n", ["(spec): ", "UTF-8", "line 9"]),
    (BASE_SPEC + "---\n" + BASE_SPEC, ["(spec): ", "one YAML document", "line 9"]),
    (BASE_SPEC + "train: {lr: .inf}\n", ["train.lr: ", "finite"]),
    (BASE_SPEC + "train: {epochs: 1e999}\n", ["train.epochs: ", "finite"]),
    (BASE_SPEC.replace("path: meta-llama/Llama-3.1-8B", "path: '???'"), ["model.path: ", "missing"]),
    (BASE_SPEC + "train: {deepspeed: .}\n", ["train.deepspeed: ", "directory"]),
])
def test_malformed_spec_messages(text, expected, tmp_path):
    message = issue_of(text, tmp_path)
    for part in expected:
        assert part in message, message
    assert len(message) < 300, message


def test_merge_keys_and_acyclic_aliases_still_work(tmp_path):
    path = write(tmp_path, "run.yaml", BASE_SPEC + """
        train: &t
          lr: 1.0e-3
          seed: 3
        checkpoint:
          storage: &s s3://bucket/runs
        env:
          <<: {A: "1", B: "2"}
          B: "3"
          STORAGE: *s
    """.replace("\n        ", "\n"))
    run = load_spec(path)
    assert run.train.lr == 1e-3 and run.checkpoint.storage == "s3://bucket/runs"
    assert run.env == {"A": "1", "B": "3", "STORAGE": "s3://bucket/runs"}


def test_list_over_mapping_from_defaults_names_the_key(tmp_path):
    write(tmp_path, "base.yaml", "model: {path: m}\ntrain: {lr: 1.0e-3}\n")
    err = spec_error(write(tmp_path, "run.yaml", VALID.replace("model:\n  path: meta-llama/Llama-3.1-8B\n", "")
                           + "defaults: [base.yaml]\nmodel: [a]\n"))
    assert err.source == str(tmp_path / "run.yaml")
    assert [i.path for i in err.issues] == ["model"]
    assert "a list here but a mapping in the `defaults`" in err.issues[0].message


def test_a_problem_in_a_defaults_file_names_the_spec_that_includes_it(tmp_path):
    write(tmp_path, "base.yaml", "train: {lr: 1.0e-3, lr: 2.0e-3}\n")
    run = write(tmp_path, "run.yaml", VALID + "defaults: [base.yaml]\n")
    err = spec_error(run)
    assert err.source == str(tmp_path / "base.yaml")
    assert [i.path for i in err.issues] == ["train.lr"]
    assert err.hint == f"base.yaml is in the `defaults` of {run}"


def test_yaml_syntax_error_has_its_yaml_path_where_known(tmp_path):
    err = spec_error(write(tmp_path, "run.yaml", VALID + "env: {A: [1, 2}\n"))
    assert [i.path for i in err.issues] == ["env.A"]
    assert "YAML syntax error at line 10, column 15" in err.issues[0].message


@pytest.mark.parametrize("override", ["tune.search_space.train.lr={loguniform:[1e-5,1e-3]}", "train.lr=[1, 2", "train.lr=&a *a", "model.path=!!binary x"])
def test_override_that_is_not_valid_yaml_is_exit_2(override, capsys):
    from launcher.cli import main

    with pytest.raises(SystemExit) as info:
        main(["validate", str(Path(__file__).resolve().parents[2] / "configs/examples/quickstart.yaml"), override])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and "problem" in err
