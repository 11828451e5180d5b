"""AWS errors as ProviderErrors that say what to do: `kind: aws`'s error mapping.

Pure: no AWS call. `launch_error` reads an EC2 launch failure (a RunInstances error code, as
Ray's cluster launcher reports it for a node type) as capacity, quota, spot price or a missing
instance profile, with the fallback a spot worker type has; `client_error_from` /
`client_error` read the errors any AWS call can give (credentials, permissions, AMIs, key
pairs, subnets, security groups, IAM entities). Here, apart from the provider (`cluster.aws`)
and its pre-flight lookups (`cluster.aws_preflight`), so both map errors the same way and the
messages are tested offline (tests/unit/test_aws_render.py).
"""

from __future__ import annotations

import re

from cluster import ProviderError
from cluster.aws_spec import HEAD_NODE_TYPE, AwsCluster

__all__ = ["DOCS", "quota_name", "launch_error", "client_error_from", "client_error", "missing_credentials"]

# The admin's and the user's guide the hints point at.
DOCS = "docs/aws.md"


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

