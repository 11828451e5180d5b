"""A Python reward function named by import path (`ppo.reward_fn: mypkg.rules:score`), for
rule-based and verifiable rewards in RL from feedback (issue 21).

The function is called in batches on decoded text: `score(prompts: list[str],
responses: list[str]) -> list[float]` (a sequence of numbers, one per response, or a 1-D
array/tensor). Its module is a file or package of the user's, found first relative to the
spec's directory and then on the launcher's `sys.path`; `locate` returns the directory or
file that must travel with the job (Ray `py_modules`) so that a remote cluster that has
never seen it can import it. Every problem is a `ValueError` naming the field and what to
do, raised before anything is provisioned.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

FIELD = "ppo.reward_fn"


@dataclass(frozen=True)
class Located:
    module: str  # "mypkg.rules"
    function: str  # "score"
    root: str  # the top-level package directory or module file to ship (py_modules)
    search_dir: str  # what goes on sys.path to import `module` from `root`


def _split(ref: str) -> tuple[str, str]:
    module, sep, function = ref.partition(":")
    if not sep or not module or not function or not all(p.isidentifier() for p in (*module.split("."), function)):
        raise ValueError(f"{FIELD}: {ref!r} is not an import path; write it as `package.module:function`")
    return module, function


def locate(ref: str, spec_dir: str | os.PathLike | None = None) -> Located:
    """Where `ref`'s top-level module lives: under `spec_dir` first, then on sys.path."""
    module, function = _split(ref)
    top = module.split(".")[0]
    for base in ([str(spec_dir)] if spec_dir else []) + [p or os.getcwd() for p in sys.path]:
        for candidate in (Path(base) / top, Path(base) / f"{top}.py"):
            if candidate.is_dir() or candidate.is_file():
                return Located(module, function, str(candidate.resolve()), str(Path(base).resolve()))
    raise ValueError(f"{FIELD}: no module `{top}` next to the spec ({spec_dir}) or on the launcher's path; "
                     f"put `{top}.py` or the package `{top}/` beside the spec")


def load(ref: str, spec_dir: str | os.PathLike | None = None) -> Callable[[list[str], list[str]], Any]:
    """The function, imported and checked: it must take (prompts, responses)."""
    where = locate(ref, spec_dir)
    if where.search_dir not in sys.path:
        sys.path.insert(0, where.search_dir)
    try:
        mod = importlib.import_module(where.module)
    except Exception as e:  # the user's module failing to import: say so before anything starts
        raise ValueError(f"{FIELD}: importing `{where.module}` from {where.root} failed: "
                         f"{type(e).__name__}: {e}") from e
    fn = getattr(mod, where.function, None)
    if not callable(fn):
        raise ValueError(f"{FIELD}: `{where.module}` has no function `{where.function}`")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError:
        raise ValueError(f"{FIELD}: `{ref}` must take two arguments (prompts, responses), lists of strings; "
                         f"its signature is {where.function}{inspect.signature(fn)}") from None
    return fn


def scores(fn: Callable, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Call the function on one batch and check what it returns: one finite number per response."""
    import math

    out = fn(list(prompts), list(responses))
    if hasattr(out, "tolist"):
        out = out.tolist()
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise ValueError(f"{FIELD}: must return one number per response, got {type(out).__name__}") from None
    if len(values) != len(responses):
        raise ValueError(f"{FIELD}: returned {len(values)} scores for {len(responses)} responses")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{FIELD}: returned a non-finite score for response {bad[0]} "
                         f"({responses[bad[0]][:60]!r})")
    return values
