"""`launch render / up / status / run / down --cluster aws-dev` (kind: aws) through the real
CLI, in a subprocess as a user runs it, against moto in server mode on 127.0.0.1
(tests/fixtures/moto_server.py). No Ray cluster is started, here or anywhere: moto's
instances never boot.

The definition is `configs/clusters/aws-example.yaml`, copied as docs/aws.md tells a user to
(`aws-dev.yaml`, the file name is the cluster's name) into a directory that
$LLMLAUNCH_CLUSTERS names, with an AMI registered in moto (it has none of AWS's).

What this shows: `render` prints a config that parses and passed Ray's and botocore's checks,
contacting nothing; a bad definition is exit 2 naming its file and the path, no traceback;
`up` goes through pre-flight, the security group and Ray's create_or_update_cluster, which
launches the head, and then says clearly that SSH never came up; `status` lists that instance;
`run` checks the spec for a remote cluster (no local paths) and its resources against the
cluster's capacity before anything is provisioned, and uses the existing head rather than
launching another; `down` terminates the instance (boto3 against moto says so); the marker
credentials of the environment appear in no output.

What it cannot show (see also tests/integration/test_aws_moto.py): SSH, `ray start`, the SSH
tunnel, a job submitted through the Jobs API and its restarts (`max_failures`), spot capacity,
quotas and prices. AUTOSCALER_NODE_START_WAIT_S=-1 (read by Ray when it is imported) makes
Ray give up waiting for SSH before its first attempt, as it does after 900 s on AWS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import boto3
import pytest
import yaml

from tests.conftest import REPO, output
from tests.fixtures.moto_server import MARKERS, aws_env, create_instance_profile, moto  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration
EXAMPLE = REPO / "configs" / "clusters" / "aws-example.yaml"
SPEC = "configs/examples/prod_sft.yaml"  # docs/aws.md's run spec: hub model, S3 data and storage


def launch(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    assert not [m for m in MARKERS if m in output(proc)], "a credential value was printed"
    assert "Traceback" not in output(proc), output(proc)[-3000:]  # Ray's log lines too
    return proc


def write_definition(directory, ami: str = "ami-0123456789abcdef0", **changes) -> str:
    """aws-example.yaml as a user copies it, to `<directory>/aws-dev.yaml`; returns its path."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(ami=ami, **changes)
    directory.mkdir(exist_ok=True)
    path = directory / "aws-dev.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No AWS at all: no credentials, and an endpoint where nothing listens."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/llmlaunch-tests")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/llmlaunch-tests")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("LLMLAUNCH_HOME", str(tmp_path / "llmlaunch"))
    monkeypatch.setenv("LLMLAUNCH_CLUSTERS", str(tmp_path / "clusters"))
    return tmp_path / "clusters"


@pytest.fixture
def account(moto, monkeypatch, tmp_path):
    """A fresh moto account with what docs/aws.md has an admin make (the two instance profiles),
    an AMI, the environment pointed at it (marker credentials, $HOME in tmp for Ray's key) and
    aws-dev.yaml in $LLMLAUNCH_CLUSTERS. Yields the definition's path."""
    moto.reset()
    aws_env(moto, monkeypatch, home=tmp_path / "home")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LLMLAUNCH_HOME", str(tmp_path / "llmlaunch"))
    monkeypatch.setenv("LLMLAUNCH_CLUSTERS", str(tmp_path / "clusters"))
    for name in ("llmlaunch-node", "llmlaunch-head"):
        create_instance_profile(name)
    ami = boto3.client("ec2").register_image(Name="dl-base-ubuntu-22.04", Architecture="x86_64",
                                             RootDeviceName="/dev/sda1")["ImageId"]
    yield write_definition(tmp_path / "clusters", ami)


def instances(states=("pending", "running")) -> list[dict]:
    reply = boto3.client("ec2").describe_instances(Filters=[
        {"Name": "tag:ray-cluster-name", "Values": ["aws-dev"]}, {"Name": "instance-state-name", "Values": list(states)}])
    return [i for r in reply["Reservations"] for i in r["Instances"]]


def test_render_prints_the_validated_cluster_launcher_config_and_contacts_nothing(offline):
    from cluster.aws_render import validate

    path = write_definition(offline)
    proc = launch("render", SPEC, "--cluster", "aws-dev")
    assert proc.returncode == 0, output(proc)
    [config] = yaml.safe_load_all(proc.stdout)
    assert config["cluster_name"] == "aws-dev" and config["provider"]["type"] == "aws"
    types = {name: t["node_config"]["InstanceType"] for name, t in config["available_node_types"].items()}
    assert types == {"head": "m6i.xlarge", "gpu": "g5.12xlarge", "gpu-on-demand": "g5.12xlarge"}
    assert config["available_node_types"]["gpu"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "aws_credentials" not in config["provider"] and "8265" not in proc.stdout
    validate(config, path)  # what was printed passes Ray's schema and botocore's RunInstances shape again
    assert "`launch up aws-dev` starts it" in proc.stderr
    # with --ephemeral there is no such thing on AWS
    proc = launch("render", SPEC, "--cluster", "aws-dev", "--ephemeral")
    assert proc.returncode == 2 and "--ephemeral needs a kubernetes cluster; aws-dev is aws" in proc.stderr


@pytest.mark.parametrize("change,words", [
    # refused by the definition's own model: node_config may not set what a field sets
    ({"workers": [{"name": "gpu", "instance_type": "g5.12xlarge", "spot": True,
                   "node_config": {"InstanceMarketOptions": {"MarketType": "spott"}}}]},
     ["workers[0]: node_config.InstanceMarketOptions: set `spot / spot_max_price` instead", "'spott'"]),
    # refused by the check of the rendered config (botocore's RunInstances shape, enums too)
    ({"head": {"instance_type": "m6i.xlarge", "iam_instance_profile": "llmlaunch-head",
               "node_config": {"MetadataOptions": {"HttpTokens": "requird"}}}},
     ["available_node_types.head.node_config.MetadataOptions.HttpTokens", "'requird' is not one of: optional, required",
      "hint: fix `head.node_config.MetadataOptions`"]),
])
@pytest.mark.parametrize("command", [("render", SPEC, "--cluster", "aws-dev"), ("up", "aws-dev"),
                                     (SPEC, "--cluster", "aws-dev", "--dry-run")])
def test_a_bad_definition_is_exit_2_naming_its_file_and_the_path(offline, change, words, command):
    path = write_definition(offline, **change)
    proc = launch(*command)
    assert proc.returncode == 2, output(proc)
    assert f"error: {path}: 1 problem" in proc.stderr
    for w in words:
        assert w in proc.stderr
    assert proc.stdout == ""


def test_run_checks_the_spec_and_the_capacity_before_anything_is_provisioned(account):
    # local paths: the nodes cannot read this machine's files (nothing is contacted for this)
    proc = launch("configs/examples/quickstart.yaml", "--cluster", "aws-dev")
    assert proc.returncode == 2, output(proc)
    for field in ("checkpoint.storage", "model.path", "data.train[0].path"):
        assert f"{field}: a remote cluster cannot read this machine's files" in proc.stderr
    # a credential in the spec's env would sit in the job's runtime_env
    proc = launch(SPEC, "--cluster", "aws-dev", "env.AWS_SECRET_ACCESS_KEY=x")
    assert proc.returncode == 2 and "the nodes' instance profile" in proc.stderr, output(proc)
    # 64 GPU workers; the worker types give 4 x 4 spot + 4 x 4 on-demand GPUs at most (EC2's sizes)
    proc = launch(SPEC, "--cluster", "aws-dev", "resources.workers=64")
    assert proc.returncode == 2, output(proc)
    assert "64 workers x 1 GPUs need 64 GPUs; cluster aws-dev has 32" in proc.stderr
    # --dry-run: the spec as it would be submitted, `gpus_per_worker: auto` resolved from the capacity
    proc = launch(SPEC, "--cluster", "aws-dev", "resources.gpus_per_worker=auto", "--dry-run", "--json")
    assert proc.returncode == 0, output(proc)
    out = json.loads(proc.stdout)
    assert out["spec"]["resources"]["gpus_per_worker"] == 1 and out["cluster"]["kind"] == "aws"
    assert [m["cluster_name"] for m in out["manifests"]] == ["aws-dev"]
    assert instances() == []  # nothing was launched
    groups = boto3.client("ec2").describe_security_groups(Filters=[{"Name": "group-name",
                                                                    "Values": ["llmlaunch-aws-dev"]}])
    assert groups["SecurityGroups"] == []


def test_up_status_run_down_against_moto(account):
    """`launch up` launches the head through Ray's own launcher and reports that SSH never came
    up; `status` lists it; `run` reuses it (and fails the same way, submitting nothing); `down`
    terminates it."""
    no_ssh = {"AUTOSCALER_NODE_START_WAIT_S": "-1"}
    proc = launch("up", "aws-dev", env=no_ssh)
    assert proc.returncode == 3, output(proc)
    assert "pre-flight: credentials, instance types (g5.12xlarge, m6i.xlarge)" in proc.stderr
    assert "created security group llmlaunch-aws-dev" in proc.stderr
    assert "error: the head of aws-dev was launched but Ray could not set it up over SSH" in proc.stderr
    assert "hint: SSH comes in from `security_group.ssh_cidrs` only" in proc.stderr
    assert "`launch down aws-dev` terminates it" in proc.stderr
    [head] = instances()
    assert head["InstanceType"] == "m6i.xlarge" and "InstanceLifecycle" not in head
    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/llmlaunch-head")

    proc = launch("status", "aws-dev")
    assert proc.returncode == 0, output(proc)
    lines = proc.stderr.splitlines()
    assert lines[0] == (f"aws-dev (aws): head {head['InstanceId']} is running, Ray status update-failed "
                        "(`launch up aws-dev` again, or `launch down aws-dev`)")
    [node] = [ln for ln in lines[1:] if head["InstanceId"] in ln]
    for part in ("kind=head", "node_type=head", "instance_type=m6i.xlarge", "lifecycle=on-demand", "state=running",
                 "ray_status=update-failed", "zone=us-east-1a"):
        assert part in node
    status = json.loads(launch("status", "aws-dev", "--json").stdout)
    assert status["cluster"]["running"] is False and status["jobs"] == []
    assert [n["instance"] for n in status["cluster"]["nodes"]] == [head["InstanceId"]]

    # A run: the spec passes the remote checks; storage this machine cannot reach (moto has no
    # my-bucket) is a warning, the nodes use their instance profile; then `up` without
    # update finds the head not set up and asks Ray again, which reuses the same instance.
    proc = launch(SPEC, "--cluster", "aws-dev", env=no_ssh)
    assert proc.returncode == 3, output(proc)
    assert "warning: checkpoint.storage:" in proc.stderr
    assert "the cluster's jobs use the nodes' instance profile (`iam_instance_profile`)" in proc.stderr
    assert "could not set it up over SSH" in proc.stderr and "submitted job" not in proc.stderr
    assert [i["InstanceId"] for i in instances()] == [head["InstanceId"]]

    proc = launch("down", "aws-dev")
    assert proc.returncode == 0, output(proc)
    assert f"terminating 1 instance(s) of aws-dev: {head['InstanceId']}" in proc.stderr
    assert "cluster aws-dev stopped" in proc.stderr
    assert instances() == []
    assert [i["InstanceId"] for i in instances(states=("terminated",))] == [head["InstanceId"]]
    proc = launch("down", "aws-dev")
    assert proc.returncode == 0 and "cluster aws-dev was not running" in proc.stderr
    proc = launch("status", "aws-dev")
    assert proc.returncode == 0 and "aws-dev (aws): no head instance (`launch up aws-dev`)" in proc.stderr


def test_missing_credentials_are_exit_3_with_a_hint(account, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    for command in (("up", "aws-dev"), (SPEC, "--cluster", "aws-dev")):
        proc = launch(*command)
        assert proc.returncode == 3, output(proc)
        assert "no AWS credentials found on this machine" in proc.stderr and "aws configure" in proc.stderr
    assert instances() == []
