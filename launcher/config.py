"""Load a run spec: YAML -> `defaults:` merge -> dotlist overrides -> `${...}` -> pydantic.

Every problem becomes a SpecIssue with its dotted YAML path, so the CLI can report them
all at once. Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from launcher.errors import SpecError, SpecIssue
from trainers.chat_templates import is_file_reference
from trainers.spec import PretrainRun, RunSpec, SftRun, parse_spec


# Limits on what a spec file may build (real specs are a few levels deep and a few
# hundred values); beyond them the parsers would recurse past Python's stack or, through
# aliases of aliases, build gigabytes.
MAX_DEPTH = 50
MAX_VALUES = 10_000

_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")}
_KINDS = {"int": "a number", "float": "a number", "bool": "a boolean", "null": "null", "timestamp": "a date"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_DIGITS = 1000  # a bigger integer means nothing in a spec, and Python cannot print past 4300 digits
_TOO_LARGE = f"the number is too large (more than {_MAX_DIGITS} digits)"


class _Refused(yaml.MarkedYAMLError):
    """Something a spec cannot mean, found while reading its YAML: where (YAML path) and what."""

    def __init__(self, path: str, problem: str, mark: Any):
        super().__init__(problem=problem, problem_mark=mark)
        self.path = path


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


class _SpecLoader(yaml.SafeLoader):
    """The safe loader, refusing while it composes (so with the YAML path and line) what
    would otherwise be silently wrong or crash later: duplicate keys, keys that are not
    strings, aliases that form a cycle or expand to huge trees, deep nesting, tags and
    values a spec cannot hold (binary, dates, sets, custom tags), NUL characters."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._path: list[Any] = []  # YAML path of the node being composed
        self._depth = 0
        self._open_anchors: list[str] = []  # anchors of the nodes being composed
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to (aliases included)
        self._paths: dict[int, str] = {}  # id(node) -> its YAML path, for construction errors

    def where(self) -> str:
        return _dotted(self._path)

    def compose_node(self, parent: Any, index: Any) -> Any:
        # `index` is the key node for a mapping value, the position for a list item, and
        # None for a mapping key (whose problems are reported at the mapping).
        step = index is not None
        if step:
            self._path.append(index if isinstance(index, int) else
                              index.value if isinstance(index, yaml.ScalarNode) else "?")
        try:
            return self._compose_checked(parent, index)
        except yaml.YAMLError as e:  # a syntax error: remember where, before unwinding
            if not hasattr(e, "yaml_path"):
                e.yaml_path = self.where()
            raise
        finally:
            if step:
                self._path.pop()

    def _compose_checked(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise _Refused(self.where(), f"alias *{event.anchor} is inside &{event.anchor}, the node it "
                                             "names: a cycle; a spec must be a tree", event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            where = _dotted(self._path[:3]) + ("..." if len(self._path) > 3 else "")
            raise _Refused(where, f"nested more than {MAX_DEPTH} levels deep; a spec needs a few",
                           event.start_mark)
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor is not None:
            self._open_anchors.append(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.pop()
        self._check(node)
        return node

    def _check(self, node: Any) -> None:
        path = self.where()
        self._paths[id(node)] = path

        def refuse(problem: str, mark: Any = node.start_mark) -> _Refused:
            return _Refused(path, problem, mark)

        tag = node.tag
        if tag not in _PLAIN_TAGS:
            name = tag[len(_TAG):] if tag.startswith(_TAG) else None
            if name == "timestamp" and isinstance(node, yaml.ScalarNode):
                raise refuse(f"{node.value} is read as a date; quote it to keep it a string")
            if name == "binary":
                raise refuse("binary data (!!binary) cannot be in a spec; write a string")
            if name == "value":
                raise refuse("a plain `=` means something else in YAML; quote it")
            hint = {"set": "use a list", "omap": "use a mapping", "pairs": "use a mapping"}.get(name, "remove it")
            raise refuse(f"tag {_short_tag(tag)} is not supported in a spec; {hint}")
        if isinstance(node, yaml.ScalarNode):
            size = 1
            if "\0" in node.value:
                raise refuse("contains a NUL character (\\0); remove it")
            if bad := _SURROGATE.search(node.value):
                raise refuse(f"contains \\u{ord(bad.group()):04x}, half of a UTF-16 surrogate pair; "
                             "write the character itself")
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(item)] for item in node.value)
        else:
            size, seen = 1, {}
            for key, value in node.value:
                size += self._sizes[id(key)] + self._sizes[id(value)]
                if key.tag == _TAG + "merge":
                    continue
                if not isinstance(key, yaml.ScalarNode):
                    kind = "list" if isinstance(key, yaml.SequenceNode) else "mapping"
                    raise refuse(f"a key is a {kind}; keys must be strings", key.start_mark)
                if key.tag != _TAG + "str":
                    kind = _KINDS.get(key.tag[len(_TAG):], f"tagged {_short_tag(key.tag)}")
                    raise refuse(f"key {key.value or '(empty)'} is {kind}, not a string; quote it", key.start_mark)
                if key.value in seen:
                    raise _Refused(_dotted([*self._path, key.value]),
                                   f"duplicate key {key.value!r} (first at line {seen[key.value] + 1}); "
                                   "YAML would silently keep the last one: remove one", key.start_mark)
                seen[key.value] = key.start_mark.line
        if size > MAX_VALUES:
            raise refuse(f"aliases expand this to more than {MAX_VALUES} values; write it out or simplify")
        self._sizes[id(node)] = size

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        path = self._paths.get(id(node), "")
        try:
            data = super().construct_object(node, deep=deep)
        except _Refused:
            raise
        except yaml.constructor.ConstructorError as e:
            raise _Refused(path, e.problem or str(e), e.problem_mark or node.start_mark) from None
        except (ValueError, TypeError, KeyError, IndexError, OverflowError):
            value = str(node.value)
            if node.tag == _TAG + "int" and len(value) > _MAX_DIGITS:  # past Python's int() limit
                raise _Refused(path, _TOO_LARGE, node.start_mark) from None
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise _Refused(path, f"{shown!r} is not a valid {_short_tag(node.tag)}", node.start_mark) from None
        if type(data) is int and data.bit_length() > _MAX_DIGITS * 3.33:  # e.g. hex, which int() reads
            raise _Refused(path, _TOO_LARGE, node.start_mark)
        return data

    def flatten_mapping(self, node: Any) -> None:  # merge keys `<<:`
        try:
            super().flatten_mapping(node)
        except yaml.constructor.ConstructorError as e:
            raise _Refused(self._paths.get(id(node), ""), e.problem or str(e), e.problem_mark) from None


def _line_col(text: str, position: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1


def _parse_yaml(text: str, source: str) -> Any:
    """The YAML document in `text`; SpecError naming `source`, the YAML path and the line."""
    try:
        loader = _SpecLoader(text)
    except yaml.reader.ReaderError as e:  # control characters: checked before parsing
        line, column = _line_col(text, e.position)
        code = e.character if isinstance(e.character, int) else ord(e.character)
        char = "a NUL byte" if code == 0 else f"character {code:#06x}"
        raise SpecError(source, [SpecIssue("", f"{char} is not allowed in YAML (line {line}, column {column}); "
                                               "is this a text file?")]) from None
    try:
        node = loader.get_single_node()
        return None if node is None else loader.construct_document(node)
    except _Refused as e:
        mark = e.problem_mark
        raise SpecError(source, [SpecIssue(e.path, f"{e.problem} (line {mark.line + 1}, "
                                                   f"column {mark.column + 1})")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if getattr(e, "context", None) == "expected a single document in the stream" and mark:
            issue = SpecIssue("", f"a spec is one YAML document, but a second one starts at line {mark.line + 1}; "
                                  "remove the `---` and what follows, or split the file")
        else:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            issue = SpecIssue(getattr(e, "yaml_path", ""), f"YAML syntax error{where}: {problem}")
        raise SpecError(source, [issue]) from None
    except RecursionError:  # not expected with MAX_DEPTH; kept as the last line of defence
        raise SpecError(source, [SpecIssue(loader.where(), "nested too deeply to read")]) from None
    finally:
        loader.dispose()


def load_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; SpecError (naming the file) otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(str(path), [SpecIssue("", "file not found")]) from None
    except IsADirectoryError:
        raise SpecError(str(path), [SpecIssue("", "is a directory, not a YAML file")]) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise SpecError(str(path), [SpecIssue("", f"cannot read the file: {getattr(e, 'strerror', None) or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SpecError(str(path), [SpecIssue("", f"not valid UTF-8 (byte {raw[e.start]:#04x} at line {line}); "
                                                  "save the file as UTF-8 text")]) from None
    data = _parse_yaml(text, str(path))
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(str(path), [SpecIssue("", f"the top level must be a mapping of keys, got {got}")])
    return data


def _omegaconf(source: Path, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args) with OmegaConf's errors as a SpecError naming `source`."""
    try:
        return fn(*args, **kwargs)
    except OmegaConfBaseException as e:
        raise SpecError(str(source), [_omegaconf_issue(e)]) from None
    except RecursionError:
        raise SpecError(str(source), [SpecIssue("", "nested too deeply (or interpolations loop)")]) from None


def _compose(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """The file merged over its `defaults:` files (each relative to its own directory)."""
    data = load_yaml_mapping(path)
    # A file's paths are relative to that file, also when it is another spec's defaults.
    _resolve_paths(data, path.parent)
    defaults = data.pop("defaults", None) or []
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise SpecError(str(path), [SpecIssue("defaults", "must be a list of file paths", defaults)])
    merged = OmegaConf.create({})
    for entry in defaults:
        target = Path(os.path.abspath(path.parent / Path(entry).expanduser()))
        if target in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(target):], target))
            raise SpecError(str(path), [SpecIssue("defaults", f"defaults form a cycle: {cycle}", entry)])
        if target.is_dir():
            raise SpecError(str(path), [SpecIssue("defaults", "is a directory; name a YAML file", entry)])
        try:
            included = _compose(target, (*chain, target))
        except SpecError as e:
            e.hint = e.hint or f"{entry} is in the `defaults` of {path}"
            raise
        merged = _merge(path, merged, included)
    return _merge(path, merged, _omegaconf(path, OmegaConf.create, data))


def _merge(source: Path, base: DictConfig, top: DictConfig) -> DictConfig:
    """`top` merged over `base`; where one has a list and the other a mapping, a SpecIssue there."""
    try:
        return _omegaconf(source, OmegaConf.merge, base, top)
    except (TypeError, ValueError) as e:  # "Cannot merge incompatible container types"
        trees = [OmegaConf.to_container(base), OmegaConf.to_container(top)]
        parts = _conflict(*trees)
        if parts is None:
            raise SpecError(str(source), [SpecIssue("", f"cannot be merged over its `defaults`: {e}")]) from None
        for key in parts:
            trees = [t[key] for t in trees]
        kinds = ["a mapping" if isinstance(t, dict) else "a list" for t in trees]
        raise SpecError(str(source), [SpecIssue(_dotted(parts), f"is {kinds[1]} here but {kinds[0]} in the "
                                                                "`defaults` it is merged over; use the same kind")]) from None


def _conflict(a: Any, b: Any, parts: tuple[Any, ...] = ()) -> list[Any] | None:
    """The first path where one of two trees has a mapping and the other a list."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() & b.keys():
            if (found := _conflict(a[key], b[key], (*parts, key))) is not None:
                return found
        return None
    if isinstance(a, (dict, list)) and isinstance(b, (dict, list)) and type(a) is not type(b):
        return list(parts)
    return None


def _omegaconf_issue(e: OmegaConfBaseException) -> SpecIssue:
    # OmegaConf appends "full_key: ..." lines to its messages; the path carries that already.
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, MissingMandatoryValue):
        return SpecIssue(key, "is ??? (a missing value): set it in the spec or with an override "
                              f"`{key or 'key'}=...`")
    lines = str(e).splitlines()
    return SpecIssue(key, lines[0] if lines else type(e).__name__)


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    issues = []
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            issues.append(SpecIssue(item, "an override must look like `key.path=value`"))
            continue
        try:
            cfg.merge_with_dotlist([item])
        except yaml.YAMLError as e:  # OmegaConf parses the value as YAML: `k={a:1}` needs `{a: 1}`
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            issues.append(SpecIssue(item, f"the value is not valid YAML ({problem}); quote it, and put a space "
                                          "after each `:` in a mapping: key.path='{a: 1}'"))
        except (OmegaConfBaseException, TypeError, ValueError, RecursionError) as e:
            issues.append(SpecIssue(item, str(e).splitlines()[0]))
    if issues:
        raise SpecError("command-line overrides", issues)


def _resolve_paths(data: dict[str, Any], spec_dir: Path) -> None:
    """Make local paths absolute: the job runs in another working directory (or machine).

    Dataset, model and DeepSpeed paths are relative to the spec, and a value that does not
    exist there is left alone (it may be a hub id); storage, and a run directory in
    `model.init_from`, are relative to the current directory.
    """

    def next_to_spec(value: str) -> str:
        candidate = spec_dir / Path(value).expanduser()
        return os.path.abspath(candidate) if candidate.exists() else value

    model, datasets, train, checkpoint = (data.get(k) if isinstance(data.get(k), dict) else {}
                                          for k in ("model", "data", "train", "checkpoint"))
    targets = [(model, "path", next_to_spec), (train, "deepspeed", next_to_spec),
               (checkpoint, "storage", lambda v: os.path.abspath(os.path.expanduser(v))),
               # a run's directory, like the storage it lies in (a bare name is a run name)
               (model, "init_from", lambda v: os.path.abspath(os.path.expanduser(v)) if "/" in v else v)]
    ppo = data.get("ppo") if isinstance(data.get("ppo"), dict) else {}
    # a reward run's directory or its model: beside the spec, else from the current directory
    targets.append((ppo, "reward_model", lambda v: next_to_spec(v) if (spec_dir / v).exists()
                    else os.path.abspath(v) if os.path.exists(v) else v))
    evals = data.get("eval") if isinstance(data.get("eval"), dict) else {}
    fewshot = evals.get("fewshot") if isinstance(evals.get("fewshot"), dict) else {}
    targets += [(fewshot, "path", next_to_spec), (fewshot, "pool", next_to_spec)]
    tasks = datasets.get("tasks") if isinstance(datasets.get("tasks"), dict) else {}
    for section in [datasets, *(t for t in tasks.values() if isinstance(t, dict))]:  # multitask: each task's
        for split in ("train", "eval", "replay"):  # anything malformed is left for validation to report
            entries = section.get(split) if isinstance(section.get(split), list) else []
            targets += [(ds, "path", next_to_spec) for ds in entries if isinstance(ds, dict)]
    if is_file_reference(datasets.get("chat_template")):  # not a built-in name or the template itself
        targets.append((datasets, "chat_template", next_to_spec))
    for section, key, fix in targets:
        if isinstance(section.get(key), str) and "://" not in section[key]:
            section[key] = fix(section[key])


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SftRun | PretrainRun:
    """Load, merge, resolve and validate a run spec; SpecError lists every problem."""
    path = Path(os.path.abspath(path))
    cfg = _compose(path, (path,))
    _apply_overrides(cfg, overrides)
    data = _omegaconf(path, OmegaConf.to_container, cfg, resolve=True, throw_on_missing=True)
    data.pop("defaults", None)  # already merged (an override may have set it again)
    _resolve_paths(data, path.parent)
    try:
        spec = parse_spec(data)
    except ValidationError as e:
        raise SpecError(str(path), issues_from_validation_error(e, RunSpec)) from None
    _check_deepspeed_file(spec, path)
    if not spec.checkpoint.storage:
        spec.checkpoint.storage = str(Path(os.environ.get("LLMLAUNCH_HOME", "~/.cache/llmlaunch")).expanduser() / "runs")
    return spec


def _check_deepspeed_file(spec: SftRun | PretrainRun, source: Path) -> None:
    """A DeepSpeed JSON path that exists must be a readable text file (a missing one is
    reported by the preflight checks, which also parse it)."""
    ds = spec.train.deepspeed
    if not isinstance(ds, str) or ds.lstrip().startswith("{") or "://" in ds:
        return
    try:
        Path(ds).read_text()  # as trainers.ds_config.load_json reads it
    except FileNotFoundError:
        return
    except IsADirectoryError:
        problem = "is a directory; name a DeepSpeed JSON file"
    except UnicodeDecodeError:
        problem = "is not a text file; name a DeepSpeed JSON file"
    except (OSError, ValueError) as e:
        problem = f"cannot read it: {getattr(e, 'strerror', None) or e}"
    else:
        return
    raise SpecError(str(source), [SpecIssue("train.deepspeed", problem, ds)])


# --- pydantic errors -> SpecIssues -------------------------------------------------------


def _unwrap(tp: Any) -> tuple[Any, str | None]:
    """Strip Annotated and Optional; return the type and its union discriminator, if any."""
    discriminator = None
    while True:
        if get_origin(tp) is Annotated:
            tp, *meta = get_args(tp)
            found = [m.discriminator for m in meta if isinstance(m, FieldInfo) and m.discriminator]
            discriminator = found[0] if found else discriminator
        elif _is_union(tp) and len(members := [a for a in get_args(tp) if a is not type(None)]) == 1:
            tp = members[0]
        else:
            return tp, discriminator


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(union: Any, discriminator: str) -> list[str]:
    models = [m for m in (_unwrap(a)[0] for a in get_args(union)) if _is_model(m)]
    return [str(v) for m in models for v in get_args(m.model_fields[discriminator].annotation)]


def _member(union: Any, discriminator: str | None, tag: Any) -> Any:
    """The union member that pydantic names `tag` in an error location."""
    for m in get_args(union):
        m = _unwrap(m)[0]
        if _is_model(m):
            if discriminator:
                if str(tag) in map(str, get_args(m.model_fields[discriminator].annotation)):
                    return m
            elif re.search(rf"(^|\W){m.__name__}\]*$", str(tag)):  # also "function-after[f(), ZeroSpec]"
                return m
        else:
            origin = get_origin(m) or m  # tags like "str", "list[str]", "literal['auto']"
            name = getattr(origin, "__name__", None) or getattr(origin, "_name", "")
            if str(tag).split("[")[0] == name.lower():
                return m
    return None


def _walk(root: Any, loc: tuple[Any, ...]) -> tuple[list[Any], Any, list[tuple[tuple[Any, ...], Any]]]:
    """Follow `loc` through the types: (YAML path parts, type reached, union branch points)."""
    parts: list[Any] = []
    branches: list[tuple[tuple[Any, ...], Any]] = []
    tp = root
    for item in loc:
        tp, discriminator = _unwrap(tp)
        if _is_union(tp):  # pydantic puts the member's tag into the loc: not a YAML key
            branches.append((tuple(parts), item))
            tp = _member(tp, discriminator, item)
            continue
        parts.append(item)
        if _is_model(tp):
            field = tp.model_fields.get(item)
            tp = field.annotation if field else None
        elif get_origin(tp) in (list, tuple, set, frozenset, dict) and get_args(tp):
            tp = get_args(tp)[-1 if get_origin(tp) is dict else 0]
        else:
            tp = None
    return parts, _unwrap(tp), branches


def _dotted(parts: list[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _is_mismatch(err: dict[str, Any], parts: list[Any], at: tuple[Any, ...]) -> bool:
    """The input is not of this union member's type at all (as opposed to a bad inner value)."""
    kind = err["type"]
    return tuple(parts) == at and (kind.endswith(("_type", "_parsing")) or kind == "literal_error")


def issues_from_validation_error(exc: ValidationError, root: Any) -> list[SpecIssue]:
    """One SpecIssue per problem; `root` is the validated model class or (discriminated) union."""
    walked = [(err, *_walk(root, err["loc"])) for err in exc.errors()]
    # A value that fails a union fails every member: report only the member it was meant for
    # (the one whose type it has), or one issue listing the accepted types when none fits.
    matched = {(at, tag) for err, parts, _, branches in walked for at, tag in branches
               if not _is_mismatch(err, parts, at)}
    matched_at = {at for at, _ in matched}
    issues: dict[str, SpecIssue] = {}
    for err, parts, (tp, discriminator), branches in walked:
        if any(at in matched_at and (at, tag) not in matched for at, tag in branches):
            continue
        message = err["msg"].removeprefix("Value error, ")
        message = re.sub(r"a valid dictionary or instance of \w+", "a mapping", message)  # no class names
        value = None if err["type"] == "missing" or not err["loc"] or not parts else err.get("input")
        suggestion = None
        if err["type"] == "extra_forbidden":
            value = None
            container = _walk(root, err["loc"][:-1])[1][0]
            if _is_model(container):
                close = difflib.get_close_matches(str(parts[-1]), list(container.model_fields), n=1)
                suggestion = close[0] if close else None
        elif err["type"] in ("union_tag_not_found", "union_tag_invalid") and discriminator:
            tags = _tags(tp, discriminator)
            parts = [*parts, discriminator]
            value = err["input"].get(discriminator) if isinstance(err["input"], dict) else None
            message = f"{'required' if value is None else 'unknown value'}; valid: {', '.join(tags)}"
            close = difflib.get_close_matches(str(value), tags, n=1) if value is not None else []
            suggestion = close[0] if close else None
        path = _dotted(parts)
        if path in issues and branches and _is_mismatch(err, parts, branches[-1][0]):  # another member
            issues[path].message += " or " + message.removeprefix("Input should be ")
            continue
        key = f"{path}\0{message}" if path in issues else path
        issues[key] = SpecIssue(path, message, value, suggestion)
    return list(issues.values())


def for_cluster(spec) -> dict[str, Any]:
    """The spec as sent to a cluster: a DeepSpeed JSON file named by `train.deepspeed` is
    sent as its content, since the cluster has no copy of this machine's file."""
    data = spec.model_dump(mode="json")
    ds = data["train"]["deepspeed"]
    if isinstance(ds, str) and not ds.lstrip().startswith("{") and os.path.isfile(ds):
        data["train"]["deepspeed"] = Path(ds).read_text()
    template = data["data"]["chat_template"]
    if is_file_reference(template) and os.path.isfile(template):  # likewise a jinja file
        data["data"]["chat_template"] = Path(template).read_text(encoding="utf-8")
    return data
