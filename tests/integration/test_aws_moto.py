"""`kind: aws` against moto in server mode: a real HTTP AWS endpoint on 127.0.0.1.

What these tests show, with Ray's own AWS code (no Ray cluster is started):
- Ray's bootstrap (`ray.autoscaler.sdk.bootstrap_config`: prepare_config, the instance-type
  resource fill-in, validate_config, `bootstrap_aws`) accepts the rendered shipped example,
  keeps the definition's instance profiles, and uses the security group the launcher made
  (SSH from the definition's CIDRs only) instead of making its own (SSH from 0.0.0.0/0);
- Ray's node provider (`AWSNodeProvider.create_node`) launches the head and worker node types
  with the right instance types, instance profiles, spot market options and tags;
- our `down` terminates every instance (cache_stopped_nodes: false: terminated, not stopped);
- our pre-flight lookups (instance types, zones, subnets, AMIs, instance profiles, key pair)
  run against the same server, with the right errors for what is missing;
- no credential value (the markers of tests/fixtures/moto_server.py) appears in any output.

What moto cannot show:
- nodes never boot: there is no SSH, so `ray start`, the setup commands, the SSH tunnel to
  the Jobs API and a job are out of scope, and so is `launch up` past its pre-flight (Ray
  would SSH to the fake public IP moto hands out; these tests talk to 127.0.0.1 only);
- moto launches MinCount instances only: Ray sends MinCount 1, MaxCount n, so a request for
  2 workers gives 1 here (EC2 may give any number up to n);
- spot capacity, quotas and prices do not exist in moto (InsufficientInstanceCapacity and
  the quota errors are mapped in tests/unit/test_aws_render.py), and moto gives spot
  instances no spot request id;
- IAM is not enforced: that the head's role may launch workers and the workers' may read S3
  is for an admin to set up (docs/aws.md), and AWS-managed policies exist in moto only with
  MOTO_IAM_LOAD_MANAGED_POLICIES=true (the profiles here are made as an admin would, without).
"""

from __future__ import annotations

import json

import boto3
import pytest
import yaml

from cluster import ProviderError, aws
from cluster.aws_preflight import preflight
from cluster.aws_render import ingress_problems
from cluster.definition import parse_cluster
from tests.conftest import REPO
from tests.fixtures.moto_server import MARKERS, aws_env, create_instance_profile, moto  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration
EXAMPLE = REPO / "configs" / "clusters" / "aws-example.yaml"


@pytest.fixture
def account(moto, monkeypatch, tmp_path, capfd):
    """A fresh account on the module's moto server, the environment pointed at it, and $HOME in
    tmp (Ray writes its default key there). After the test: no marker in anything printed."""
    moto.reset()
    aws_env(moto, monkeypatch, home=tmp_path / "home")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LLMLAUNCH_HOME", str(tmp_path / "llmlaunch"))
    yield moto
    out, err = capfd.readouterr()
    assert not [m for m in MARKERS if m in out + err], "a credential value was printed"


def admin_setup(profiles=("llmlaunch-node", "llmlaunch-head")) -> str:
    """What docs/aws.md has an admin do: instance profiles; here also an AMI (moto has none of ours)."""
    for name in profiles:
        create_instance_profile(name)
    return boto3.client("ec2").register_image(Name="dl-base-ubuntu-22.04", Architecture="x86_64",
                                              RootDeviceName="/dev/sda1")["ImageId"]


def example(ami: str, **changes):
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(name="aws-dev", ami=ami, **changes)
    return parse_cluster(data)


def instances(name: str, states=("pending", "running")) -> list[dict]:
    reply = boto3.client("ec2").describe_instances(Filters=[
        {"Name": "tag:ray-cluster-name", "Values": [name]}, {"Name": "instance-state-name", "Values": list(states)}])
    return [i for r in reply["Reservations"] for i in r["Instances"]]


def security_group(name: str) -> dict:
    groups = boto3.client("ec2").describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])
    assert len(groups["SecurityGroups"]) == 1
    return groups["SecurityGroups"][0]


def test_ray_bootstraps_and_launches_the_example_and_down_terminates_it(account):
    from ray.autoscaler import sdk
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    d = example(admin_setup())
    progress = []
    types = preflight(d, progress.append)
    assert types["g5.12xlarge"]["GPU"] == 4 and types["m6i.xlarge"]["CPU"] == 4
    assert aws.capacity(d) == {"CPU": 48 * 8, "GPU": 4 * 8}  # spot and fallback types, at max_workers
    group_id = aws.ensure_security_group(d, on_progress=progress.append)
    assert any("created security group llmlaunch-aws-dev" in p for p in progress)

    config = aws.validate(d)
    resolved = sdk.bootstrap_config(config, no_config_cache=True)  # Ray's own bootstrap, as `ray up`
    node_types = resolved["available_node_types"]
    assert {n: t["node_config"]["SecurityGroupIds"] for n, t in node_types.items()} == {
        n: [group_id] for n in ("head", "gpu", "gpu-on-demand")}
    assert node_types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "llmlaunch-head"}
    assert "IamInstanceProfile" not in resolved["head_node"]  # Ray made no ray-autoscaler-v1 profile
    assert node_types["gpu"]["resources"]["GPU"] == 4 and node_types["gpu"]["resources"]["accelerator_type:A10G"] == 1
    assert node_types["head"]["resources"]["CPU"] == 0  # the definition's, over Ray's autodetected 4
    zones = {s["SubnetId"]: s["AvailabilityZone"] for s in boto3.client("ec2").describe_subnets()["Subnets"]}
    assert [zones[s] for s in node_types["gpu"]["node_config"]["SubnetIds"]] == ["us-east-1a", "us-east-1b", "us-east-1c"]
    # Ray found the launcher's group and left its rules alone: no SSH from 0.0.0.0/0, no 8265
    rules = security_group("llmlaunch-aws-dev")["IpPermissions"]
    assert ingress_problems(rules, ("203.0.113.0/24",)) == []
    flat = aws._flat_rules(rules)
    assert flat == {("-1", None, None, "GroupId", group_id), ("tcp", 22, 22, "CidrIp", "203.0.113.0/24")}
    assert not [m for m in MARKERS if m in json.dumps(resolved)]  # this config is copied to the head

    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    launch = {"head": ({"ray-node-type": "head", "ray-node-name": "ray-aws-dev-head"}, 1),
              "gpu": ({"ray-node-type": "worker"}, 2), "gpu-on-demand": ({"ray-node-type": "worker"}, 1)}
    for node_type, (node_tags, count) in launch.items():
        node_tags = {**node_tags, "ray-user-node-type": node_type, "ray-launch-config": "test",
                     "ray-node-status": "uninitialized"}
        provider.create_node(node_types[node_type]["node_config"], node_tags, count)

    launched = {}
    for i in instances("aws-dev"):
        t = {x["Key"]: x["Value"] for x in i["Tags"]}
        launched.setdefault(t["ray-user-node-type"], []).append((i, t))
    # moto launches MinCount (1) of Ray's MinCount 1 / MaxCount 2
    assert {k: len(v) for k, v in launched.items()} == {"head": 1, "gpu": 1, "gpu-on-demand": 1}
    expect = {"head": ("m6i.xlarge", "llmlaunch-head", None), "gpu": ("g5.12xlarge", "llmlaunch-node", "spot"),
              "gpu-on-demand": ("g5.12xlarge", "llmlaunch-node", None)}
    for node_type, [(i, t)] in launched.items():
        itype, profile, lifecycle = expect[node_type]
        assert i["InstanceType"] == itype
        assert i["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{profile}")
        assert i.get("InstanceLifecycle") == lifecycle
        assert i["KeyName"] == "ray-autoscaler_us-east-1"  # Ray's default key pair
        assert [g["GroupId"] for g in i["SecurityGroups"]] == [group_id]
        assert i["Placement"]["AvailabilityZone"] == "us-east-1a"  # Ray's first zone
        assert {k: t[k] for k in ("ray-cluster-name", "llmlaunch-cluster", "team", "project", "cost-centre")} == {
            "ray-cluster-name": "aws-dev", "llmlaunch-cluster": "aws-dev", "team": "ml-platform",
            "project": "llm-finetuning", "cost-centre": "4711"}
    assert launched["head"][0][1]["Name"] == "ray-aws-dev-head"

    st = aws.status(d)
    assert not st.running and "Ray status uninitialized" in st.detail
    assert "1 node(s) on the on-demand fallback gpu-on-demand" in st.detail
    assert sorted(n["node_type"] for n in st.nodes) == ["gpu", "gpu-on-demand", "head"]
    # what Ray's updater tags once SSH and `ray start` succeeded (which moto cannot show)
    boto3.client("ec2").create_tags(Resources=[n["instance"] for n in st.nodes],
                                    Tags=[{"Key": "ray-node-status", "Value": "up-to-date"}])
    st = aws.status(d)
    assert st.running and st.resources == {"CPU": 96.0, "GPU": 8.0}  # the workers; the head holds no CPUs for Ray

    assert aws.down(d, progress.append) is True
    assert instances("aws-dev") == []
    assert len(instances("aws-dev", states=("terminated",))) == 3  # terminated, not stopped
    assert aws.down(d) is False
    assert not aws.status(d).running


def test_preflight_refuses_an_instance_type_the_region_does_not_have(account):
    ami = admin_setup()
    data = yaml.safe_load(EXAMPLE.read_text())
    data["workers"][0]["instance_type"] = "g5.96xlarge"
    d = parse_cluster({**data, "name": "aws-dev", "ami": ami})
    with pytest.raises(ProviderError) as e:
        preflight(d)
    assert str(e.value) == "workers[0].instance_type: instance type g5.96xlarge does not exist in us-east-1"
    assert "describe-instance-types" in e.value.hint
    # `up` stops at the same place: nothing launched, no security group made
    with pytest.raises(ProviderError):
        aws.up(d, on_progress=None)
    assert instances("aws-dev") == []
    groups = boto3.client("ec2").describe_security_groups(Filters=[{"Name": "group-name", "Values": ["llmlaunch-aws-dev"]}])
    assert groups["SecurityGroups"] == []


def test_preflight_refuses_a_missing_instance_profile(account):
    ami = admin_setup(profiles=("llmlaunch-node",))  # the head's profile was never made
    with pytest.raises(ProviderError) as e:
        preflight(example(ami))
    assert "instance profile llmlaunch-head" in str(e.value) and "Instance profiles" in e.value.hint
    boto3.client("iam").create_instance_profile(InstanceProfileName="llmlaunch-head")  # made, but without a role
    with pytest.raises(ProviderError) as e:
        preflight(example(ami))
    assert "has no role" in str(e.value) and "add-role-to-instance-profile" in e.value.hint


@pytest.mark.parametrize("changes,words", [
    (dict(availability_zones=["us-east-1a", "us-east-1q"]), "availability_zones: us-east-1q not in us-east-1"),
    (dict(subnet_ids=["subnet-0123456789abcdef0"]), "a subnet in `subnet_ids` does not exist"),
    (dict(ami="ami-0123456789abcdef0"), "the AMI does not exist in us-east-1"),
    (dict(ssh_key={"key_pair_name": "ml-team", "private_key_path": "/nonexistent/ml-team.pem"}), "no such EC2 key pair"),
])
def test_preflight_names_what_does_not_exist(account, changes, words):
    d = example(admin_setup(), **{k: v for k, v in changes.items() if k != "ami"})
    if "ami" in changes:
        d = example(changes["ami"])
    with pytest.raises(ProviderError) as e:
        preflight(d)
    assert words in str(e.value) and e.value.hint


def test_preflight_with_missing_credentials(account, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    with pytest.raises(ProviderError) as e:
        preflight(example("ami-0123456789abcdef0"))
    assert "no AWS credentials found" in str(e.value) and "aws configure" in e.value.hint


def test_security_group_follows_the_definition_and_foreign_groups_are_not_used(account):
    ami = admin_setup()
    first = aws.ensure_security_group(example(ami))
    moved = example(ami, security_group={"ssh_cidrs": ["198.51.100.0/24", "2001:db8::/32"]})
    assert aws.ensure_security_group(moved) == first
    assert aws._flat_rules(security_group("llmlaunch-aws-dev")["IpPermissions"]) == {
        ("-1", None, None, "GroupId", first), ("tcp", 22, 22, "CidrIp", "198.51.100.0/24"),
        ("tcp", 22, 22, "CidrIpv6", "2001:db8::/32")}

    # a group of that name that is not the launcher's, open to the world: refused, left as it is
    ec2 = boto3.client("ec2")
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    other = ec2.create_security_group(GroupName="team-ml", Description="someone's", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=other, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    with pytest.raises(ProviderError) as e:
        aws.ensure_security_group(example(ami, security_group={"ssh_cidrs": ["203.0.113.0/24"], "name": "team-ml"}))
    assert "is not the launcher's" in str(e.value) and "8265" in str(e.value)
    # the same group named in `ids` (used as is): pre-flight refuses it
    with pytest.raises(ProviderError) as e:
        preflight(example(ami, security_group={"ids": [other]}))
    assert other in str(e.value) and "8265" in str(e.value) and "SSH" in e.value.hint


UP_SCRIPT = """
import json, sys
from cluster import ProviderError, aws
from cluster.definition import parse_cluster
try:
    aws.up(parse_cluster(json.loads(sys.argv[1])), on_progress=lambda m: print("progress:", m, file=sys.stderr))
    print(json.dumps({"ok": True}))
except ProviderError as e:
    print(json.dumps({"error": str(e), "hint": e.hint}))
"""


def test_up_launches_the_head_through_rays_launcher_and_explains_ssh_that_never_comes_up(account, tmp_path):
    """`launch up`'s own code, end to end as far as moto goes: pre-flight, the security group,
    Ray's create_or_update_cluster launching the head. Ray then waits for SSH for
    AUTOSCALER_NODE_START_WAIT_S (900 s by default; read from the environment when Ray is
    imported): -1 here, so Ray gives up before its first SSH attempt (moto's IPs lead nowhere)
    and reports "Failed to setup head node." with the head left running, as on AWS."""
    import os
    import subprocess
    import sys

    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(name="aws-dev", ami=admin_setup())
    env = {**os.environ, "AUTOSCALER_NODE_START_WAIT_S": "-1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", UP_SCRIPT, json.dumps(data)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert not [m for m in MARKERS if m in proc.stdout + proc.stderr]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "could not set it up over SSH" in result["error"], proc.stderr[-3000:]
    assert "ssh_cidrs" in result["hint"] and "launch down aws-dev" in result["hint"]
    assert "progress: pre-flight: credentials, instance types" in proc.stderr
    assert "progress: created security group llmlaunch-aws-dev" in proc.stderr
    assert "Failed to setup head node" in proc.stdout + proc.stderr  # Ray's own words

    [head] = instances("aws-dev")
    t = {x["Key"]: x["Value"] for x in head["Tags"]}
    assert (t["ray-node-type"], t["ray-user-node-type"], t["ray-node-status"]) == ("head", "head", "update-failed")
    assert head["InstanceType"] == "m6i.xlarge" and "InstanceLifecycle" not in head
    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/llmlaunch-head")
    assert [g["GroupName"] for g in head["SecurityGroups"]] == ["llmlaunch-aws-dev"]
    assert ingress_problems(security_group("llmlaunch-aws-dev")["IpPermissions"], ("203.0.113.0/24",)) == []
    d = parse_cluster(data)
    st = aws.status(d)
    assert not st.running and "update-failed" in st.detail and "launch down aws-dev" in st.detail
    assert aws.address(d) is None  # no head that is set up: no tunnel is tried

    # Once the head is set up (Ray's updater tags it so after SSH), a `launch up` whose definition
    # changes the head's launch settings is refused: Ray would terminate the head and its jobs.
    boto3.client("ec2").create_tags(Resources=[head["InstanceId"]], Tags=[{"Key": "ray-node-status",
                                                                          "Value": "up-to-date"}])
    assert not aws.head_would_be_replaced(d, aws.validate(d), aws._head(d))  # Ray's hash, as Ray set it
    bigger = parse_cluster({**data, "head": {**data["head"], "disk_size_gb": 300}})
    with pytest.raises(ProviderError) as e:
        aws.up(bigger, on_progress=None)
    assert "Ray would terminate it" in str(e.value) and "launch down" in e.value.hint
    assert [i["InstanceId"] for i in instances("aws-dev")] == [head["InstanceId"]]

    assert aws.down(d) is True and instances("aws-dev") == []
