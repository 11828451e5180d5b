"""Cluster definitions (`configs/clusters/NAME.yaml`): a second, smaller schema than the
run spec. `--cluster local` needs no file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class LocalCluster(_Strict):
    """A Ray head on 127.0.0.1 on this machine; nothing listens on other interfaces."""

    kind: Literal["local"] = "local"
    name: str = "local"
    num_cpus: int | None = Field(None, gt=0)
    """CPUs Ray may use (default: all cores)."""
    num_gpus: int | None = Field(None, ge=0)
    """GPUs Ray may use (default: all visible GPUs)."""
    object_store_memory_gb: float | None = Field(None, gt=0)
    """Ray object store size (default: Ray's choice, ~30% of memory)."""


from cluster.aws_spec import AwsCluster  # noqa: E402  (pydantic only: light)
from cluster.kubernetes_spec import KubernetesCluster  # noqa: E402  (pydantic only: light)

ClusterDef = Annotated[Union[LocalCluster, KubernetesCluster, AwsCluster], Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClusterDef)

# Where `--cluster NAME` looks, in order: the user's own directory, then the shipped ones.
SEARCH_PATH_ENV = "LLMLAUNCH_CLUSTERS"
USER_DIR = "~/.config/llmlaunch/clusters"


def shipped_configs() -> Path | None:
    """The shipped `configs/`: the checkout's for a source (editable) install, else the copy
    a wheel install puts in `<prefix>/share/llmlaunch/configs` (pyproject's data-files)."""
    import sysconfig

    here = Path(__file__).resolve()
    candidates = [here.parent.parent / "configs", Path(sysconfig.get_path("data")) / "share/llmlaunch/configs"]
    if len(here.parents) > 4:  # <prefix>/lib/pythonX.Y/site-packages/cluster/definition.py
        candidates.append(here.parents[4] / "share/llmlaunch/configs")
    return next((c for c in candidates if (c / "clusters").is_dir()), None)


# `--cluster NAME` that needs no file: `local` (a file of that name on the search path wins).
BUILTIN = {"local": LocalCluster}


def builtin_cluster(name: str) -> LocalCluster | None:
    """The definition of a built-in cluster name, else None."""
    return BUILTIN[name]() if name in BUILTIN else None


def parse_cluster(data: dict[str, Any]) -> LocalCluster | KubernetesCluster | AwsCluster:
    return _ADAPTER.validate_python(data)


def cluster_file(name: str) -> Path | None:
    """The definition file for `--cluster NAME` (a path, or a name looked up on the search path)."""
    import os

    as_path = Path(name).expanduser()
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    dirs = [Path(d).expanduser() for d in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if d]
    dirs.append(Path(USER_DIR).expanduser())
    shipped = shipped_configs()
    if shipped is not None:
        dirs.append(shipped / "clusters")
    for d in dirs:
        for suffix in (".yaml", ".yml"):
            if (d / f"{name}{suffix}").exists():
                return d / f"{name}{suffix}"
    return None
