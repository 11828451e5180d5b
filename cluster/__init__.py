"""Cluster providers: one small interface, one module per kind.

A provider turns a cluster definition into a running Ray cluster and tells the launcher
the address of its Ray Jobs API. The launcher only ever talks to a cluster through that
API, so what runs on `--cluster local` is what runs in production.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol


class ProviderError(Exception):
    """Provisioning or reaching a cluster failed; `hint` says what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class Unsupported(ProviderError):
    """The cluster kind cannot do what was asked (e.g. spot workers on `local`)."""


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
    """What each `cluster/<kind>.py` module implements (as module-level functions)."""

    def render(self, definition: Any) -> Any:
        """Manifests / config that `up` would apply. Pure: used by --dry-run and tests."""

    def up(self, definition: Any) -> str:
        """Start the cluster, or reuse a running one; returns the Ray Jobs API address."""

    def status(self, definition: Any) -> ClusterStatus: ...

    def address(self, definition: Any) -> str | None:
        """The Ray Jobs API address of a running cluster, else None."""

    def down(self, definition: Any) -> bool:
        """Stop the cluster; False when nothing was running."""

    def supports(self, feature: str) -> bool: ...


KINDS = ("local", "kubernetes", "aws")


def provider(kind: str) -> Provider:
    if kind not in KINDS:
        raise Unsupported(f"cluster kind {kind!r} is not available", hint=f"use one of: {', '.join(KINDS)}")
    return importlib.import_module(f"cluster.{kind}")  # type: ignore[return-value]
