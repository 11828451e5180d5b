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
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from launcher.errors import SpecError, SpecIssue
from trainers.spec import PretrainRun, RunSpec, SftRun, parse_spec


def load_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; SpecError (naming the file) otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(str(path), [SpecIssue("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(str(path), [SpecIssue("", f"cannot read the file: {e}")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(str(path), [SpecIssue("", f"YAML syntax error{where}: {problem}")]) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(str(path), [SpecIssue("", f"the top level must be a mapping of keys, got {got}")])
    return data


def _compose(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """The file merged over its `defaults:` files (each relative to its own directory)."""
    data = load_yaml_mapping(path)
    defaults = data.pop("defaults", None) or []
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise SpecError(str(path), [SpecIssue("defaults", "must be a list of file paths", defaults)])
    merged = OmegaConf.create({})
    for entry in defaults:
        target = Path(os.path.abspath(path.parent / Path(entry).expanduser()))
        if target in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(target):], target))
            raise SpecError(str(path), [SpecIssue("defaults", f"defaults form a cycle: {cycle}", entry)])
        merged = OmegaConf.merge(merged, _compose(target, (*chain, target)))
    try:
        return OmegaConf.merge(merged, OmegaConf.create(data))
    except OmegaConfBaseException as e:
        raise SpecError(str(path), [_omegaconf_issue(e)]) from None


def _omegaconf_issue(e: OmegaConfBaseException) -> SpecIssue:
    # OmegaConf appends "full_key: ..." lines to its messages; the path carries that already.
    return SpecIssue(getattr(e, "full_key", None) or "", str(e).splitlines()[0])


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    issues = []
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            issues.append(SpecIssue(item, "an override must look like `key.path=value`"))
            continue
        try:
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            issues.append(SpecIssue(item, str(e).splitlines()[0]))
    if issues:
        raise SpecError("command-line overrides", issues)


def _resolve_paths(data: dict[str, Any], spec_dir: Path) -> None:
    """Make local paths absolute: the job runs in another working directory (or machine).

    Dataset, model and DeepSpeed paths are relative to the spec, and a value that does not
    exist there is left alone (it may be a hub id); storage is relative to the current directory.
    """

    def next_to_spec(value: str) -> str:
        candidate = spec_dir / Path(value).expanduser()
        return os.path.abspath(candidate) if candidate.exists() else value

    model, datasets, train, checkpoint = (data.get(k) if isinstance(data.get(k), dict) else {}
                                          for k in ("model", "data", "train", "checkpoint"))
    targets = [(model, "path", next_to_spec), (train, "deepspeed", next_to_spec),
               (checkpoint, "storage", lambda v: os.path.abspath(os.path.expanduser(v)))]
    for split in ("train", "eval"):  # anything malformed is left for validation to report
        entries = datasets.get(split) if isinstance(datasets.get(split), list) else []
        targets += [(ds, "path", next_to_spec) for ds in entries if isinstance(ds, dict)]
    for section, key, fix in targets:
        if isinstance(section.get(key), str) and "://" not in section[key]:
            section[key] = fix(section[key])


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SftRun | PretrainRun:
    """Load, merge, resolve and validate a run spec; SpecError lists every problem."""
    path = Path(os.path.abspath(path))
    cfg = _compose(path, (path,))
    _apply_overrides(cfg, overrides)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise SpecError(str(path), [_omegaconf_issue(e)]) from None
    data.pop("defaults", None)  # already merged (an override may have set it again)
    _resolve_paths(data, path.parent)
    try:
        spec = parse_spec(data)
    except ValidationError as e:
        raise SpecError(str(path), issues_from_validation_error(e, RunSpec)) from None
    if not spec.checkpoint.storage:
        spec.checkpoint.storage = str(Path(os.environ.get("LLMLAUNCH_HOME", "~/.cache/llmlaunch")).expanduser() / "runs")
    return spec


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
    return data
