"""The provider interface (cluster/__init__.py): `launcher/` names no cluster kind, every
`cluster/<kind>.py` has the whole interface, and what the launcher derives from it (the
job's restart limit, where credentials come from) per kind.

What "names no cluster kind" means here, precisely, for every `launcher/*.py`:
- no comparison of a `.kind` attribute (`definition.kind == ...`, `st.kind != ...`,
  `definition.kind in (...)`): what differs by kind is an attribute or function of the kind's
  provider module (a plain variable called `kind` is something else: an event's, an error's);
- no import of a kind's modules (`cluster.local`, `cluster.kubernetes*`, `cluster.aws*`,
  `from cluster import kubernetes`): the launcher reaches them through `cluster.provider`;
- no string literal that is a kind's name: `"kubernetes"` and `"aws"` never; `"local"` only
  as the default of a `typer.Option` / `typer.Argument` (`--cluster local`, `launch up local`):
  there it is the built-in cluster *name*, which cluster.definition.builtin_cluster resolves;
  and as a path component (`... / "local" / "secrets"`: the directory under $LLMLAUNCH_HOME
  where the launcher writes the 0600 credentials file a job of its own machine reads);
- no `kube` variable (the flag the launcher used to branch on).
Words in messages and help texts ("a Kubernetes cluster", "a local cluster's workers") are
not checked: they describe, they do not decide.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster import KINDS, Provider, provider
from tests.conftest import REPO

LAUNCHER = sorted((REPO / "launcher").glob("*.py"))

KIND_COMPARISON = re.compile(r"\.kind\s*(==|!=|(not\s+)?in\b)|(==|!=)\s*[\w.]*\.kind\b")
KIND_MODULE_IMPORT = re.compile(r"^\s*(from|import)\s+cluster\.(local|kubernetes|aws)\w*"
                                r"|^\s*from\s+cluster\s+import\s+.*\b(local|kubernetes\w*|aws\w*)\b", re.M)
KIND_LITERAL = re.compile(r"""(["'])(kubernetes|aws)\1""")
LOCAL_LITERAL = re.compile(r"""(["'])local\1""")
LOCAL_AS_DEFAULT_NAME = re.compile(r"""typer\.(Option|Argument)\(\s*$""")
LOCAL_AS_PATH = re.compile(r"""/\s*$""")
KUBE_FLAG = re.compile(r"\bkube\b")


def kind_namings(text: str) -> list[str]:
    """The lines of `text` that name a cluster kind, as the module docstring defines it."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if KIND_COMPARISON.search(code) or KIND_LITERAL.search(code) or KUBE_FLAG.search(code):
            found.append(f"{number}: {line.strip()}")
            continue
        for m in LOCAL_LITERAL.finditer(code):
            before = code[:m.start()]
            if not (LOCAL_AS_DEFAULT_NAME.search(before) or LOCAL_AS_PATH.search(before)):
                found.append(f"{number}: {line.strip()}")
                break
    found += [f"import: {m.group(0).strip()}" for m in KIND_MODULE_IMPORT.finditer(text)]
    return found


def test_the_check_finds_what_the_launcher_used_to_branch_on():
    """Lines of launcher/cli.py before the interface: each is caught; the allowed uses are not."""
    for line in ['kube = definition.kind == "kubernetes"',
                 'if definition.kind == "local":  # its workers run in this Python environment',
                 'if definition.kind != "kubernetes":',
                 'if st.kind in ("aws", "kubernetes"):',
                 'if prov is not None and status.kind != wanted:',
                 'elif wanted == definition.kind:',
                 "        from cluster.kubernetes import capacity",
                 "    from cluster import kubernetes",
                 "    from cluster.aws_render import ConfigError",
                 "    address = prov.up(definition, **({'update': False} if kube else {}))",
                 'if name == "local":',
                 'return provider("aws")']:
        assert kind_namings(line), line
    for line in ['ClusterOpt = typer.Option("local", "--cluster", "-c", help="Cluster name or `local`.")',
                 'def up(cluster: str = typer.Argument("local", help="Cluster name or `local`.")) -> None:',
                 '    hint="`launch run --dry-run` shows what a local run would do")',
                 '    help="Kubernetes: a RayJob whose cluster lives as long as this run")',
                 "    if prov.USES_THIS_PYTHON:  # its workers run in this Python environment",
                 "    from cluster import ConfigError, ProviderError, provider",
                 '    if kind == "started":  # a search event',
                 '    directory = Path(home).expanduser() / "local" / "secrets"']:
        assert not kind_namings(line), line


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_names_no_cluster_kind(path: Path):
    assert kind_namings(path.read_text()) == [], f"{path.name}: decide through the provider interface"


INTERFACE = [name for name in {**Provider.__annotations__, **vars(Provider)} if not name.startswith("_")]
OPTIONAL = {"documents": "render", "run_ephemeral": "ephemeral"}  # only where supports(feature)


def test_the_interface_is_what_the_protocol_lists():
    assert {"READS_LOCAL_FILES", "USES_THIS_PYTHON", "CLUSTER_CREDENTIALS", "render", "validate", "capacity",
            "up", "status", "address", "job_address", "down", "max_failures", "supports"} | set(OPTIONAL) \
        == set(INTERFACE)


@pytest.mark.parametrize("kind", KINDS)
def test_every_provider_module_has_the_whole_interface(kind):
    import inspect

    module = provider(kind)
    for name in INTERFACE:
        if name in OPTIONAL and not module.supports(OPTIONAL[name]):
            assert not hasattr(module, name), f"cluster.{kind}.{name} without supports({OPTIONAL[name]!r})"
            continue
        assert hasattr(module, name), f"cluster.{kind} lacks {name}"
    assert isinstance(module.READS_LOCAL_FILES, bool) and isinstance(module.USES_THIS_PYTHON, bool)
    assert module.CLUSTER_CREDENTIALS is None or isinstance(module.CLUSTER_CREDENTIALS, str)
    # the keywords the launcher calls with
    assert "update" in inspect.signature(module.up).parameters
    assert "on_progress" in inspect.signature(module.down).parameters
    assert list(inspect.signature(module.job_address).parameters)[:2] == ["definition", "job_id"]


def test_what_each_kind_says():
    from launcher.clusters import load_cluster

    local, k8s, aws = (provider(k) for k in ("local", "kubernetes", "aws"))
    assert (local.READS_LOCAL_FILES, local.USES_THIS_PYTHON, local.CLUSTER_CREDENTIALS) == (True, True, None)
    for remote in (k8s, aws):
        assert not remote.READS_LOCAL_FILES and not remote.USES_THIS_PYTHON and remote.CLUSTER_CREDENTIALS
    assert "storage Secret" in k8s.CLUSTER_CREDENTIALS and "instance profile" in aws.CLUSTER_CREDENTIALS
    # local: known once the head runs (checked after `up`); kubernetes: the groups at max size
    assert local.capacity(load_cluster("local")) is None
    assert k8s.capacity(load_cluster(str(REPO / "configs/clusters/prod.yaml")))["GPU"] > 0
    assert [k for k in KINDS if provider(k).supports("ephemeral")] == ["kubernetes"]
    assert [k for k in KINDS if provider(k).supports("render")] == ["kubernetes", "aws"]


# ---------------------------------------------------------------- the job's restart limit


def aws_definition(spot: bool = True, **changes):
    import yaml

    from cluster.definition import parse_cluster

    data = yaml.safe_load((REPO / "configs/clusters/aws-example.yaml").read_text())
    data.pop("max_failures")  # the default: 3 with spot workers, else 0
    data["name"] = "aws-dev"
    if not spot:
        data["workers"][0].update(spot=False, on_demand_fallback=None)
    data.update(changes)
    return parse_cluster(data)


def job_env(definition, *overrides: str) -> dict[str, str]:
    from launcher import submit
    from launcher.config import load_spec

    spec = load_spec(REPO / "configs/examples/prod_sft.yaml", list(overrides))
    prov = provider(definition.kind)
    return submit.job_env(spec, "20260101-000000-abcd", cluster_credentials=prov.CLUSTER_CREDENTIALS,
                          max_failures=prov.max_failures(definition))


def test_a_spot_aws_cluster_gives_the_job_a_restart_limit():
    from trainers.entry import MAX_FAILURES_ENV

    assert MAX_FAILURES_ENV == "LLMLAUNCH_MAX_FAILURES"
    assert job_env(aws_definition())[MAX_FAILURES_ENV] == "3"  # spot workers: preemptions are expected
    assert job_env(aws_definition(max_failures=5))[MAX_FAILURES_ENV] == "5"
    assert job_env(aws_definition(max_failures=-1))[MAX_FAILURES_ENV] == "-1"  # Ray Train: no limit
    assert MAX_FAILURES_ENV not in job_env(aws_definition(spot=False))  # unset: 0 in trainers.entry.fit
    # a run's own limit in its `env` wins over the cluster's
    assert job_env(aws_definition(), f"env.{MAX_FAILURES_ENV}=0")[MAX_FAILURES_ENV] == "0"


def test_local_and_kubernetes_jobs_keep_the_default_of_no_restarts():
    from launcher.clusters import load_cluster
    from trainers.entry import MAX_FAILURES_ENV

    for name in ("local", str(REPO / "configs/clusters/prod.yaml")):
        definition = load_cluster(name)
        assert provider(definition.kind).max_failures(definition) == 0
        assert MAX_FAILURES_ENV not in job_env(definition, "checkpoint.storage=s3://b/runs")


def test_a_bad_restart_limit_in_the_spec_is_refused_before_anything_starts():
    from launcher import preflight
    from launcher.config import load_spec
    from launcher.errors import SpecError

    for value in ("abc", "-2", "1.5"):
        spec = load_spec(REPO / "configs/examples/prod_sft.yaml", [f"env.LLMLAUNCH_MAX_FAILURES={value}"])
        with pytest.raises(SpecError, match="env.LLMLAUNCH_MAX_FAILURES: restarts after a lost node"):
            preflight.check_spec(spec, "x", remote=True)


def test_credentials_stay_on_the_launchers_machine_for_remote_kinds(monkeypatch):
    """Only a local cluster's jobs get this machine's AWS_* variables (in a 0600 file); an AWS
    cluster's nodes use their instance profile, a Kubernetes cluster's pods its Secret."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "marker-not-to-be-copied")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    env = job_env(aws_definition())
    assert not [k for k in env if k.startswith("AWS_")] and "LLMLAUNCH_SECRETS_FILE" not in env
    assert "marker-not-to-be-copied" not in repr(env)
