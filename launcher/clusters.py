"""`--cluster NAME` -> a validated cluster definition."""

from __future__ import annotations

from pydantic import ValidationError

from cluster.definition import USER_DIR, ClusterDef, LocalCluster, cluster_file, parse_cluster, shipped_configs
from launcher.config import issues_from_validation_error, load_yaml_mapping
from launcher.errors import SpecError, UsageError


def load_cluster(name: str):
    path = cluster_file(name)
    if path is None:
        if name == "local":
            return LocalCluster()
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
