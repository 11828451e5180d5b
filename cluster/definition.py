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


from cluster.kubernetes_spec import KubernetesCluster  # noqa: E402  (pydantic only: light)

ClusterDef = Annotated[Union[LocalCluster, KubernetesCluster], Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClusterDef)

# Where `--cluster NAME` looks, in order: the user's own directory, then the shipped ones.
SEARCH_PATH_ENV = "LLMLAUNCH_CLUSTERS"
SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "clusters"


def parse_cluster(data: dict[str, Any]) -> LocalCluster | KubernetesCluster:
    return _ADAPTER.validate_python(data)


def cluster_file(name: str) -> Path | None:
    """The definition file for `--cluster NAME` (a path, or a name looked up on the search path)."""
    import os

    as_path = Path(name).expanduser()
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    dirs = [Path(d).expanduser() for d in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if d]
    dirs += [Path("~/.config/llmlaunch/clusters").expanduser(), SHIPPED]
    for d in dirs:
        for suffix in (".yaml", ".yml"):
            if (d / f"{name}{suffix}").exists():
                return d / f"{name}{suffix}"
    return None
