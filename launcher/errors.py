"""Typed errors. Each carries the process exit code and, where one helps, a hint.

The CLI prints `message` (and `hint`) without a traceback unless `--debug`.
Exit codes: 0 success, 1 the job failed, 2 bad config or usage, 3 provisioning or
cluster error, 4 timeout, 130 interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LaunchError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass
class SpecIssue:
    """One problem in a spec: where (dotted YAML path), what, and a suggestion."""

    path: str
    message: str
    value: object = None
    suggestion: str | None = None

    def __str__(self) -> str:
        text = f"{self.path or '(spec)'}: {self.message}"
        if self.value is not None:
            text += f" (got {self.value!r})"
        if self.suggestion:
            text += f"; did you mean `{self.suggestion}`?"
        return text


class SpecError(LaunchError):
    """The run spec, a cluster definition, or a file they name is invalid."""

    exit_code = 2

    def __init__(self, source: str, issues: list[SpecIssue], hint: str | None = None):
        self.source = source
        self.issues = issues
        lines = [f"{source}: {len(issues)} problem{'s' if len(issues) != 1 else ''}"]
        lines += [f"  - {issue}" for issue in issues]
        super().__init__("\n".join(lines), hint)


class UsageError(LaunchError):
    exit_code = 2


class ClusterError(LaunchError):
    """Provisioning or reaching a cluster failed."""

    exit_code = 3


class StorageError(LaunchError):
    """Run storage is unreachable or not writable (checked before anything starts): a
    problem with the spec's `checkpoint.storage` or the credentials, so exit 2."""

    exit_code = 2


class JobFailed(LaunchError):
    exit_code = 1


class LaunchTimeout(LaunchError):
    exit_code = 4


@dataclass
class Interrupted(Exception):
    """Ctrl-C while attached to a job: the job keeps running."""

    job_id: str | None = None
    hints: list[str] = field(default_factory=list)
    exit_code: int = 130
