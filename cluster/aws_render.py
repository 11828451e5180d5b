"""An `AwsCluster` as a Ray cluster-launcher config (the YAML `ray up` takes), and its checks.

`render` is pure: no AWS call, no file read but Ray's own defaults. `validate` runs Ray's own
checks (`prepare_config`, then `validate_config` against ray-schema.json) and, since that schema
does not look inside `node_config`, checks each node type's `node_config` against botocore's
EC2 RunInstances input shape, enum values included (botocore's validator skips those).

Security properties of every rendered config (tests/unit/test_aws_render.py):
- no credentials: nodes reach S3 through the instance profile named in the definition;
- the only inbound rule from addresses is SSH (22/tcp) from the definition's `ssh_cidrs`;
  the dashboard / Jobs API port is reached through an SSH tunnel, never opened.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

# Defined with the provider interface, so the launcher catches it without naming a kind.
from cluster import ConfigError
from cluster.aws_spec import HEAD_NODE_TYPE, MANAGED_NODE_CONFIG, AwsCluster, WorkerNodeType

DASHBOARD_PORT = 8265
SSH_PORT = 22
# Ray's autoscaler v2 (the default for `ray up` since Ray 2.50) prefers, among node types that
# fit a request equally well, the one with the higher `priority`: spot before its fallback.
SPOT_PRIORITY, ON_DEMAND_PRIORITY = 1, 0
DOCKER_CONTAINER = "ray_container"
# RunInstances parameters Ray itself sets or translates (ray.autoscaler._private.aws.node_provider):
# `SubnetIds` is Ray's own key (it launches in one of them, as `SubnetId`), MinCount/MaxCount it adds.
RAY_ONLY_KEYS = ("SubnetIds",)
RAY_ADDED = {"MinCount": 1, "MaxCount": 1}


# ---------------------------------------------------------------------------------- render


def render(defn: AwsCluster) -> dict[str, Any]:
    """The cluster-launcher config of `defn`, complete: Ray's `fillout_defaults` merges its
    defaults.yaml only one level deep, so every top-level key is set here (Ray's default
    `setup_commands` would otherwise install a nightly Ray wheel)."""
    defaults = _ray_aws_defaults()
    types = {}
    for name, (_, node) in defn.node_types().items():
        types[name] = _node_type(defn, name, node)
    provider: dict[str, Any] = {"type": "aws", "region": defn.region,
                                # False: `launch down` and idle scale-down terminate, not stop.
                                "cache_stopped_nodes": defn.cache_stopped_nodes}
    if defn.availability_zones:
        provider["availability_zone"] = ",".join(defn.availability_zones)
    if defn.use_internal_ips:
        provider["use_internal_ips"] = True
    if not defn.security_group.ids:
        # The group `cluster.aws.up` creates before Ray looks for it by this name (Ray's own
        # group would add SSH from 0.0.0.0/0). Ray adds these rules only to a group it creates.
        provider["security_group"] = {"GroupName": defn.security_group_name,
                                      "IpPermissions": ssh_ip_permissions(defn)}
    auth: dict[str, Any] = {"ssh_user": defn.ssh_user}
    if defn.ssh_key:
        auth["ssh_private_key"] = str(defn.ssh_key.path)
    docker: dict[str, Any] = {}
    if defn.image:
        docker = {"image": defn.image, "container_name": DOCKER_CONTAINER, "pull_before_run": True,
                  "run_options": ["--ulimit nofile=65536:65536"]}
    return {
        "cluster_name": defn.name,
        "max_workers": sum(t["max_workers"] for n, t in types.items() if n != HEAD_NODE_TYPE),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": defn.idle_timeout_minutes,
        "provider": provider,
        "auth": auth,
        "docker": docker,
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": list(defn.setup_commands),
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": defaults["head_start_ray_commands"],
        "worker_start_ray_commands": defaults["worker_start_ray_commands"],
    }


def _ray_aws_defaults() -> dict[str, Any]:
    from ray.autoscaler._private.providers import _get_default_config

    return _get_default_config({"type": "aws"})


def default_ami(region: str) -> str | None:
    """Ray's default AMI for the region (what Ray itself would fill in), or None."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    return DEFAULT_AMI.get(region)


def tags(defn: AwsCluster) -> dict[str, str]:
    """Tags on the instances, volumes and security group: the definition's and `llmlaunch-cluster`."""
    return {"llmlaunch-cluster": defn.name, **defn.tags}


def _node_type(defn: AwsCluster, name: str, node) -> dict[str, Any]:
    fallback = isinstance(node, WorkerNodeType) and name == node.fallback_name
    instance_type = (node.on_demand_fallback.instance_type or node.instance_type) if fallback else node.instance_type
    ami = node.ami or defn.ami or default_ami(defn.region)
    if ami is None:
        raise ConfigError(f"available_node_types.{name}.node_config.ImageId",
                          f"Ray has no default AMI for {defn.region}", hint="set `ami` in the cluster definition")
    def tag_list():  # one list per resource type: shared objects would come out as YAML anchors
        return [{"Key": k, "Value": v} for k, v in tags(defn).items()]

    node_config: dict[str, Any] = {
        "InstanceType": instance_type,
        "ImageId": ami,
        "IamInstanceProfile": {"Name": node.iam_instance_profile or defn.iam_instance_profile},
        "BlockDeviceMappings": [{"DeviceName": defn.root_device_name,
                                 "Ebs": {"VolumeSize": node.disk_size_gb, "VolumeType": "gp3",
                                         "DeleteOnTermination": True, "Encrypted": True}}],
        # Ray merges its own instance tags (ray-cluster-name, ray-node-type, Name, ...) into these.
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list()},
                              {"ResourceType": "volume", "Tags": tag_list()}],
    }
    if isinstance(node, WorkerNodeType) and node.spot and not fallback:
        spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if node.spot_max_price:
            spot["MaxPrice"] = node.spot_max_price
        node_config["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
    if defn.ssh_key:
        node_config["KeyName"] = defn.ssh_key.key_pair_name
    if defn.subnet_ids:
        node_config["SubnetIds"] = list(defn.subnet_ids)
    if defn.security_group.ids:
        node_config["SecurityGroupIds"] = list(defn.security_group.ids)
    node_config.update(copy.deepcopy(node.node_config))

    if name == HEAD_NODE_TYPE:
        # With workers, keep training and data tasks off the head (as on Kubernetes): its CPUs
        # serve the GCS, the dashboard and the job driver.
        return {"node_config": node_config, "resources": {"CPU": 0} if defn.workers else {},
                "min_workers": 0, "max_workers": 0}
    # `resources` stays empty: Ray fills CPU, GPU, memory and accelerator_type from the EC2
    # instance type (describe_instance_types) when it bootstraps the config.
    if fallback:
        return {"node_config": node_config, "resources": {}, "min_workers": 0,
                "max_workers": node.on_demand_fallback.max_workers or node.max_workers,
                "priority": ON_DEMAND_PRIORITY}
    out = {"node_config": node_config, "resources": {}, "min_workers": node.min_workers,
           "max_workers": node.max_workers}
    if node.spot:
        out["priority"] = SPOT_PRIORITY
    return out


def ssh_ip_permissions(defn: AwsCluster) -> list[dict[str, Any]]:
    """The inbound SSH rule (EC2 `IpPermissions`): port 22 from the definition's CIDRs only."""
    v4 = [c for c in defn.security_group.ssh_cidrs if ipaddress.ip_network(c).version == 4]
    v6 = [c for c in defn.security_group.ssh_cidrs if ipaddress.ip_network(c).version == 6]
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": SSH_PORT, "ToPort": SSH_PORT}
    if v4:
        rule["IpRanges"] = [{"CidrIp": c, "Description": "SSH from the launcher (llmlaunch)"} for c in v4]
    if v6:
        rule["Ipv6Ranges"] = [{"CidrIpv6": c, "Description": "SSH from the launcher (llmlaunch)"} for c in v6]
    return [rule] if v4 or v6 else []


def ingress_problems(ip_permissions: list[dict[str, Any]], allowed_ssh: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with a security group's inbound rules (EC2 `IpPermissions`, as
    describe_security_groups returns them or as rendered):
    - the dashboard / Jobs API port reachable from any address range (it runs arbitrary code);
    - anything reachable from everywhere (0.0.0.0/0, ::/0), except SSH from a CIDR in `allowed_ssh`.
    Rules naming security groups (the cluster's own nodes) are fine."""
    problems = []
    for rule in ip_permissions:
        proto = str(rule.get("IpProtocol", "-1"))
        tcp = proto in ("tcp", "6")
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        all_ports = proto == "-1" or lo in (None, -1)
        ports = "all ports" if all_ports else (f"port {lo}" if lo == hi else f"ports {lo}-{hi}")
        sources = ([r.get("CidrIp") for r in rule.get("IpRanges", [])]
                   + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
                   + [r.get("PrefixListId") for r in rule.get("PrefixListIds", [])])
        sources = [s for s in sources if s]
        covers_dashboard = proto == "-1" or (tcp and (all_ports or lo <= DASHBOARD_PORT <= hi))
        if covers_dashboard and sources:
            problems.append(f"{proto} {ports} from {', '.join(sources)} opens the dashboard / Jobs API "
                            f"({DASHBOARD_PORT}), which runs arbitrary code: reach it through the SSH tunnel")
            continue
        is_ssh = tcp and lo == hi == SSH_PORT
        for source in sources:
            if source.startswith("pl-"):
                continue
            if ipaddress.ip_network(source, strict=False).prefixlen == 0 and not (is_ssh and source in allowed_ssh):
                problems.append(f"{proto} {ports} is open to {source} (everyone)")
    return problems


# -------------------------------------------------------------------------------- validate


def validate(config: dict[str, Any], yaml_path: str | None = None,
             definition: AwsCluster | None = None) -> dict[str, Any]:
    """Check a rendered config as Ray and EC2 would; returns Ray's prepared config.

    Raises ConfigError naming the path in the rendered YAML, and (given the definition) the
    definition field it comes from. `yaml_path` is the definition's file, for the message."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    def fail(path: str, problem: str, hint: str | None = None):
        raise ConfigError(path, problem, hint=hint, source=yaml_path)

    provider = config.get("provider") or {}
    if "aws_credentials" in provider:
        # Ray copies the provider section to the head (~/ray_bootstrap_config.yaml).
        fail("provider.aws_credentials", "AWS keys in a cluster config are copied to the head node",
             "remove them: the launcher uses your local AWS credentials, the nodes their instance profile")
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        fail(_dotted(e.absolute_path) or "(top level)", e.message,
             "Ray's cluster-launcher schema (ray-schema.json) refuses this; fix the definition field it comes from")
    except (ValueError, RuntimeError, KeyError, TypeError, AssertionError) as e:
        fail("(config)", f"Ray refuses the config: {e}")
    group = prepared["provider"].get("security_group") or {}
    if definition is not None:
        allowed = tuple(definition.security_group.ssh_cidrs)
    else:  # without the definition, SSH from what the rendered rule names
        allowed = tuple(r.get("CidrIp") or r.get("CidrIpv6") for p in group.get("IpPermissions", [])
                        if p.get("FromPort") == p.get("ToPort") == SSH_PORT
                        for r in p.get("IpRanges", []) + p.get("Ipv6Ranges", []))
    for problem in ingress_problems(group.get("IpPermissions", []), allowed):
        fail("provider.security_group.IpPermissions", problem,
             "the launcher's group lets in SSH from `security_group.ssh_cidrs` only")
    for name, node_type in prepared["available_node_types"].items():
        for sub, problem in node_config_problems(node_type.get("node_config", {})):
            fail(f"available_node_types.{name}.node_config{sub}", problem, _node_config_hint(definition, name, sub))
    return prepared


def _dotted(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _node_config_hint(definition: AwsCluster | None, node_type: str, sub: str) -> str:
    key = sub.lstrip(".").split(".")[0].split("[")[0]
    where = None
    if definition is not None and node_type in definition.node_types():
        where = definition.node_types()[node_type][0].removesuffix(".on_demand_fallback")
    if key in MANAGED_NODE_CONFIG:
        field = MANAGED_NODE_CONFIG[key]
        return f"it comes from `{field}`" + (f" ({where} or the cluster)" if where else "") + \
            ": fix that field of the cluster definition"
    return (f"fix `{where}.node_config.{key}` in the cluster definition" if where else
            f"fix `node_config.{key}` of this node type in the cluster definition") + \
        " (EC2 RunInstances parameters, botocore's names and types)"


_SHAPE = None


def run_instances_shape():
    """botocore's EC2 RunInstances input shape (loaded once: the service model is ~3 MB of JSON)."""
    global _SHAPE
    if _SHAPE is None:
        import botocore.session

        _SHAPE = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    return _SHAPE


def node_config_problems(node_config: dict[str, Any]) -> list[tuple[str, str]]:
    """(sub-path, problem) for a node_config that EC2 RunInstances would refuse: unknown keys,
    wrong types, missing members (botocore's ParamValidator), and values outside an enum."""
    from botocore.validate import ParamValidator

    shape = run_instances_shape()
    params = {k: v for k, v in node_config.items() if k not in RAY_ONLY_KEYS}
    params.update(RAY_ADDED)
    if "LaunchTemplate" in node_config:
        return []  # Ray merges the template's data first (its bootstrap); EC2 checks the result
    report = ParamValidator().validate(params, shape)
    problems = []
    for error in report._errors:  # (kind, name, details): botocore's own report, one line each
        kind, name, details = error
        sub = name if name.startswith(".") or not name else f".{name}"
        if kind == "unknown field":
            sub = f"{sub}.{details['unknown_param']}"
            valid = ", ".join(details.get("valid_names", []))
            problems.append((sub, f"unknown RunInstances parameter (valid here: {valid})"))
        elif kind == "missing required field":
            problems.append((f"{sub}.{details['required_name']}", "required here"))
        else:
            problems.append((sub, report._format_error(error)))
    problems += _enum_problems(params, shape, "")
    return problems


def _enum_problems(value: Any, shape, path: str) -> list[tuple[str, str]]:
    kind = shape.type_name
    out: list[tuple[str, str]] = []
    if kind == "structure" and isinstance(value, dict):
        for key, member in shape.members.items():
            # InstanceType: new types reach EC2 before botocore's enum; `launch up` asks the
            # region (describe_instance_types) instead.
            if key in value and not (path == "" and key == "InstanceType"):
                out += _enum_problems(value[key], member, f"{path}.{key}")
    elif kind == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            out += _enum_problems(item, shape.member, f"{path}[{i}]")
    elif kind == "map" and isinstance(value, dict):
        for key, item in value.items():
            out += _enum_problems(item, shape.value, f"{path}.{key}")
    elif kind == "string" and isinstance(value, str) and shape.enum and value not in shape.enum:
        out.append((path, f"{value!r} is not one of: {', '.join(shape.enum)}"))
    return out
