"""`--cluster NAME` with `kind: aws`: a Ray cluster on EC2, driven by Ray's own cluster
launcher (`ray.autoscaler.sdk`, what `ray up` / `ray down` use).

- `up`: the definition is rendered and validated (`cluster.aws_render`), the launcher's own
  pre-flight lookups run (credentials, instance types, AMIs, instance profiles, zones,
  subnets, key pair), the security group is made (SSH from the definition's CIDRs only),
  then `create_or_update_cluster` starts the head; Ray's autoscaler on the head starts the
  workers when runs ask for them.
- The Jobs API is reached through an SSH tunnel this process opens to the head
  (`ssh -N -L 127.0.0.1:PORT:127.0.0.1:8265`): port 8265 is never opened in the security group.
- `down` terminates every instance of the cluster through Ray's AWS node provider.

AWS calls honour the usual configuration (profiles, SSO, `AWS_ENDPOINT_URL`), so the tests
run all of this against moto on 127.0.0.1; booting nodes, SSH and `ray start` they cannot show.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from cluster import ClusterStatus, ProviderError
from cluster.aws_render import DASHBOARD_PORT, ConfigError, ingress_problems, ssh_ip_permissions, tags
from cluster.aws_spec import HEAD_NODE_TYPE, AwsCluster, WorkerNodeType

__all__ = ["READS_LOCAL_FILES", "USES_THIS_PYTHON", "CLUSTER_CREDENTIALS", "render", "validate", "documents",
           "job_address", "max_failures", "preflight", "instance_types", "ensure_security_group", "up", "head_would_be_replaced",
           "address", "tunnel_command", "key_path", "state_dir", "nodes", "status", "down", "capacity", "supports",
           "client_error", "client_error_from", "launch_error", "missing_credentials", "quota_name", "ConfigError"]

# The provider interface (cluster/__init__.py): nodes read no file of this machine, run their own
# Python (setup_commands or `image`), and reach S3 as their instance profile; no key is copied.
READS_LOCAL_FILES = False
USES_THIS_PYTHON = False
CLUSTER_CREDENTIALS = "the nodes' instance profile (`iam_instance_profile`)"

DOCS = "docs/aws.md"
TUNNEL_TIMEOUT_S = 60
DOWN_TIMEOUT_S = 600
DOWN_POLL_S = 2.0
# Ray's instance tags (ray.autoscaler.tags).
TAG_CLUSTER, TAG_KIND, TAG_USER_TYPE, TAG_STATUS = ("ray-cluster-name", "ray-node-type", "ray-user-node-type",
                                                    "ray-node-status")
STATUS_UP_TO_DATE = "up-to-date"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def render(definition: AwsCluster) -> dict[str, Any]:
    """The Ray cluster-launcher config (`ray up` YAML) `up` would use. Pure: `launch render`."""
    from cluster.aws_render import render as _render

    return _render(definition)


def validate(definition: AwsCluster, yaml_path: str | None = None) -> dict[str, Any]:
    """Render and check with Ray's and botocore's own validation; raises ConfigError (a bad
    definition: the CLI's exit 2) naming the path in the rendered YAML. Returns the rendered config."""
    from cluster.aws_render import validate as _validate

    config = render(definition)
    _validate(config, yaml_path, definition)
    return config


def documents(definition: AwsCluster, *, source: str | None = None,
              run: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """`launch render`: the validated cluster-launcher config. A run adds nothing to it: runs
    are Ray jobs submitted through the Jobs API (`run` is for kinds that start one cluster per run)."""
    config = validate(definition, source)
    return [config], (f"the Ray cluster-launcher config of {definition.name} ({definition.region}), validated with "
                      f"Ray's schema and botocore's RunInstances shape; `launch up {definition.name}` starts it "
                      "(not `ray up`: the launcher makes the security group first)")


def max_failures(definition: AwsCluster) -> int:
    return definition.effective_max_failures


# ---------------------------------------------------------------- errors (pure)


def _quota_group(instance_type: str) -> str:
    family = re.match(r"[a-z]+", instance_type).group()
    for prefix, group in (("vt", "G and VT"), ("g", "G and VT"), ("inf", "Inf"), ("trn", "Trn"), ("dl", "DL"),
                          ("hpc", "HPC"), ("p", "P"), ("f", "F"), ("x", "X")):
        if family.startswith(prefix):
            return group
    return "Standard (A, C, D, H, I, M, R, T, Z)"


def quota_name(instance_type: str, spot: bool) -> str:
    """The EC2 Service Quotas entry (vCPU-based) that limits launches of this instance type."""
    group = _quota_group(instance_type)
    return f"All {group} Spot Instance Requests" if spot else f"Running On-Demand {group} instances"


def _fallback_line(definition: AwsCluster | None, node_type: str | None) -> str:
    """What happens instead when the node type `node_type` cannot launch."""
    if definition is None or node_type is None:
        return ""
    worker = next((w for w in definition.workers if node_type in (w.name, w.fallback_name)), None)
    if worker is None or not worker.spot:
        return ""
    if node_type == worker.name and worker.on_demand_fallback:
        fb_type = worker.on_demand_fallback.instance_type or worker.instance_type
        return (f" Fallback: the on-demand node type `{worker.fallback_name}` ({fb_type}, priority below the spot "
                f"type); Ray's autoscaler moves to it when it marks `{worker.name}` unavailable ({DOCS}, Spot).")
    if node_type == worker.name:
        return " No fallback: add `on_demand_fallback` to this worker type to run on-demand when spot is short."
    return ""


def launch_error(code: str, message: str, definition: AwsCluster | None = None, node_type: str | None = None,
                 instance_type: str | None = None) -> ProviderError:
    """An EC2 launch failure (a RunInstances error code) as a ProviderError saying what to do:
    no capacity, quotas, spot price, permissions. `node_type` names the rendered node type."""
    spot = False
    if definition is not None and node_type is not None:
        for w in definition.workers:
            if node_type == w.name:
                spot, instance_type = w.spot, instance_type or w.instance_type
            elif node_type == w.fallback_name:
                instance_type = instance_type or w.on_demand_fallback.instance_type or w.instance_type
        if node_type == HEAD_NODE_TYPE:
            instance_type = instance_type or definition.head.instance_type
    itype = instance_type or "the instance type"
    market = "spot" if spot else "on-demand"
    zones = ", ".join(definition.availability_zones) if definition and definition.availability_zones else "any zone"
    fallback = _fallback_line(definition, node_type)
    what = f"launching {market} {itype}" + (f" (node type {node_type})" if node_type else "")
    message = (message or "")[:600]
    if code == "InsufficientInstanceCapacity":
        return ProviderError(f"{what}: AWS has no {market} capacity for {itype} in {zones} right now: {message}",
                             hint="Ray tries the next of `availability_zones` first; list more zones or choose "
                                  "another instance type." + fallback)
    if code in ("VcpuLimitExceeded", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded"):
        quota = quota_name(itype, spot) if instance_type else "the instance family's vCPU quota"
        return ProviderError(f"{what}: the account's quota is used up ({code}): {message}",
                             hint=f"request more vCPUs for \"{quota}\" in {definition.region if definition else 'the region'} "
                                  f"(Service Quotas > Amazon EC2), or lower max_workers; see {DOCS}, Quotas." + fallback)
    if code == "SpotMaxPriceTooLow":
        return ProviderError(f"{what}: the spot price is above `spot_max_price`: {message}",
                             hint="raise or remove spot_max_price (default: the on-demand price)." + fallback)
    if code in ("Unsupported", "InvalidInstanceType"):
        return ProviderError(f"{what}: {itype} is not offered there: {message}",
                             hint="choose zones that offer it (`aws ec2 describe-instance-type-offerings "
                                  "--location-type availability-zone`) or another instance type")
    if code == "InvalidParameterValue" and "iamInstanceProfile" in message:
        return ProviderError(f"{what}: EC2 does not accept the instance profile yet: {message}",
                             hint="a new instance profile takes a minute to reach EC2 (IAM is eventually "
                                  "consistent): run `launch up` again")
    return client_error_from(code, message, what, definition)


def client_error_from(code: str, message: str, what: str, definition: AwsCluster | None = None) -> ProviderError:
    """Credentials, permission and not-found errors of any AWS call, by error code."""
    message = (message or "")[:600]
    region = definition.region if definition else "the region"
    if code in ("AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
                "InvalidAccessKeyId"):
        return ProviderError(f"{what}: AWS rejected the credentials ({code})",
                             hint="check which identity is used: `aws sts get-caller-identity` (AWS_PROFILE, "
                                  "`aws configure`, `aws sso login`)")
    if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired"):
        return ProviderError(f"{what}: the AWS session has expired ({code})",
                             hint="renew it (`aws sso login`, or new temporary credentials) and run the command again")
    if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "UnauthorizedAccess"):
        return ProviderError(f"{what}: not allowed for this AWS identity ({code}): {message[:300]}",
                             hint=f"an admin grants the launcher's permissions ({DOCS}, Launcher permissions); "
                                  "`aws sts decode-authorization-message` explains an encoded message")
    if code.startswith("InvalidAMIID"):
        return ProviderError(f"{what}: the AMI does not exist in {region} ({code}): {message}",
                             hint=f"AMI ids differ per region: look up the region's id ({DOCS}, AMI) and set `ami`")
    if code == "InvalidKeyPair.NotFound":
        return ProviderError(f"{what}: no such EC2 key pair in {region}: {message}",
                             hint="import your public key (`aws ec2 import-key-pair`) or drop `ssh_key` to let Ray "
                                  "create one")
    if code in ("InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"):
        return ProviderError(f"{what}: a subnet in `subnet_ids` does not exist in {region}: {message}",
                             hint="`aws ec2 describe-subnets` lists the region's subnets")
    if code in ("InvalidGroup.NotFound", "InvalidGroupId.Malformed"):
        return ProviderError(f"{what}: a security group in `security_group.ids` does not exist in {region}: {message}")
    if code == "NoSuchEntity":
        return ProviderError(f"{what}: {message}",
                             hint=f"an admin creates the instance profile and its role ({DOCS}, Instance profiles)")
    return ProviderError(f"{what}: AWS answered {code}: {message}")


def client_error(e: Exception, what: str, definition: AwsCluster | None = None) -> ProviderError:
    """A botocore exception (ClientError, no credentials, no connection) as a ProviderError."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, NoRegionError
    from botocore.exceptions import PartialCredentialsError, TokenRetrievalError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return client_error_from(str(err.get("Code", "")), str(err.get("Message", "")), what, definition)
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return missing_credentials(what)
    if isinstance(e, TokenRetrievalError):
        return ProviderError(f"{what}: the AWS SSO session has expired", hint="`aws sso login` and run it again")
    if isinstance(e, EndpointConnectionError):
        return ProviderError(f"{what}: cannot reach AWS: {e}", hint="check the network (and AWS_ENDPOINT_URL if set)")
    if isinstance(e, NoRegionError):
        return ProviderError(f"{what}: no region", hint="set `region` in the cluster definition")
    return ProviderError(f"{what}: {e}")


def missing_credentials(what: str) -> ProviderError:
    return ProviderError(f"{what}: no AWS credentials found on this machine",
                         hint="`aws configure`, `aws sso login` or AWS_PROFILE; they stay on this machine (the nodes "
                              "use their instance profile, nothing is copied into the cluster config)")


# ---------------------------------------------------------------- AWS calls


def _client(service: str, definition: AwsCluster):
    import boto3
    from botocore.config import Config

    # No endpoint given: boto3 honours AWS_ENDPOINT_URL (the tests' moto server), as Ray's clients do.
    return boto3.client(service, region_name=definition.region,
                        config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def _call(fn: Callable, what: str, definition: AwsCluster, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as e:
        raise client_error(e, what, definition) from None


def _check_credentials(definition: AwsCluster) -> None:
    import boto3

    if boto3.Session().get_credentials() is None:
        raise missing_credentials("AWS")
    _call(_client("sts", definition).get_caller_identity, "checking the AWS credentials", definition)


def instance_types(definition: AwsCluster) -> dict[str, dict[str, Any]]:
    """CPU, GPU and architecture of every instance type the definition names, as the region
    reports them (describe_instance_types); an unknown type is a ProviderError naming its field."""
    from botocore.exceptions import ClientError

    wanted: dict[str, str] = {}
    for name, (where, node) in definition.node_types().items():
        fb = isinstance(node, WorkerNodeType) and name == node.fallback_name
        itype = (node.on_demand_fallback.instance_type or node.instance_type) if fb else node.instance_type
        wanted.setdefault(itype, f"{where}.instance_type" if not fb or node.on_demand_fallback.instance_type
                          else f"{where.removesuffix('.on_demand_fallback')}.instance_type")
    ec2 = _client("ec2", definition)
    found: dict[str, dict[str, Any]] = {}
    for itype, where in wanted.items():  # one call each: the error then names the field
        try:
            reply = ec2.describe_instance_types(InstanceTypes=[itype])
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("InvalidInstanceType", "InvalidParameterValue"):
                raise ProviderError(f"{where}: instance type {itype} does not exist in {definition.region}",
                                    hint="`aws ec2 describe-instance-types --region "
                                         f"{definition.region}` lists them; names look like g5.12xlarge") from None
            raise client_error(e, "looking up instance types", definition) from None
        except Exception as e:
            raise client_error(e, "looking up instance types", definition) from None
        info = reply["InstanceTypes"][0]
        gpus = sum(g.get("Count", 0) for g in (info.get("GpuInfo") or {}).get("Gpus", []))
        found[itype] = {"CPU": float(info["VCpuInfo"]["DefaultVCpus"]), "GPU": float(gpus),
                        "memory_mib": info.get("MemoryInfo", {}).get("SizeInMiB"),
                        "architectures": (info.get("ProcessorInfo") or {}).get("SupportedArchitectures", []),
                        "field": where}
    return found


def preflight(definition: AwsCluster, on_progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """The lookups `up` makes before starting anything, each failure a ProviderError with a hint:
    credentials, zones, subnets, instance types (and their offer in the zones), AMIs (and their
    architecture), instance profiles (and their role), the key pair, existing security groups.
    Returns `instance_types(definition)`."""
    say = on_progress or _quiet
    _check_credentials(definition)
    ec2 = _client("ec2", definition)
    if definition.availability_zones:
        zones = _call(ec2.describe_availability_zones, "looking up availability_zones", definition,
                      Filters=[{"Name": "zone-name", "Values": list(definition.availability_zones)}])
        known = {z["ZoneName"] for z in zones["AvailabilityZones"]}
        if missing := [z for z in definition.availability_zones if z not in known]:
            raise ProviderError(f"availability_zones: {', '.join(missing)} not in {definition.region}",
                                hint=f"known zones: {', '.join(sorted(known)) or 'none'}")
    if definition.subnet_ids:
        subnets = _call(ec2.describe_subnets, "looking up subnet_ids", definition, SubnetIds=list(definition.subnet_ids))
        vpcs = {s["VpcId"] for s in subnets["Subnets"]}
        if len(vpcs) > 1:
            raise ProviderError(f"subnet_ids are in {len(vpcs)} VPCs ({', '.join(sorted(vpcs))})",
                                hint="Ray keeps a cluster in one VPC: list subnets of one VPC")
        outside = [s["SubnetId"] for s in subnets["Subnets"]
                   if definition.availability_zones and s["AvailabilityZone"] not in definition.availability_zones]
        if outside:
            raise ProviderError(f"subnet_ids {', '.join(outside)} are outside availability_zones",
                                hint="Ray would refuse the mismatch: list their zones or drop them")
    types = instance_types(definition)
    if definition.availability_zones:
        offers = _call(ec2.describe_instance_type_offerings, "looking up instance type offerings", definition,
                       LocationType="availability-zone",
                       Filters=[{"Name": "instance-type", "Values": sorted(types)},
                                {"Name": "location", "Values": list(definition.availability_zones)}])
        offered: dict[str, set[str]] = {}
        for o in offers.get("InstanceTypeOfferings", []):
            offered.setdefault(o["InstanceType"], set()).add(o["Location"])
        for itype, info in types.items():
            zones = offered.get(itype, set())
            if not zones:
                raise ProviderError(f"{info['field']}: {itype} is not offered in {', '.join(definition.availability_zones)}",
                                    hint="add zones that offer it (`aws ec2 describe-instance-type-offerings "
                                         "--location-type availability-zone`) or choose another type")
            if len(zones) < len(definition.availability_zones):
                say(f"note: {itype} is offered in {', '.join(sorted(zones))} only (of availability_zones)")
    _check_amis(definition, types)
    _check_profiles(definition)
    if definition.ssh_key:
        _call(ec2.describe_key_pairs, "looking up ssh_key.key_pair_name", definition,
              KeyNames=[definition.ssh_key.key_pair_name])
        if not definition.ssh_key.path.is_file():
            raise ProviderError(f"ssh_key.private_key_path {definition.ssh_key.path} does not exist",
                                hint="the private key of the key pair, readable by you only (chmod 600)")
    if definition.security_group.ids:
        groups = _call(ec2.describe_security_groups, "looking up security_group.ids", definition,
                       GroupIds=list(definition.security_group.ids))
        for g in groups["SecurityGroups"]:
            if problems := ingress_problems(g.get("IpPermissions", []), allowed_ssh=("0.0.0.0/0", "::/0")):
                raise ProviderError(f"security group {g['GroupId']} ({g.get('GroupName')}): {'; '.join(problems)}",
                                    hint="remove those inbound rules: the launcher reaches the Jobs API through SSH")
    say(f"pre-flight: credentials, instance types ({', '.join(sorted(types))}), AMIs and instance profiles "
        f"found in {definition.region}")
    return types


def _check_amis(definition: AwsCluster, types: dict[str, dict[str, Any]]) -> None:
    from cluster.aws_render import default_ami

    by_ami: dict[str, set[str]] = {}
    for name, (where, node) in definition.node_types().items():
        fb = isinstance(node, WorkerNodeType) and name == node.fallback_name
        itype = (node.on_demand_fallback.instance_type or node.instance_type) if fb else node.instance_type
        ami = node.ami or definition.ami or default_ami(definition.region)
        if ami:
            by_ami.setdefault(ami, set()).add(itype)
    if not by_ami:
        return
    images = _call(_client("ec2", definition).describe_images, "looking up the AMIs (`ami`)", definition,
                   ImageIds=sorted(by_ami))
    arch = {i["ImageId"]: i.get("Architecture") for i in images["Images"]}
    for ami, itypes in by_ami.items():
        if ami not in arch:
            raise client_error_from("InvalidAMIID.NotFound", ami, "looking up the AMIs (`ami`)", definition)
        for itype in itypes:
            supported = types[itype]["architectures"]
            if arch[ami] and supported and arch[ami] not in supported:
                raise ProviderError(f"AMI {ami} is {arch[ami]}, {itype} runs {', '.join(supported)}",
                                    hint="use an AMI built for the instance type's architecture")


def _check_profiles(definition: AwsCluster) -> None:
    iam = _client("iam", definition)
    names = {node.iam_instance_profile or definition.iam_instance_profile for _, node in definition.node_types().values()}
    for name in sorted(names):
        profile = _call(iam.get_instance_profile, f"looking up the instance profile {name}", definition,
                        InstanceProfileName=name)["InstanceProfile"]
        if not profile.get("Roles"):
            raise ProviderError(f"instance profile {name} has no role: its nodes would get no credentials (no S3)",
                                hint=f"an admin adds the role: `aws iam add-role-to-instance-profile` ({DOCS})")


# ---------------------------------------------------------------- security group


def _vpc_ray_picks(definition: AwsCluster, config: dict[str, Any]) -> str:
    """The VPC Ray will launch the nodes in: the one of the first usable subnet, as chosen by
    Ray's own `_configure_subnet` (zones in order, public-IP subnets unless use_internal_ips)."""
    import click
    from ray.autoscaler._private.aws.config import _configure_subnet
    from ray.autoscaler._private.util import prepare_config

    if definition.subnet_ids:
        reply = _call(_client("ec2", definition).describe_subnets, "looking up subnet_ids", definition,
                      SubnetIds=[definition.subnet_ids[0]])
        return reply["Subnets"][0]["VpcId"]
    try:
        chosen = _configure_subnet(prepare_config(config))
    except click.ClickException as e:
        raise ProviderError(f"no usable subnet: {e.message}",
                            hint="subnets in `availability_zones` must give public IPs (or set use_internal_ips)") from None
    except Exception as e:
        raise client_error(e, "looking up subnets", definition) from None
    subnet = chosen["available_node_types"][HEAD_NODE_TYPE]["node_config"]["SubnetIds"][0]
    reply = _call(_client("ec2", definition).describe_subnets, "looking up subnets", definition, SubnetIds=[subnet])
    return reply["Subnets"][0]["VpcId"]


def _flat_rules(perms: list[dict[str, Any]]) -> set[tuple]:
    """IpPermissions as a set of (protocol, from, to, source kind, source) for comparison."""
    out = set()
    for p in perms:
        proto = str(p.get("IpProtocol", "-1"))
        lo, hi = (None, None) if proto == "-1" else (p.get("FromPort"), p.get("ToPort"))
        for r in p.get("IpRanges", []):
            out.add((proto, lo, hi, "CidrIp", r["CidrIp"]))
        for r in p.get("Ipv6Ranges", []):
            out.add((proto, lo, hi, "CidrIpv6", r["CidrIpv6"]))
        for r in p.get("UserIdGroupPairs", []):
            out.add((proto, lo, hi, "GroupId", r["GroupId"]))
        for r in p.get("PrefixListIds", []):
            out.add((proto, lo, hi, "PrefixListId", r["PrefixListId"]))
    return out


def _as_perms(rules: set[tuple], described: bool = False) -> list[dict[str, Any]]:
    key = {"CidrIp": "IpRanges", "CidrIpv6": "Ipv6Ranges", "GroupId": "UserIdGroupPairs", "PrefixListId": "PrefixListIds"}
    perms = []
    for proto, lo, hi, kind, source in sorted(rules, key=str):
        entry: dict[str, Any] = {kind: source}
        if described:  # shown in the console beside each rule
            entry["Description"] = ("the cluster's nodes (llmlaunch)" if kind == "GroupId"
                                    else "SSH from the launcher (llmlaunch)")
        perm: dict[str, Any] = {"IpProtocol": proto, key[kind]: [entry]}
        if proto != "-1":
            perm.update(FromPort=lo, ToPort=hi)
        perms.append(perm)
    return perms


def ensure_security_group(definition: AwsCluster, config: dict[str, Any] | None = None,
                          on_progress: Progress | None = None) -> str | None:
    """Create (or bring back to the definition) the cluster's security group before Ray looks
    for it: inbound all traffic from the group itself (the nodes) and SSH from `ssh_cidrs`,
    nothing else. Ray then finds it by name in its VPC and, since it has rules, leaves it as is
    (a group Ray creates itself gets SSH from 0.0.0.0/0). Returns its id; None with `ids`."""
    if definition.security_group.ids:
        return None
    say = on_progress or _quiet
    config = config or render(definition)
    ec2 = _client("ec2", definition)
    name = definition.security_group_name
    vpc = _vpc_ray_picks(definition, config)
    found = _call(ec2.describe_security_groups, f"looking up security group {name}", definition,
                  Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    if not found:
        tag_list = [{"Key": k, "Value": v} for k, v in tags(definition).items()]
        created = _call(ec2.create_security_group, f"creating security group {name}", definition,
                        GroupName=name, VpcId=vpc,
                        Description=f"llmlaunch cluster {definition.name}: nodes to each other, SSH from the launcher",
                        TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list}])
        group_id, current, ours = created["GroupId"], set(), True
        say(f"created security group {name} ({group_id}) in {vpc}")
    else:
        group = found[0]
        group_id, current = group["GroupId"], _flat_rules(group.get("IpPermissions", []))
        ours = any(t["Key"] == "llmlaunch-cluster" and t["Value"] == definition.name for t in group.get("Tags", []))
    wanted = {("-1", None, None, "GroupId", group_id)} | _flat_rules(ssh_ip_permissions(definition))
    if not ours:
        # Someone else's group of this name: use it only if it is safe, never change it.
        problems = ingress_problems(_as_perms(current), tuple(definition.security_group.ssh_cidrs))
        if not current:
            problems.append("it has no inbound rules, so Ray would add SSH from 0.0.0.0/0")
        if problems:
            raise ProviderError(f"security group {name} ({group_id}) exists and is not the launcher's: "
                                f"{'; '.join(problems)}",
                                hint="delete it, name another in `security_group.name`, or list safe groups in "
                                     "`security_group.ids`")
        return group_id
    if extra := current - wanted:
        _call(ec2.revoke_security_group_ingress, f"updating security group {name}", definition,
              GroupId=group_id, IpPermissions=_as_perms(extra))
        say(f"security group {name}: removed {len(extra)} inbound rule(s) the definition no longer has")
    if missing := wanted - current:
        _call(ec2.authorize_security_group_ingress, f"updating security group {name}", definition,
              GroupId=group_id, IpPermissions=_as_perms(missing, described=True))
    return group_id


# ---------------------------------------------------------------- nodes


def nodes(definition: AwsCluster) -> list[dict[str, Any]]:
    """The cluster's pending and running instances (Ray's `ray-cluster-name` tag), as dicts."""
    ec2 = _client("ec2", definition)
    pages = _call(ec2.describe_instances, "listing the cluster's instances", definition,
                  Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [definition.name]},
                           {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    out = []
    for reservation in pages["Reservations"]:
        for i in reservation["Instances"]:
            t = {x["Key"]: x["Value"] for x in i.get("Tags", [])}
            out.append({"instance": i["InstanceId"], "kind": t.get(TAG_KIND), "node_type": t.get(TAG_USER_TYPE),
                        "instance_type": i["InstanceType"], "lifecycle": i.get("InstanceLifecycle", "on-demand"),
                        "state": i["State"]["Name"], "ray_status": t.get(TAG_STATUS),
                        "zone": (i.get("Placement") or {}).get("AvailabilityZone"),
                        "public_ip": i.get("PublicIpAddress"), "private_ip": i.get("PrivateIpAddress"),
                        "key_name": i.get("KeyName"), "launch_config": t.get("ray-launch-config")})
    return out


def _head(definition: AwsCluster) -> dict[str, Any] | None:
    heads = [n for n in nodes(definition) if n["kind"] == "head"]
    return next((h for h in heads if h["ray_status"] == STATUS_UP_TO_DATE), heads[0] if heads else None)


def _node_provider(definition: AwsCluster):
    """Ray's own AWS node provider for this cluster (what `ray down` terminates with)."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    return AWSNodeProvider(render(definition)["provider"], definition.name)


# ---------------------------------------------------------------- up / down


def up(definition: AwsCluster, on_progress: Progress | None = print, update: bool = True,
       replace_head: bool = False) -> str:
    """Start the cluster (or reuse it) and return its Jobs API address: http://127.0.0.1:PORT,
    an SSH tunnel to the head that lives as long as this process.

    `update=False` (a run on a shared cluster): a running head is used as it is. `update=True`
    (`launch up`): Ray's create_or_update_cluster applies the definition; on a healthy head with
    `no_restart`, so running jobs survive. Ray terminates and relaunches a head whose launch
    settings changed (instance type, AMI, disk, profile, tags, node_config, SSH key): that ends
    every job on it, so it is refused unless `replace_head`.

    When SSH to a new head never comes up, Ray waits AUTOSCALER_NODE_START_WAIT_S (900 s by default)
    and gives up; the head instance is left running, and this raises ProviderError saying so."""
    say = on_progress or _quiet
    config = validate(definition)
    head = _head(definition)
    healthy = bool(head and head["ray_status"] == STATUS_UP_TO_DATE)
    if healthy and not update:
        say(f"cluster {definition.name}: head {head['instance']} is up; using it as it is (`launch up` applies changes)")
        return _reach(definition, head, say)
    preflight(definition, say)
    ensure_security_group(definition, config, say)
    if healthy and not replace_head and head_would_be_replaced(definition, config, head):
        raise ProviderError(f"the definition changes the launch settings of the running head {head['instance']} of "
                            f"{definition.name}: Ray would terminate it, and every job on it, and launch a new one",
                            hint="undo the change to `head` / `ami` / `tags` / `ssh_key`, or replace the head on "
                                 "purpose (`launch down`, then `launch up`). With Ray's default key, bring the "
                                 "cluster up from the machine that made it, or set `ssh_key`")
    # Ray's CLI would ask about usage stats on a terminal (10 s); the launcher answers no, as for local.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    say(f"starting cluster {definition.name} in {definition.region} with Ray's cluster launcher "
        f"({'updating the running head' if healthy else 'head ' + definition.head.instance_type})")
    with _ray_output_as_progress(say):
        _create_or_update(definition, config, no_restart=healthy)
    head = _head(definition)
    if head is None or head["ray_status"] != STATUS_UP_TO_DATE:
        raise ProviderError(f"Ray's cluster launcher finished but the head of {definition.name} is "
                            f"{head['ray_status'] if head else 'missing'}",
                            hint=f"`launch status {definition.name}`; `launch down {definition.name}` terminates it")
    return _reach(definition, head, say)


def head_would_be_replaced(definition: AwsCluster, config: dict[str, Any], head: dict[str, Any]) -> bool:
    """Whether Ray's create_or_update_cluster would relaunch this head: its `ray-launch-config`
    tag differs from Ray's hash of the head's bootstrapped node config and SSH key (the same
    `hash_launch_conf` Ray compares, ray.autoscaler._private.commands._should_create_new_head)."""
    import click
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import hash_launch_conf, prepare_config

    try:
        # Ray's AWS bootstrap resolves what the hash covers (key pair, subnets, groups, AMI); the
        # resource fill-in of a full bootstrap (every instance type of the region) does not count.
        resolved = bootstrap_aws(prepare_config(config))
    except click.ClickException as e:
        raise ProviderError(f"Ray's cluster launcher refused the config: {e.message}", hint="see Ray's output above") from None
    except Exception as e:
        raise client_error(e, f"resolving the config of {definition.name}", definition) from None
    node_config = copy.deepcopy(resolved.get("head_node", {}))
    node_config.update(resolved["available_node_types"][resolved["head_node_type"]]["node_config"])
    return hash_launch_conf(node_config, resolved["auth"]) != head.get("launch_config")


# The CLI's --debug (trainers.user_errors.DEBUG_ENV; cluster/ does not import trainers).
DEBUG_ENV = "LLMLAUNCH_DEBUG"


@contextlib.contextmanager
def _ray_output_as_progress(say: Progress):
    """While Ray's cluster launcher runs: its log lines go to stderr, as the launcher's own
    progress does (stdout is the command's result, the address), and a failed node setup (SSH
    never came up, a setup command failed) reads as one line, not a Python traceback. Ray's
    updater threads end such a setup by raising (Python would print the thread's traceback)
    after Ray's own report, which holds the same traceback; the launcher's error and what to
    do follow. With --debug both stay whole."""
    if os.environ.get(DEBUG_ENV):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    previous = threading.excepthook

    def one_line(args) -> None:
        if args.exc_type is SystemExit:
            previous(args)
            return
        say(f"Ray's node updater stopped: {args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = one_line
    try:
        with contextlib.redirect_stdout(_WithoutTracebacks(sys.stderr)):
            yield
    finally:
        threading.excepthook = previous


class _WithoutTracebacks:
    """A text stream that forwards to `target`, with the Python tracebacks in Ray's log
    messages (its updater's "Full traceback: ...") cut to a pointer at --debug."""

    _START = "Traceback (most recent call last):"

    def __init__(self, target):
        self._target = target

    def write(self, text: str) -> int:
        if self._START in text:
            colour_reset = re.search(r"(\x1b\[[0-9;]*m)*\s*$", text).group()  # Ray colours its messages
            text = text[:text.index(self._START)] + "hidden (run the command again with --debug)" + colour_reset
        return self._target.write(text)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding: the target's
        return getattr(self._target, name)


def _create_or_update(definition: AwsCluster, config: dict[str, Any], no_restart: bool) -> dict[str, Any]:
    import click
    from botocore.exceptions import BotoCoreError, ClientError
    from ray.autoscaler import sdk
    from ray.autoscaler.node_launch_exception import NodeLaunchException

    try:
        # no_config_cache: Ray would otherwise reuse a resolved config (subnet and group ids) from
        # /tmp, stale once the group or the account's network changed.
        return sdk.create_or_update_cluster(config, no_restart=no_restart, no_config_cache=True)
    except NodeLaunchException as e:
        raise launch_error(e.category, e.description, definition, HEAD_NODE_TYPE) from None
    except (ClientError, BotoCoreError) as e:
        raise client_error(e, f"Ray's cluster launcher ({definition.name})", definition) from None
    except (click.ClickException, SystemExit) as e:
        message = getattr(e, "message", "") or str(e)
        if "Failed to setup head node" in message:
            raise ProviderError(
                f"the head of {definition.name} was launched but Ray could not set it up over SSH (it waits up to "
                f"AUTOSCALER_NODE_START_WAIT_S, 900 s by default, for SSH; or a setup command failed: Ray's output "
                f"above says which)",
                hint=f"SSH comes in from `security_group.ssh_cidrs` only: it must hold this machine's public address; "
                     f"`ssh_user` must be the AMI's login user. The head keeps running (and costing): "
                     f"`launch down {definition.name}` terminates it") from None
        raise ProviderError(f"Ray's cluster launcher stopped: {message or type(e).__name__}",
                            hint="see Ray's output above") from None


def down(definition: AwsCluster, on_progress: Progress | None = None) -> bool:
    """Terminate every instance of the cluster through Ray's AWS node provider (with
    `cache_stopped_nodes: true`, Ray stops on-demand nodes instead). False when none was running.

    Unlike `ray down` (sdk.teardown_cluster) it does not SSH to the head to run `ray stop` first,
    nor bootstrap the config (which creates key pairs): terminating the instances stops Ray, and an
    unreachable head would cost a 120 s SSH timeout. It repeats until no instance is left, since the
    head's autoscaler may launch a worker before it goes down."""
    say = on_progress or _quiet
    _close_tunnels(definition.name)
    # Ray's node provider logs to stdout; the launcher's progress (and Ray's, in `up`) is on stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return _terminate_all(definition, say)


def _terminate_all(definition: AwsCluster, say: Progress) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        provider = _node_provider(definition)
        remaining = provider.non_terminated_nodes({})
        if not remaining:
            return False
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while remaining:
            if time.monotonic() > deadline:
                raise ProviderError(f"{len(remaining)} instance(s) of {definition.name} still running after "
                                    f"{DOWN_TIMEOUT_S}s: {', '.join(remaining)}",
                                    hint=f"run `launch down {definition.name}` again, or terminate them in the EC2 console")
            provider.terminate_nodes(remaining)
            say(f"terminating {len(remaining)} instance(s) of {definition.name}: {', '.join(remaining)}")
            # Terminating instances leave the pending/running filter at once; a repeat (the API is
            # eventually consistent, or the autoscaler launched one more) terminates again.
            remaining = provider.non_terminated_nodes({})
            if remaining:
                time.sleep(DOWN_POLL_S)
                remaining = provider.non_terminated_nodes({})
    except (ClientError, BotoCoreError) as e:
        raise client_error(e, f"terminating {definition.name}", definition) from None
    return True


def status(definition: AwsCluster) -> ClusterStatus:
    """The cluster's instances as EC2 reports them (type, spot or on-demand, zone, Ray's node
    status), and the CPUs / GPUs of the nodes that are set up. `address` stays None: the CLI asks
    `address()`, which opens the tunnel."""
    found = nodes(definition)
    heads = [n for n in found if n["kind"] == "head"]
    running = any(h["ray_status"] == STATUS_UP_TO_DATE and h["state"] == "running" for h in heads)
    resources = {"CPU": 0.0, "GPU": 0.0}
    ready = [n for n in found if n["ray_status"] == STATUS_UP_TO_DATE and n["state"] == "running"
             and (n["kind"] != "head" or not definition.workers)]
    if ready:
        ec2 = _client("ec2", definition)
        info = _call(ec2.describe_instance_types, "looking up instance types", definition,
                     InstanceTypes=sorted({n["instance_type"] for n in ready}))["InstanceTypes"]
        per_type = {i["InstanceType"]: i for i in info}
        for n in ready:
            i = per_type.get(n["instance_type"], {})
            resources["CPU"] += float(i.get("VCpuInfo", {}).get("DefaultVCpus", 0))
            resources["GPU"] += float(sum(g.get("Count", 0) for g in (i.get("GpuInfo") or {}).get("Gpus", [])))
    details = []
    if not heads:
        details.append(f"no head instance (`launch up {definition.name}`)")
    elif not running:
        h = heads[0]
        details.append(f"head {h['instance']} is {h['state']}, Ray status {h['ray_status'] or 'unknown'}"
                       + (f" (`launch up {definition.name}` again, or `launch down {definition.name}`)"
                          if h["ray_status"] == "update-failed" else ""))
    for w in definition.workers:
        on_fallback = [n for n in found if n["node_type"] == w.fallback_name]
        if on_fallback:
            details.append(f"{len(on_fallback)} node(s) on the on-demand fallback {w.fallback_name} "
                           f"(spot {w.name} was unavailable)")
    shown = [{k: v for k, v in n.items() if k != "launch_config"} for n in found]  # Ray's hash: nothing to read
    return ClusterStatus(name=definition.name, kind="aws", running=running, address=None, resources=resources,
                         nodes=shown, detail="; ".join(details))


def capacity(definition: AwsCluster) -> dict[str, float]:
    """CPUs and GPUs of the worker node types at their maximum size (spot and fallback types
    alike): what the autoscaler can provide, so what a run can be placed on. Asks EC2 for the
    instance types' sizes (describe_instance_types)."""
    types = instance_types(definition)
    config_types = render(definition)["available_node_types"]
    total = {"CPU": 0.0, "GPU": 0.0}
    if not definition.workers:
        head = types[definition.head.instance_type]
        return {"CPU": head["CPU"], "GPU": head["GPU"]}
    for name, node_type in config_types.items():
        if name == HEAD_NODE_TYPE:
            continue
        info = types[node_type["node_config"]["InstanceType"]]
        total["CPU"] += info["CPU"] * node_type["max_workers"]
        total["GPU"] += info["GPU"] * node_type["max_workers"]
    return total


def supports(feature: str) -> bool:
    return feature in {"gpu", "autoscaling", "spot", "render"}


# ---------------------------------------------------------------- the SSH tunnel

_TUNNELS: dict[tuple[str, str], tuple[subprocess.Popen, str]] = {}


def state_dir(definition: AwsCluster) -> Path:
    return Path(os.environ.get("LLMLAUNCH_HOME", "~/.cache/llmlaunch")).expanduser() / "aws" / definition.name


def key_path(definition: AwsCluster, head: dict[str, Any]) -> Path:
    """The private key for SSH to the head: the definition's, else Ray's default
    (`~/.ssh/<the head's key pair>.pem`, which Ray wrote when it created the pair)."""
    if definition.ssh_key:
        return definition.ssh_key.path
    return Path(f"~/.ssh/{head.get('key_name') or 'ray-autoscaler_' + definition.region}.pem").expanduser()


def tunnel_command(definition: AwsCluster, head_ip: str, local_port: int, key: Path, known_hosts: Path) -> list[str]:
    """The `ssh` command of the tunnel: 127.0.0.1:local_port on this machine to the head's
    dashboard / Jobs API on the head's own loopback. Nothing listens on other interfaces."""
    return ["ssh", "-N", "-L", f"127.0.0.1:{local_port}:127.0.0.1:{DASHBOARD_PORT}",
            "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=3",
            "-o", "ConnectTimeout=15",
            # Trust on first use, one file per head instance: a new head (new key) gets a new file.
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
            f"{definition.ssh_user}@{head_ip}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _die_with_parent() -> None:
    # Linux: the tunnel goes when the launcher goes, even on SIGKILL (atexit covers the rest).
    # The signal follows the thread that started ssh: the CLI opens tunnels from its main thread.
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _reach(definition: AwsCluster, head: dict[str, Any], say: Progress) -> str:
    ip = head["private_ip"] if definition.use_internal_ips else head["public_ip"]
    if not ip:
        raise ProviderError(f"the head {head['instance']} has no {'private' if definition.use_internal_ips else 'public'} IP",
                            hint="subnets must give public IPs, or set use_internal_ips when the launcher is in the VPC")
    cached = _TUNNELS.get((definition.name, ip))
    if cached and cached[0].poll() is None and _answers(cached[1]):
        return cached[1]
    state = state_dir(definition)
    state.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = state / "tunnel.log"
    cmd = tunnel_command(definition, ip, port, key_path(definition, head), state / f"known_hosts-{head['instance']}")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=_die_with_parent)
    atexit.register(_stop, proc)
    deadline = time.monotonic() + TUNNEL_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProviderError(f"SSH tunnel to the head {head['instance']} ({ip}) failed: "
                                f"{log.read_text(errors='replace')[-800:].strip()}",
                                hint="SSH comes in from `security_group.ssh_cidrs` only; check ssh_user and the key "
                                     f"({cmd[cmd.index('-i') + 1]})")
        if _answers(url):
            _TUNNELS[(definition.name, ip)] = (proc, url)
            say(f"SSH tunnel 127.0.0.1:{port} -> {definition.ssh_user}@{ip} (head {head['instance']}):{DASHBOARD_PORT}")
            return url
        time.sleep(0.5)
    _stop(proc)
    raise ProviderError(f"the Jobs API on the head {head['instance']} did not answer through the SSH tunnel within "
                        f"{TUNNEL_TIMEOUT_S}s", hint=f"`launch status {definition.name}`; Ray's dashboard may still be "
                                                     "starting: try again in a minute")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _close_tunnels(name: str) -> None:
    for key in [k for k in _TUNNELS if k[0] == name]:
        _stop(_TUNNELS.pop(key)[0])


def address(definition: AwsCluster) -> str | None:
    """The Jobs API address of a running cluster (an SSH tunnel this process opens to the
    head, reused while it lives), else None when no head is set up."""
    head = _head(definition)
    if head is None or head["ray_status"] != STATUS_UP_TO_DATE or head["state"] != "running":
        return None
    return _reach(definition, head, _quiet)



def job_address(definition: AwsCluster, job_id: str) -> str | None:
    """Every job runs on the cluster's one head: `address`."""
    return address(definition)
