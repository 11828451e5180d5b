"""The run spec as Markdown, generated from the pydantic models' field docstrings
(`launch schema --markdown > docs/run-spec.md`; a test keeps the page current)."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from trainers.spec import AnyRun, SftRun


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("trainers.spec.", "").replace("trainers.tune_spec.", "")
    return getattr(annotation, "__name__", text) if not typing.get_args(annotation) else text


def _submodels(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _submodels(arg)]


def _section(prefix: str, model: type[BaseModel], out: list[str], seen: set) -> None:
    out += [f"## `{prefix or 'top level'}`", ""]
    if model.__doc__ and prefix:
        out += [" ".join(model.__doc__.strip().split("\n\n")[0].split()), ""]  # its first paragraph
    out += ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else f"`{field.default!r}`"
        if isinstance(field.default, BaseModel):
            default = "see below"
        desc = " ".join((field.description or "").split()).replace("|", "\\|")
        type_name = _type_name(field.annotation).replace("|", "\\|")
        out.append(f"| `{name}` | `{type_name}` | {default} | {desc} |")
        for sub in _submodels(field.annotation):
            nested.append((f"{prefix}.{name}".lstrip("."), sub))
    out.append("")
    for path, sub in nested:
        if (path, sub) not in seen:
            seen.add((path, sub))
            _section(path, sub, out, seen)


def markdown() -> str:
    out = ["# The run spec", "",
           "Generated from `trainers/spec.py` by `launch schema --markdown`; do not edit by hand.",
           "Unknown keys are errors. `method` chooses the training method:", ""]
    runs = typing.get_args(AnyRun)
    for run in runs:
        out.append(f"- `{_method(run)}`: {' '.join(run.__doc__.strip().split())}")
    out.append("")
    seen: set = set()
    _section("", SftRun, out, seen)
    for run in runs:  # what a method has that `sft` has not, or has in another shape
        for name, field in run.model_fields.items():
            shared = SftRun.model_fields.get(name)
            if name == "method" or (shared is not None and shared.annotation == field.annotation):
                continue
            for sub in _submodels(field.annotation):
                if (name, sub) not in seen:
                    seen.add((name, sub))
                    out += [f"_`method: {_method(run)}`:_", ""]
                    _section(name, sub, out, seen)
    return "\n".join(out).rstrip() + "\n"


def _method(run) -> str:
    return run.model_fields["method"].annotation.__args__[0]
