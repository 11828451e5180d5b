"""The AWS lookups `kind: aws` makes before it starts anything, and the boto3 plumbing for them.

`preflight` (what `cluster.aws.up` runs before it creates anything) checks, with read-only
boto3 calls, what Ray's cluster launcher would otherwise find out only after launching
something: the credentials (STS), availability zones and subnets, the instance types and
their offer in the zones, the AMIs and their architecture, the instance profiles and their
role, the key pair, and the security groups listed in `security_group.ids`. Each failure is
a ProviderError with a hint, naming the definition's field where one is at fault
(`cluster.aws_errors`). `instance_types` is also what `cluster.aws.capacity` sizes the
worker types by.

`client` and `call` are how every boto3 call of the kind is made (the provider's security
group, instance and status lookups too): clients honour the usual AWS configuration, and a
botocore error becomes a ProviderError.
"""

from __future__ import annotations

from typing import Any, Callable

from cluster import ProviderError
from cluster.aws_errors import DOCS, client_error, client_error_from, missing_credentials
from cluster.aws_render import ingress_problems
from cluster.aws_spec import AwsCluster, WorkerNodeType

__all__ = ["client", "call", "instance_types", "preflight"]


def client(service: str, definition: AwsCluster):
    """A boto3 client in the definition's region, with standard retries."""
    import boto3
    from botocore.config import Config

    # No endpoint given: boto3 honours AWS_ENDPOINT_URL (the tests' moto server), as Ray's clients do.
    return boto3.client(service, region_name=definition.region,
                        config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def call(fn: Callable, what: str, definition: AwsCluster, **kwargs):
    """`fn(**kwargs)`; a botocore error becomes a ProviderError saying `what` failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as e:
        raise client_error(e, what, definition) from None


def _check_credentials(definition: AwsCluster) -> None:
    import boto3

    if boto3.Session().get_credentials() is None:
        raise missing_credentials("AWS")
    call(client("sts", definition).get_caller_identity, "checking the AWS credentials", definition)


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
    ec2 = client("ec2", definition)
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


def preflight(definition: AwsCluster, on_progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """The lookups `up` makes before starting anything, each failure a ProviderError with a hint:
    credentials, zones, subnets, instance types (and their offer in the zones), AMIs (and their
    architecture), instance profiles (and their role), the key pair, existing security groups.
    Returns `instance_types(definition)`."""
    say = on_progress or (lambda _: None)
    _check_credentials(definition)
    ec2 = client("ec2", definition)
    if definition.availability_zones:
        zones = call(ec2.describe_availability_zones, "looking up availability_zones", definition,
                      Filters=[{"Name": "zone-name", "Values": list(definition.availability_zones)}])
        known = {z["ZoneName"] for z in zones["AvailabilityZones"]}
        if missing := [z for z in definition.availability_zones if z not in known]:
            raise ProviderError(f"availability_zones: {', '.join(missing)} not in {definition.region}",
                                hint=f"known zones: {', '.join(sorted(known)) or 'none'}")
    if definition.subnet_ids:
        subnets = call(ec2.describe_subnets, "looking up subnet_ids", definition, SubnetIds=list(definition.subnet_ids))
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
        offers = call(ec2.describe_instance_type_offerings, "looking up instance type offerings", definition,
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
        call(ec2.describe_key_pairs, "looking up ssh_key.key_pair_name", definition,
              KeyNames=[definition.ssh_key.key_pair_name])
        if not definition.ssh_key.path.is_file():
            raise ProviderError(f"ssh_key.private_key_path {definition.ssh_key.path} does not exist",
                                hint="the private key of the key pair, readable by you only (chmod 600)")
    if definition.security_group.ids:
        groups = call(ec2.describe_security_groups, "looking up security_group.ids", definition,
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
    images = call(client("ec2", definition).describe_images, "looking up the AMIs (`ami`)", definition,
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
    iam = client("iam", definition)
    names = {node.iam_instance_profile or definition.iam_instance_profile for _, node in definition.node_types().values()}
    for name in sorted(names):
        profile = call(iam.get_instance_profile, f"looking up the instance profile {name}", definition,
                        InstanceProfileName=name)["InstanceProfile"]
        if not profile.get("Roles"):
            raise ProviderError(f"instance profile {name} has no role: its nodes would get no credentials (no S3)",
                                hint=f"an admin adds the role: `aws iam add-role-to-instance-profile` ({DOCS})")

