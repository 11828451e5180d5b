"""`kind: aws` definitions rendered to Ray cluster-launcher configs, offline.

What this proves: the shipped example and a matrix of options render to configs that Ray's
own `prepare_config` + `validate_config` (ray-schema.json) accept and whose every node_config
passes botocore's EC2 RunInstances shape and enum check; bad values are refused naming their
path; no inbound rule but SSH from the definition's CIDRs is rendered (never 8265); no
credential reaches a rendered config. What it cannot: that EC2 accepts the values (ids exist,
capacity, quotas) - tests/integration/test_aws_moto.py runs Ray's AWS code against moto.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from pydantic import ValidationError

from cluster import aws
from cluster.aws_errors import client_error, launch_error
from cluster.aws_render import ConfigError, ingress_problems, node_config_problems, render, validate
from cluster.aws_tunnel import key_path, tunnel_command
from cluster.definition import parse_cluster
from tests.conftest import REPO
from tests.fixtures.moto_server import MARKERS, MARKER_ACCESS_KEY, MARKER_SECRET_KEY, MARKER_SESSION_TOKEN

EXAMPLE = REPO / "configs" / "clusters" / "aws-example.yaml"


def example_data(**changes) -> dict:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.setdefault("name", "aws-example")
    data.update(changes)
    return data


def defn(**changes):
    return parse_cluster(example_data(**changes))


def worker(**fields) -> dict:
    return {"name": "gpu", "instance_type": "g5.12xlarge", "max_workers": 2, **fields}


def test_shipped_example_renders_and_passes_ray_and_botocore():
    from launcher.clusters import load_cluster

    d = load_cluster(str(EXAMPLE))
    assert d.kind == "aws" and d.name == "aws-example"  # the name is the file's (copies take theirs)
    config = render(d)
    prepared = validate(config, str(EXAMPLE), d)
    assert prepared["head_node_type"] == "head"
    assert config["provider"] == {
        "type": "aws", "region": "us-east-1", "cache_stopped_nodes": False,
        "availability_zone": "us-east-1a,us-east-1b,us-east-1c",
        "security_group": {"GroupName": "llmlaunch-aws-example", "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
             "IpRanges": [{"CidrIp": "203.0.113.0/24", "Description": "SSH from the launcher (llmlaunch)"}]}]}}
    types = config["available_node_types"]
    assert set(types) == {"head", "gpu", "gpu-on-demand"}
    head, spot, fallback = types["head"], types["gpu"], types["gpu-on-demand"]
    assert head["node_config"]["InstanceType"] == "m6i.xlarge" and "InstanceMarketOptions" not in head["node_config"]
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "llmlaunch-head"}
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0  # no training on the head
    assert spot["node_config"]["InstanceMarketOptions"] == {
        "MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    assert spot["node_config"]["IamInstanceProfile"] == {"Name": "llmlaunch-node"}
    assert fallback["node_config"]["InstanceType"] == "g5.12xlarge" and "InstanceMarketOptions" not in fallback["node_config"]
    assert spot["priority"] > fallback["priority"]  # Ray's autoscaler v2 tries spot first
    assert (spot["min_workers"], spot["max_workers"], fallback["min_workers"], fallback["max_workers"]) == (0, 4, 0, 4)
    assert config["max_workers"] == 8
    assert spot["node_config"]["BlockDeviceMappings"] == [
        {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 500, "VolumeType": "gp3", "DeleteOnTermination": True,
                                            "Encrypted": True}}]
    tag_specs = spot["node_config"]["TagSpecifications"]
    assert [s["ResourceType"] for s in tag_specs] == ["instance", "volume"]
    assert {t["Key"]: t["Value"] for t in tag_specs[0]["Tags"]} == {
        "llmlaunch-cluster": "aws-example", "team": "ml-platform", "project": "llm-finetuning", "cost-centre": "4711"}
    # Ray's own start commands; setup from the definition, nothing of Ray's defaults.yaml (a nightly wheel)
    from ray.autoscaler._private.providers import _get_default_config

    ray_defaults = _get_default_config({"type": "aws"})
    assert config["head_start_ray_commands"] == ray_defaults["head_start_ray_commands"]
    assert config["worker_start_ray_commands"] == ray_defaults["worker_start_ray_commands"]
    assert prepared["head_setup_commands"] == prepared["setup_commands"] == d.setup_commands
    assert d.effective_max_failures == 3
    # plain YAML out (no anchors from shared objects): what `launch render` prints
    assert "&id" not in yaml.safe_dump(config)


MATRIX = {
    "on-demand workers, Ray's default AMI, no zones": dict(
        ami=None, availability_zones=[], workers=[worker()]),
    "spot without fallback, one zone, max price": dict(
        availability_zones=["us-east-1b"], workers=[worker(spot=True, spot_max_price="3.25")]),
    "spot with a smaller fallback type, three zones": dict(
        workers=[worker(spot=True, on_demand_fallback={"instance_type": "g5.2xlarge", "max_workers": 1})]),
    "image instead of setup commands, Ray's key": dict(
        image="registry.example.com/ml/llmlaunch:0.1.0", setup_commands=[], workers=[worker(spot=True)]),
    "own key pair, subnets, internal IPs, IPv6 SSH": dict(
        ssh_key={"key_pair_name": "ml-team", "private_key_path": "~/.ssh/ml-team.pem"},
        subnet_ids=["subnet-0123456789abcdef0"], availability_zones=["us-east-1a"], use_internal_ips=True,
        security_group={"ssh_cidrs": ["10.20.0.0/16", "2001:db8::/32"], "name": "team-ml"}),
    "admin's security groups, per-type AMI and node_config": dict(
        security_group={"ids": ["sg-0123456789abcdef0"]}, ssh_user="ec2-user", root_device_name="/dev/xvda",
        workers=[worker(ami="ami-0fedcba9876543210", node_config={"MetadataOptions": {"HttpTokens": "required"},
                                                                   "EbsOptimized": True}),
                 worker(name="cpu", instance_type="m7i.8xlarge", min_workers=1, max_workers=3)]),
    "head only": dict(workers=[], head={"instance_type": "c7i.4xlarge"}),
}


@pytest.mark.parametrize("case", MATRIX)
def test_option_matrix_passes_ray_and_botocore(case):
    d = defn(**MATRIX[case])
    config = render(d)
    prepared = validate(config, "matrix.yaml", d)
    types = config["available_node_types"]
    for name, (where, _) in d.node_types().items():
        assert name in types and prepared["available_node_types"][name]["node_config"] == types[name]["node_config"]
    for w in d.workers:
        nc = types[w.name]["node_config"]
        assert ("InstanceMarketOptions" in nc) == w.spot
        if w.spot_max_price:
            assert nc["InstanceMarketOptions"]["SpotOptions"]["MaxPrice"] == w.spot_max_price
        if w.on_demand_fallback:
            fb = types[w.fallback_name]
            assert fb["node_config"]["InstanceType"] == (w.on_demand_fallback.instance_type or w.instance_type)
            assert "InstanceMarketOptions" not in fb["node_config"] and fb["min_workers"] == 0
        else:
            assert w.fallback_name not in types
        if w.ami:
            assert nc["ImageId"] == w.ami
    from cluster.aws_render import default_ami

    assert types["head"]["node_config"]["ImageId"] == (d.ami or default_ami(d.region))
    assert (config["docker"].get("image")) == d.image
    assert config["setup_commands"] == d.setup_commands
    assert config["provider"].get("availability_zone") == (",".join(d.availability_zones) or None)
    if d.ssh_key:
        assert config["auth"]["ssh_private_key"].endswith("/.ssh/ml-team.pem") and "~" not in config["auth"]["ssh_private_key"]
        assert all(t["node_config"]["KeyName"] == "ml-team" for t in types.values())
    else:
        assert "ssh_private_key" not in config["auth"] and all("KeyName" not in t["node_config"] for t in types.values())
    if d.subnet_ids:
        assert all(t["node_config"]["SubnetIds"] == d.subnet_ids for t in types.values())
    if d.security_group.ids:
        assert "security_group" not in config["provider"]
        assert all(t["node_config"]["SecurityGroupIds"] == d.security_group.ids for t in types.values())
    assert not d.workers or types["head"]["resources"] == {"CPU": 0}
    assert_no_open_ingress(config, d)


def assert_no_open_ingress(config: dict, d) -> None:
    """The only inbound rule rendered: tcp 22 from the definition's CIDRs. Never 8265."""
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        sources = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        assert sorted(sources) == sorted(d.security_group.ssh_cidrs)
        assert not rule.get("UserIdGroupPairs") and not rule.get("PrefixListIds")
    assert "8265" not in json.dumps(config["provider"])
    assert ingress_problems(rules, tuple(d.security_group.ssh_cidrs)) == []


def test_ssh_from_everywhere_only_when_the_definition_says_so():
    d = defn(security_group={"ssh_cidrs": ["0.0.0.0/0"]})
    config = render(d)
    validate(config, definition=d)  # explicit: accepted
    assert_no_open_ingress(config, d)
    # ...but a rendered rule the definition did not ask for is refused
    narrow = defn()
    with pytest.raises(ConfigError) as e:
        validate(config, "aws.yaml", narrow)
    assert e.value.path == "provider.security_group.IpPermissions" and "0.0.0.0/0 (everyone)" in e.value.problem


@pytest.mark.parametrize("rule,problem", [
    ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}, "8265"),
    ({"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}, "8265"),
    ({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "192.168.0.0/16"}]}, "8265"),
    ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, "8265"),
    ({"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, "everyone"),
    ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, "everyone"),
])
def test_ingress_rules_that_are_refused(rule, problem):
    problems = ingress_problems([rule], allowed_ssh=("203.0.113.0/24",))
    assert len(problems) == 1 and problem in problems[0]


def test_ingress_rules_that_are_fine():
    assert ingress_problems([
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0123456789abcdef0"}]},  # the nodes themselves
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ], allowed_ssh=("203.0.113.0/24", "0.0.0.0/0")) == []


def spot_config():
    d = defn()
    return d, render(d)


def refused(config, d=None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        validate(config, "configs/clusters/aws-dev.yaml", d)
    assert str(e.value).startswith(f"configs/clusters/aws-dev.yaml: {e.value.path}: ")
    return e.value


def test_market_type_typo_is_refused_although_botocore_passes_it():
    from botocore.validate import ParamValidator

    from cluster.aws_render import run_instances_shape

    d, config = spot_config()
    nc = config["available_node_types"]["gpu"]["node_config"]
    nc["InstanceMarketOptions"]["MarketType"] = "spott"
    params = {k: v for k, v in nc.items() if k != "SubnetIds"} | {"MinCount": 1, "MaxCount": 1}
    assert not ParamValidator().validate(params, run_instances_shape()).has_errors()  # why we check enums
    e = refused(config, d)
    assert e.path == "available_node_types.gpu.node_config.InstanceMarketOptions.MarketType"
    assert "'spott' is not one of: spot" in e.problem
    assert "`spot / spot_max_price`" in e.hint and "workers[0]" in e.hint


def test_unknown_node_config_key_from_the_definition_is_refused_naming_both_paths():
    d = defn(workers=[worker(node_config={"InstanceMetadataTags": "enabled"})])
    e = refused(render(d), d)
    assert e.path == "available_node_types.gpu.node_config.InstanceMetadataTags"
    assert "unknown RunInstances parameter" in e.problem and "MetadataOptions" in e.problem
    assert "`workers[0].node_config.InstanceMetadataTags`" in e.hint


@pytest.mark.parametrize("edit,path,words", [
    (lambda t: t["gpu"]["node_config"]["BlockDeviceMappings"][0]["Ebs"].update(VolumeSize="500GB"),
     "available_node_types.gpu.node_config.BlockDeviceMappings[0].Ebs.VolumeSize", "valid types: <class 'int'>"),
    (lambda t: t["head"]["node_config"].update(EbsOptimized="yes"),
     "available_node_types.head.node_config.EbsOptimized", "valid types: <class 'bool'>"),
    (lambda t: t["gpu"]["node_config"]["InstanceMarketOptions"]["SpotOptions"].update(MaxPrice=3),
     "available_node_types.gpu.node_config.InstanceMarketOptions.SpotOptions.MaxPrice", "valid types: <class 'str'>"),
    (lambda t: t["gpu"]["node_config"]["TagSpecifications"][1].update(ResourceType="volumes"),
     "available_node_types.gpu.node_config.TagSpecifications[1].ResourceType", "'volumes' is not one of"),
    (lambda t: t["gpu"]["node_config"].update(IamInstanceProfile={"Nme": "x"}),
     "available_node_types.gpu.node_config.IamInstanceProfile.Nme", "unknown RunInstances parameter"),
    (lambda t: t["gpu"]["node_config"].update(MetadataOptions={"HttpTokens": "always"}),
     "available_node_types.gpu.node_config.MetadataOptions.HttpTokens", "not one of: optional, required"),
])
def test_wrong_types_and_values_in_node_config_are_refused_with_their_path(edit, path, words):
    d, config = spot_config()
    edit(config["available_node_types"])
    e = refused(config, d)
    assert e.path == path and words in e.problem, str(e)


@pytest.mark.parametrize("edit,path", [
    (lambda c: c["available_node_types"]["gpu"].update(min_nodes=1), "available_node_types.gpu"),
    (lambda c: c["available_node_types"]["gpu"].update(max_workers="four"), "available_node_types.gpu.max_workers"),
    (lambda c: c.update(idle_timeout_minutes="soon"), "idle_timeout_minutes"),
    (lambda c: c["provider"]["security_group"].update(Rules=[]), "provider.security_group"),
])
def test_what_rays_schema_refuses_is_reported_with_its_path(edit, path):
    d, config = spot_config()
    edit(config)
    e = refused(config, d)
    assert e.path == path and "ray-schema.json" in e.hint


def test_opening_the_dashboard_in_a_rendered_config_is_refused():
    d, config = spot_config()
    config["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]})
    e = refused(config, d)
    assert e.path == "provider.security_group.IpPermissions" and "8265" in e.problem and "SSH tunnel" in e.problem


def test_keys_in_the_provider_section_are_refused():
    d, config = spot_config()
    config["provider"]["aws_credentials"] = {"aws_access_key_id": "AKIA...", "aws_secret_access_key": "..."}
    e = refused(config, d)
    assert e.path == "provider.aws_credentials" and "instance profile" in e.hint


def test_new_instance_types_are_left_to_the_region_lookup():
    """botocore's InstanceType enum lags new EC2 types: not checked offline (`launch up` asks the region)."""
    problems = node_config_problems({"InstanceType": "zz9.mega", "ImageId": "ami-0123456789abcdef0"})
    assert problems == []


@pytest.mark.parametrize("changes,words", [
    (dict(workers=[worker(node_config={"InstanceMarketOptions": {"MarketType": "spot"}})]), "set `spot / spot_max_price`"),
    (dict(workers=[worker(node_config={"SubnetId": "subnet-0123456789abcdef0"})]), "set `subnet_ids`"),
    (dict(security_group={}), "ssh_cidrs is required"),
    (dict(security_group={"ssh_cidrs": ["203.0.113.7"]}), None),  # a /32: accepted as such
    (dict(security_group={"ssh_cidrs": ["203.0.113.7/24"]}), "not a CIDR block"),
    (dict(security_group={"ids": ["sg-0123456789abcdef0"], "ssh_cidrs": ["10.0.0.0/8"]}), "drop `name` and `ssh_cidrs`"),
    (dict(availability_zones=["eu-west-1a"]), "not in region us-east-1"),
    (dict(tags={"Name": "x"}), "reserved"),
    (dict(tags={"ray-cluster-name": "x"}), "reserved"),
    (dict(workers=[worker(on_demand_fallback={})]), "apply to spot node types"),
    (dict(workers=[worker(name="head")]), "used by the launcher"),
    (dict(workers=[worker(spot=True, on_demand_fallback={}), worker(name="gpu-on-demand")]), "used by the launcher"),
    (dict(workers=[worker(), worker()]), "must be unique"),
    (dict(workers=[worker(min_workers=3)]), "min_workers 3 > max_workers 2"),
    (dict(image=None, setup_commands=[]), "set `image`"),
    (dict(aws_secret_access_key="x"), "Extra inputs are not permitted"),
    (dict(ami="ubuntu-22.04"), "String should match pattern"),
])
def test_bad_definitions_are_refused(changes, words):
    if words is None:
        parse_cluster(example_data(**changes))
        return
    with pytest.raises(ValidationError) as e:
        parse_cluster(example_data(**changes))
    assert words in str(e.value)


def test_bad_definition_file_is_a_spec_error_with_the_field_path(tmp_path):
    from launcher.clusters import load_cluster
    from launcher.errors import SpecError

    data = example_data(workers=[worker(node_config={"ImageId": "ami-0123456789abcdef0"})])
    path = tmp_path / "aws-dev.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as e:
        load_cluster(str(path))
    assert e.value.exit_code == 2 and "workers" in str(e.value.issues) and "set `ami` instead" in str(e.value.issues)


def test_no_credential_reaches_a_rendered_config(monkeypatch):
    for var, value in {"AWS_ACCESS_KEY_ID": MARKER_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": MARKER_SECRET_KEY,
                       "AWS_SESSION_TOKEN": MARKER_SESSION_TOKEN}.items():
        monkeypatch.setenv(var, value)
    texts = []
    for case in MATRIX.values():
        d = defn(**case)
        config = render(d)
        texts += [yaml.safe_dump(config), json.dumps(validate(copy.deepcopy(config), definition=d))]
    texts.append(json.dumps(aws.render(defn())))
    assert not [m for m in MARKERS for t in texts if m in t]
    assert not [t for t in texts if "aws_access_key_id" in t.lower() or "aws_secret" in t.lower()]


def test_tunnel_binds_loopback_only_and_uses_the_definitions_key(tmp_path):
    d = defn(ssh_key={"key_pair_name": "ml-team", "private_key_path": "~/.ssh/ml-team.pem"}, ssh_user="ec2-user")
    head = {"instance": "i-0abc", "key_name": "ml-team"}
    cmd = tunnel_command(d, "198.51.100.7", 41234, key_path(d, head), tmp_path / "known_hosts")
    assert cmd[:4] == ["ssh", "-N", "-L", "127.0.0.1:41234:127.0.0.1:8265"]
    assert cmd[-1] == "ec2-user@198.51.100.7" and cmd[cmd.index("-i") + 1].endswith("/.ssh/ml-team.pem")
    assert "BatchMode=yes" in cmd and "ExitOnForwardFailure=yes" in cmd and "StrictHostKeyChecking=accept-new" in cmd
    assert not [a for a in cmd if "0.0.0.0" in a or a.startswith("-g") or "GatewayPorts" in a]
    # Ray's default key: the one Ray wrote for the head's key pair
    assert str(key_path(defn(), {"key_name": "ray-autoscaler_us-east-1"})).endswith(
        "/.ssh/ray-autoscaler_us-east-1.pem")


def test_launch_errors_say_what_to_do_and_which_fallback_is_used():
    d = defn()
    e = launch_error("InsufficientInstanceCapacity", "We currently do not have sufficient g5.12xlarge capacity",
                     d, "gpu")
    assert "no spot capacity for g5.12xlarge in us-east-1a, us-east-1b, us-east-1c" in str(e)
    assert "`gpu-on-demand` (g5.12xlarge" in e.hint
    e = launch_error("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded", d, "gpu")
    assert "All G and VT Spot Instance Requests" in e.hint and "gpu-on-demand" in e.hint
    e = launch_error("VcpuLimitExceeded", "You have requested more vCPU capacity", d, "gpu-on-demand")
    assert "Running On-Demand G and VT instances" in e.hint and "Service Quotas" in e.hint
    e = launch_error("VcpuLimitExceeded", "You have requested more vCPU capacity", d, "head")
    assert "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances" in e.hint
    e = launch_error("InstanceLimitExceeded", "limit", defn(workers=[worker(instance_type="p4d.24xlarge",
                                                                            spot=True)]), "gpu")
    assert "All P Spot Instance Requests" in e.hint and "No fallback" in e.hint
    e = launch_error("InsufficientInstanceCapacity", "none", d, "head")
    assert "on-demand capacity for m6i.xlarge" in str(e) and "Fallback" not in e.hint
    e = launch_error("UnauthorizedOperation", "You are not authorized. Encoded authorization failure message: x",
                     d, "head")
    assert "not allowed" in str(e) and "decode-authorization-message" in e.hint
    assert "expired" in str(launch_error("ExpiredToken", "", d))
    assert "rejected the credentials" in str(launch_error("AuthFailure", "", d))
    assert "spot_max_price" in launch_error("SpotMaxPriceTooLow", "", d, "gpu").hint


def test_missing_credentials_error_names_no_value():
    from botocore.exceptions import NoCredentialsError

    e = client_error(NoCredentialsError(), "launch up aws-dev")
    assert "no AWS credentials" in str(e) and "aws configure" in e.hint


def test_max_failures_default_follows_spot():
    assert defn(max_failures=None).effective_max_failures == 3
    assert defn(max_failures=None, workers=[worker()]).effective_max_failures == 0
    assert defn(max_failures=-1).effective_max_failures == -1


def test_supports():
    assert aws.supports("spot") and aws.supports("gpu") and not aws.supports("ephemeral")
