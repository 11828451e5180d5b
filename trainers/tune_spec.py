"""The `tune:` section of a run spec: a hyperparameter search over spec paths.

Pure pydantic (imported by the launcher): the models, and `search_space_problems`, which
checks every path against the spec's own schema and every distribution's values against
that field's own constraints, by validating the spec with each candidate value in place.
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Literal, Union, get_origin

from pydantic import BaseModel, Field, ValidationError, model_validator

from trainers.spec_base import Strict

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(Strict):
    """One of: `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}` (lo > 0), `{randint: [lo, hi]}`
    (integers, both ends included), `{choice: [a, b, ...]}` (sampled), `{grid: [a, b, ...]}`
    (every value, `num_samples` times each)."""

    uniform: tuple[float, float] | None = None
    """Uniform between the two bounds."""
    loguniform: tuple[float, float] | None = None
    """Log-uniform between the two (positive) bounds: the usual choice for learning rates."""
    randint: tuple[int, int] | None = None
    """An integer between the two bounds, both included."""
    choice: list[Any] | None = Field(None, min_length=1)
    """One of the values, sampled."""
    grid: list[Any] | None = Field(None, min_length=1)
    """Every value (a grid search; not with `search: optuna`)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}" + (f"; got {', '.join(given)}" if given else ""))
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: the lower bound ({lo}) must be below the upper bound ({hi})")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: bounds must be positive (got {lo})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def candidates(self) -> list[Any]:
        """Values to check against the field's constraints: the bounds, or every option."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        lo, hi = self.args
        return [lo, hi] if self.kind == "randint" else [lo, (lo + hi) / 2 if self.kind == "uniform"
                                                         else math.sqrt(lo * hi), hi]


class AshaSpec(Strict):
    """Asynchronous successive halving: trials are compared at steps grace_period x
    reduction_factor^k; the worst stop early and free their resources."""

    type: Literal["asha"]
    grace_period: int = Field(1, gt=0)
    """Optimizer steps a trial runs before it may be stopped."""
    reduction_factor: float = Field(2, gt=1)
    """At each rung, 1 / reduction_factor of the trials go on."""
    max_t: int | None = Field(None, gt=0)
    """Steps of a trial that is never stopped (default: `train.max_steps`)."""


class FifoSpec(Strict):
    """Every trial runs to the end."""

    type: Literal["fifo"]


class PbtSpec(Strict):
    """Population-based training: every `perturbation_interval` steps, a trial in the bottom
    `quantile_fraction` copies the newest checkpoint of one in the top and goes on from it
    with its values mutated (multiplied by 0.8 or 1.2, a choice moved one place, or
    resampled). A mutation cannot change the model's shape or the data: search `model.*`
    and `data.*` with ASHA or FIFO."""

    type: Literal["pbt"]
    perturbation_interval: int = Field(gt=0)
    """Steps between exploits; a multiple of `checkpoint.every_n_steps` (a trial is copied
    from its newest checkpoint)."""
    mutations: dict[str, Distribution] | None = None
    """Paths mutated at each exploit and the distributions they are resampled from
    (default: every path of `search_space` outside `model.*` and `data.*`)."""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    """The fraction of trials that copy (bottom) and are copied (top)."""
    resample_probability: float = Field(0.25, ge=0, le=1)
    """The chance a mutated value is resampled from its distribution instead of perturbed."""
    synch: bool = False
    """Ray's synchronous PBT: every trial waits at each perturbation and all are compared
    together (each trial restarts there; exploits do not depend on which reports first)."""


SchedulerSpec = Union[AshaSpec, FifoSpec, PbtSpec]


class TuneSpec(Strict):
    """Hyperparameter search: each trial is a whole run of this spec with sampled values."""

    search_space: dict[str, Distribution] = Field(min_length=1)
    """Spec paths and their distributions, e.g. `train.lr: {loguniform: [1e-5, 1e-3]}`,
    `model.peft.r: {choice: [8, 16, 64]}`."""
    metric: str = "eval_loss"
    """The reported metric trials are compared by (`eval_loss` needs eval data)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    num_samples: int = Field(1, gt=0)
    """Trials to sample (with `grid` values: repeats of the whole grid)."""
    max_concurrent_trials: int | None = Field(None, gt=0)
    """Trials at once. Default: as many as the cluster holds (each trial: its workers plus
    one CPU for its driver); never more."""
    scheduler: SchedulerSpec = Field(FifoSpec(type="fifo"), discriminator="type")
    """`{type: fifo}`, `{type: asha, grace_period, reduction_factor, max_t}` or
    `{type: pbt, perturbation_interval, mutations, quantile_fraction, resample_probability}`."""
    search: Literal["random", "grid", "optuna"] = "random"
    """How values are chosen: `random` (and every `grid` value), or Optuna's TPE."""
    time_budget_s: float | None = Field(None, gt=0)
    """Stop starting and running trials after this many seconds."""
    seed: int | None = None
    """Seed of the search algorithm (default: `train.seed`)."""

    @model_validator(mode="after")
    def _search_fits_space(self) -> "TuneSpec":
        grids = [p for p, d in self.search_space.items() if d.kind == "grid"]
        if self.search == "optuna" and grids:
            raise ValueError(f"search: optuna cannot search a grid ({', '.join(grids)}); use choice")
        if self.search == "grid" and len(grids) != len(self.search_space):
            others = [p for p, d in self.search_space.items() if d.kind != "grid"]
            raise ValueError(f"search: grid needs grid values everywhere; {', '.join(others)} are not")
        if isinstance(self.scheduler, PbtSpec):
            mutated = self.mutations()
            if not mutated:
                raise ValueError("scheduler pbt: nothing to mutate; give scheduler.mutations (e.g. train.lr)")
            grids = [p for p, d in mutated.items() if d.kind == "grid"]
            shaped = [p for p in mutated if p.startswith(("model.", "data."))]
            if grids:
                raise ValueError(f"scheduler pbt: a mutation cannot be a grid ({', '.join(grids)}); use choice")
            if shaped:
                raise ValueError(f"scheduler pbt: {', '.join(shaped)} cannot change in the middle of a run "
                                 "(the donor's checkpoint has the old shape); search them with asha or fifo")
        return self

    def paths(self) -> list[str]:
        """Every path a trial's values set: the search space's, then mutated ones."""
        return list(dict.fromkeys([*self.search_space, *self.mutations()]))

    def mutations(self) -> dict[str, Distribution]:
        """What PBT mutates: its own `mutations`, or the search space less `model.*` paths."""
        s = self.scheduler
        if not isinstance(s, PbtSpec):
            return {}
        if s.mutations is not None:
            return dict(s.mutations)
        return {p: d for p, d in self.search_space.items() if not p.startswith(("model.", "data."))}


# ---------------------------------------------------------------- paths against the schema

def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_of(a)]


def path_problem(run_model: type[BaseModel], path: str) -> tuple[str, str | None] | None:
    """(what is wrong, did-you-mean) when `path` names no field of the spec, else None."""
    models = [run_model]
    parts = path.split(".")
    keyed = False  # the part before is a mapping (data.tasks): this part is one of its keys
    for i, part in enumerate(parts):
        if keyed:
            keyed = False
            continue
        fields = {name: f for m in models for name, f in m.model_fields.items()}
        if part not in fields:
            where = ".".join(parts[:i]) or "the spec"
            close = difflib.get_close_matches(part, list(fields), n=1)
            suggestion = ".".join([*parts[:i], close[0]]) if close else None
            return f"`{part}` is not a field of {where}", suggestion
        if part in ("tune", "name", "method", "defaults"):
            return f"`{path}` cannot be searched", None
        models = _models_of(fields[part].annotation)
        keyed = get_origin(fields[part].annotation) is dict
        if i < len(parts) - 1 and not models:
            return f"`{'.'.join(parts[:i + 1])}` has no fields", None
    if models and not any(m.model_fields.get(parts[-1]) for m in models):  # a section, not a value
        return f"`{path}` is a section; search one of its fields", None
    return None


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def search_space_problems(spec_data: dict[str, Any], run_model: type[BaseModel]) -> list[tuple[str, str, Any, str | None]]:
    """(YAML path, message, value, suggestion) for every search-space path that names no
    field, and every candidate value the field itself refuses."""
    tune = spec_data.get("tune") or {}
    problems = []
    scheduler = tune.get("scheduler") if isinstance(tune.get("scheduler"), dict) else {}
    spaces = [("tune.search_space", tune.get("search_space") or {}),
              ("tune.scheduler.mutations", scheduler.get("mutations") or {})]
    for where_space, path, dist in [(w, p, d) for w, space in spaces for p, d in space.items()]:
        where = f"{where_space}.{path}"
        found = path_problem(run_model, path)
        if found:
            problems.append((where, found[0], None, f"{where_space}.{found[1]}" if found[1] else None))
            continue
        d = Distribution.model_validate(dist) if not isinstance(dist, Distribution) else dist
        for value in d.candidates():
            trial = copy.deepcopy(spec_data)
            trial.pop("tune", None)
            set_path(trial, path, value)
            try:
                run_model.model_validate(trial)
            except ValidationError as e:
                here = [err for err in e.errors() if _loc_matches(err["loc"], path)]
                for err in here[:1]:
                    problems.append((where, f"{d.kind} value {value!r}: {err['msg'].removeprefix('Value error, ')}",
                                     None, None))
                if here:
                    break
    return problems


def _loc_matches(loc: tuple[Any, ...], path: str) -> bool:
    """The error is at `path`: its parts appear in order in the location, which pydantic
    interleaves with union member tags (`train.deepspeed.function-after[..., ZeroSpec].stage`)."""
    parts = iter(str(x) for x in loc)
    return all(any(x == part for x in parts) for part in path.split("."))
