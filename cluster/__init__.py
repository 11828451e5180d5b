"""Cluster providers: one small interface, one module per kind.

A provider turns a cluster definition into a running Ray cluster and tells the launcher
the address of its Ray Jobs API. The launcher only ever talks to a cluster through that
API, so what runs on `--cluster local` is what runs in production. Whatever differs by
kind (what a cluster can read, how credentials reach a job, capacity, how a run starts) is
an attribute or function of the kind's module: `launcher/` never compares `kind` itself
(tests/unit/test_provider_interface.py), so a new kind is a new module here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class ProviderError(Exception):
    """Provisioning or reaching a cluster failed; `hint` says what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class Unsupported(ProviderError):
    """The cluster kind cannot do what was asked (e.g. spot workers on `local`)."""


class ConfigError(ValueError):
    """A definition whose rendered config the cluster's own tools refuse (aws: Ray's schema,
    botocore's RunInstances shape). `path` is the dotted path in the rendered config, `hint`
    what to change in the definition, `source` the definition's file. The CLI: exit 2."""

    def __init__(self, path: str, problem: str, hint: str | None = None, source: str | None = None):
        self.path, self.problem, self.hint, self.source = path, problem, hint, source
        super().__init__(f"{source + ': ' if source else ''}{path}: {problem}")


@dataclass
class ClusterStatus:
    name: str
    kind: str
    running: bool
    address: str | None = None
    resources: dict[str, float] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""


class Provider(Protocol):
    """What each `cluster/<kind>.py` module implements, as module-level attributes and
    functions. The launcher decides everything that differs by kind from these."""

    READS_LOCAL_FILES: bool
    """The cluster's workers read this machine's files (local): a spec may name local paths,
    and storage this machine cannot write is an error. False: the spec must name s3:// or hub
    locations only (checked before anything starts), and what this machine cannot read is
    only a warning (the cluster has credentials of its own)."""

    USES_THIS_PYTHON: bool
    """The workers run in the launcher's Python environment, which must then hold the
    `[train]` packages (checked before the cluster starts)."""

    CLUSTER_CREDENTIALS: str | None
    """Where the cluster's jobs get their storage credentials, in words for messages (e.g.
    "the cluster's storage Secret"). None: from the launcher, which passes its own (AWS_*,
    HF_*; values in a 0600 file whose path the job gets, never in the job's env)."""

    def render(self, definition: Any) -> Any:
        """Manifests / config that `up` would apply. Pure: used by --dry-run and tests."""

    def validate(self, definition: Any, source: str | None = None) -> Any:
        """`render`, checked offline with the cluster's own tools where it has them; raises
        ConfigError naming the rendered path and `source` (the definition's file)."""

    def documents(self, definition: Any, *, source: str | None = None,
                  run: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
        """Only where supports("render"): the YAML documents `launch render` prints (and
        --dry-run shows) and a one-line note. `run` (the keywords of `run_ephemeral`): those
        of that run instead of the persistent cluster's. Validated as `validate`."""

    def capacity(self, definition: Any) -> dict[str, float] | None:
        """CPUs and GPUs a run can be placed on, known before provisioning (an autoscaling
        cluster at its maximum size); None when only the running cluster knows (`status`,
        after `up`). The launcher checks a run's resources and resolves `gpus_per_worker:
        auto` against it."""

    def up(self, definition: Any, on_progress: Callable[[str], None] = print, update: bool = True) -> str:
        """Start the cluster, or reuse a running one; returns the Ray Jobs API address.
        `update=False` (a run on a shared cluster): a running cluster is used as it is;
        `launch up` applies definition changes."""

    def status(self, definition: Any) -> ClusterStatus:
        """Nodes and resources. `address` may be None while running (a tunnel or port-forward
        not opened yet): the launcher then asks `address`."""

    def address(self, definition: Any) -> str | None:
        """The Ray Jobs API address of a running cluster, else None."""

    def job_address(self, definition: Any, job_id: str) -> str | None:
        """Where job `job_id` is reached (an ephemeral run has a cluster of its own)."""

    def down(self, definition: Any, on_progress: Callable[[str], None] | None = None) -> bool:
        """Stop the cluster; False when nothing was running."""

    def max_failures(self, definition: Any) -> int:
        """How often a run's workers restart from its newest complete checkpoint after a node
        is lost (Ray Train FailureConfig; -1: without limit): the job's LLMLAUNCH_MAX_FAILURES."""

    def supports(self, feature: str) -> bool:
        """"gpu", "autoscaling", "spot", "render" (`documents`), "ephemeral" (`run_ephemeral`)."""

    def run_ephemeral(self, definition: Any, *, spec_json: str, run_name: str, run_id: str,
                      env: dict[str, str], on_progress: Callable[[str], None] = print) -> tuple[str, str]:
        """Only where supports("ephemeral"): start a cluster that lives as long as this run and
        the run on it; returns the Jobs API address and the job id."""


KINDS = ("local", "kubernetes", "aws")


def provider(kind: str) -> Provider:
    if kind not in KINDS:
        raise Unsupported(f"cluster kind {kind!r} is not available", hint=f"use one of: {', '.join(KINDS)}")
    return importlib.import_module(f"cluster.{kind}")  # type: ignore[return-value]


def kinds_supporting(feature: str) -> list[str]:
    """The kinds whose provider supports `feature`, for messages (`--ephemeral needs a ...`)."""
    return [k for k in KINDS if provider(k).supports(feature)]


_SECRET_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIALS?|PRIVATE_KEY|ACCESS_KEY|API_KEY|"
                          r"SESSION_TOKEN|AUTH_TOKEN)(_|$)")


def looks_secret(env_name: str) -> bool:
    """True for variable names that hold credentials (`AWS_SECRET_ACCESS_KEY`, `HF_TOKEN`, ...).

    Such values never go into a job's runtime_env or a rendered config in plain text: on
    Kubernetes they reach pods through a Secret (`secretKeyRef`), on a local cluster through
    a 0600 file. (Here, not in a kind's module: the launcher checks every spec's `env` by it.)"""
    return bool(_SECRET_NAME.search(env_name.upper()))
