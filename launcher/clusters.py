"""`--cluster NAME` -> a validated cluster definition."""

from __future__ import annotations

from pydantic import ValidationError

from cluster import ConfigError, provider
from cluster.definition import USER_DIR, ClusterDef, builtin_cluster, cluster_file, parse_cluster, shipped_configs
from launcher.config import issues_from_validation_error, load_yaml_mapping
from launcher.errors import SpecError, SpecIssue, UsageError


def load_cluster(name: str):
    path = cluster_file(name)
    if path is None:
        if (builtin := builtin_cluster(name)) is not None:
            return builtin
        shipped = shipped_configs()
        example = f"; {shipped / 'clusters' / 'prod.yaml'} is an example" if shipped else ""
        raise UsageError(f"--cluster {name}: no cluster definition found",
                         hint=f"create {USER_DIR}/{name}.yaml (or a directory named by $LLMLAUNCH_CLUSTERS), "
                              f"or pass a path to a .yaml file{example}")
    data = load_yaml_mapping(path)
    data.setdefault("name", path.stem)
    try:
        return parse_cluster(data)
    except ValidationError as e:
        raise SpecError(str(path), issues_from_validation_error(e, ClusterDef)) from None


def definition_file(name: str) -> str | None:
    """The file `--cluster NAME` is read from (None for a built-in name without one)."""
    path = cluster_file(name)
    return str(path) if path else None


def load_checked(name: str):
    """`load_cluster`, then the provider's offline check of what the definition renders to
    (aws: Ray's own schema and botocore's RunInstances shape), for the commands that render
    or start a cluster: a config the cluster's tools would refuse is exit 2 here, naming the
    definition's file and the path in the rendered config."""
    definition = load_cluster(name)
    try:
        provider(definition.kind).validate(definition, definition_file(name))
    except ConfigError as e:
        raise config_error(e, definition.name) from None
    return definition


def config_error(e: ConfigError, name: str) -> SpecError:
    """A ConfigError as the CLI reports a bad definition (exit 2)."""
    return SpecError(e.source or f"cluster {name}", [SpecIssue(e.path, e.problem)], hint=e.hint)
