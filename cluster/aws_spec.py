"""AWS cluster definitions: `configs/clusters/NAME.yaml` with `kind: aws`.

The cluster is run by Ray's own cluster launcher (`ray.autoscaler.sdk`, what `ray up`
uses): `cluster.aws_render` turns this definition into the launcher's YAML and
`cluster.aws` drives it. An admin creates the IAM instance profile once (docs/aws.md);
users only name the cluster (`launch run.yaml --cluster aws-dev`).

What the models keep out: AWS keys (nodes reach S3 through the instance profile) and a
dashboard / Jobs API open to the internet (the launcher reaches it through an SSH tunnel;
the security group lets in SSH from the CIDRs named here, and nothing else from outside).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

_REGION = r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$"
_INSTANCE_TYPE = r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$"
_AMI = r"^ami-([0-9a-f]{8}|[0-9a-f]{17})$"
_SUBNET = r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$"
_SECURITY_GROUP = r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$"
# IAM names: https://docs.aws.amazon.com/IAM/latest/APIReference/API_CreateInstanceProfile.html
_IAM_NAME = r"^[\w+=,.@-]{1,128}$"
_NODE_TYPE_NAME = r"^[a-z][a-z0-9-]{0,29}$"
_MAX_PRICE = r"^\d+(\.\d+)?$"

# Keys of the rendered node_config that come from fields of this definition: set them there,
# not through `node_config` (where a second value would silently win or be overwritten).
MANAGED_NODE_CONFIG = {
    "InstanceType": "instance_type",
    "ImageId": "ami",
    "IamInstanceProfile": "iam_instance_profile",
    "BlockDeviceMappings": "disk_size_gb / root_device_name",
    "InstanceMarketOptions": "spot / spot_max_price",
    "TagSpecifications": "tags",
    "KeyName": "ssh_key",
    "SubnetId": "subnet_ids",
    "SubnetIds": "subnet_ids",
    "NetworkInterfaces": "subnet_ids and security_group",
    "SecurityGroupIds": "security_group",
    "SecurityGroups": "security_group",
    "MinCount": "min_workers / max_workers (Ray sets MinCount and MaxCount)",
    "MaxCount": "min_workers / max_workers (Ray sets MinCount and MaxCount)",
}
# Tag keys that Ray's AWS node provider (ray-*, Name), AWS (aws:) or the launcher (llmlaunch-) set.
RESERVED_TAG_PREFIXES = ("aws:", "ray-", "llmlaunch-")
RESERVED_TAGS = ("Name",)
HEAD_NODE_TYPE = "head"
FALLBACK_SUFFIX = "-on-demand"


def _as_text(value: Any) -> Any:
    # YAML reads `cost-centre: 1234` as an int; EC2 tags are strings.
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _cidr(value: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"{value!r} is not a CIDR block such as 203.0.113.0/24 ({e})") from None
    return str(net)


def _tag_key(key: str) -> str:
    if not 1 <= len(key) <= 128:
        raise ValueError(f"tag key {key!r} must be 1-128 characters")
    if key in RESERVED_TAGS or key.lower().startswith(RESERVED_TAG_PREFIXES):
        raise ValueError(f"tag key {key!r} is set by AWS, Ray or the launcher (reserved: Name, aws:*, ray-*, "
                         "llmlaunch-*)")
    return key


def _tag_value(value: str) -> str:
    if len(value) > 256:
        raise ValueError("tag values must be at most 256 characters")
    return value


InstanceType = Annotated[str, Field(pattern=_INSTANCE_TYPE)]
"""An EC2 instance type, e.g. `g5.12xlarge`. Whether the region offers it is checked by `launch up`."""
Ami = Annotated[str, Field(pattern=_AMI)]
Cidr = Annotated[str, AfterValidator(_cidr)]
IamName = Annotated[str, Field(pattern=_IAM_NAME)]
TagKey = Annotated[str, AfterValidator(_tag_key)]
TagValue = Annotated[str, BeforeValidator(_as_text), AfterValidator(_tag_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class _NodeType(_Strict):
    """What the head and the worker node types share: one EC2 launch configuration."""

    instance_type: InstanceType
    """EC2 instance type, e.g. `m6i.xlarge` (head) or `g5.12xlarge` (4 x A10G)."""
    disk_size_gb: int = Field(200, ge=8, le=16384)
    """Size of the root EBS volume (gp3, encrypted, deleted with the instance) in GB: holds the
    Python environment, the hub model cache and local checkpoint staging."""
    ami: Ami | None = None
    """AMI of this node type; default: the cluster's `ami`."""
    iam_instance_profile: IamName | None = None
    """Instance profile of this node type; default: the cluster's `iam_instance_profile`."""
    node_config: dict[str, Any] = {}
    """More EC2 RunInstances parameters for this node type (e.g. `MetadataOptions`, `Placement`,
    `EbsOptimized`), checked against botocore's RunInstances shape by `launch render` / `up`.
    Keys that fields of this definition set (InstanceType, ImageId, ...) are refused here."""

    @model_validator(mode="after")
    def _no_managed_keys(self) -> _NodeType:
        for key in self.node_config:
            if key in MANAGED_NODE_CONFIG:
                raise ValueError(f"node_config.{key}: set `{MANAGED_NODE_CONFIG[key]}` instead")
        return self


class HeadNode(_NodeType):
    """The head node: GCS, dashboard / Jobs API, the job driver and Ray's autoscaler, which
    launches and terminates the workers (so its instance profile needs EC2 rights: docs/aws.md).
    Always on-demand: losing the head loses the cluster."""

    instance_type: InstanceType = "m6i.xlarge"
    """EC2 instance type of the head (CPU only is enough: no training runs on it when there are workers)."""


class OnDemandFallback(_Strict):
    """An on-demand node type beside a spot one, for when spot capacity is not there.

    Rendered as its own node type, `<name>-on-demand`, with a lower autoscaler `priority`
    than the spot type: Ray's autoscaler picks the spot type first (docs/aws.md says when it
    moves to this one)."""

    instance_type: InstanceType | None = None
    """Instance type of the fallback; default: the spot type's (same shape, so a run fits either)."""
    max_workers: int | None = Field(None, ge=1)
    """Most fallback nodes at once; default: the spot type's `max_workers`."""


class WorkerNodeType(_NodeType):
    """One pool of identical worker nodes that Ray's autoscaler scales between min and max."""

    name: Annotated[str, Field(pattern=_NODE_TYPE_NAME)]
    """Node type name (lower-case letters, digits, '-'; at most 30): Ray's `ray-user-node-type` tag."""
    min_workers: int = Field(0, ge=0)
    """Fewest nodes kept running (0: the pool costs nothing while idle)."""
    max_workers: int = Field(1, ge=1)
    """Most nodes the autoscaler may start."""
    spot: bool = False
    """Run on spot instances (RunInstances `InstanceMarketOptions`, one-time, terminated on
    interruption). A preempted run resumes from its newest complete checkpoint (`max_failures`)."""
    spot_max_price: Annotated[str, BeforeValidator(_as_text), Field(pattern=_MAX_PRICE)] | None = None
    """Highest spot price per instance-hour in USD, e.g. `"3.50"`; default: the on-demand price."""
    on_demand_fallback: OnDemandFallback | None = None
    """An on-demand node type to fall back to when there is no spot capacity (spot types only)."""

    @model_validator(mode="after")
    def _consistent(self) -> WorkerNodeType:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        if not self.spot and (self.spot_max_price is not None or self.on_demand_fallback is not None):
            raise ValueError("spot_max_price and on_demand_fallback apply to spot node types (spot: true)")
        if self.name == HEAD_NODE_TYPE or self.name.endswith(FALLBACK_SUFFIX):
            raise ValueError(f"name {self.name!r}: `{HEAD_NODE_TYPE}` and names ending in `{FALLBACK_SUFFIX}` are "
                             "used by the launcher")
        return self

    @property
    def fallback_name(self) -> str:
        return f"{self.name}{FALLBACK_SUFFIX}"


class SecurityGroup(_Strict):
    """The nodes' security group. By default the launcher creates one (`llmlaunch-<name>`) before
    Ray looks for it, with two inbound rules only: all traffic between the cluster's own nodes, and
    SSH (22/tcp) from `ssh_cidrs`. The dashboard / Jobs API (8265) is never opened to outside
    addresses: the launcher reaches it through an SSH tunnel."""

    name: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    """Name of the group the launcher creates and keeps (default: `llmlaunch-<cluster name>`)."""
    ssh_cidrs: list[Cidr] = []
    """Where SSH may come from: the launcher machines' public addresses (e.g. your office's
    `203.0.113.0/24`, a VPN's range). Required unless `ids` names existing groups. `0.0.0.0/0`
    is taken only when written here."""
    ids: list[Annotated[str, Field(pattern=_SECURITY_GROUP)]] = []
    """Existing groups (an admin's) to use as they are instead of a launcher-made one. They must let
    the nodes reach each other and SSH in from the launcher; `launch up` refuses groups that open
    any port but 22 (or 8265 at all) to 0.0.0.0/0 or ::/0."""

    @model_validator(mode="after")
    def _consistent(self) -> SecurityGroup:
        if not self.ids and not self.ssh_cidrs:
            raise ValueError("ssh_cidrs is required (the public CIDRs the launcher connects from, e.g. "
                             "203.0.113.7/32), unless `ids` names existing security groups")
        if self.ids and (self.ssh_cidrs or self.name):
            raise ValueError("`ids` uses existing security groups as they are: drop `name` and `ssh_cidrs`")
        return self


class SshKey(_Strict):
    """An existing EC2 key pair and its private key on this machine (instead of Ray's default:
    a key pair `ray-autoscaler_<region>` it creates, with the key in `~/.ssh/`)."""

    key_pair_name: Annotated[str, Field(min_length=1, max_length=255)]
    """Name of the EC2 key pair in the region (RunInstances `KeyName`)."""
    private_key_path: Annotated[str, Field(min_length=1)]
    """Path of its private key (`~` allowed); readable by you only, as ssh requires."""

    @property
    def path(self) -> Path:
        return Path(self.private_key_path).expanduser()


class AwsCluster(_Strict):
    """A Ray cluster on EC2, run by Ray's own cluster launcher."""

    kind: Literal["aws"] = "aws"
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,39}$")]
    """Cluster name (Ray's `cluster_name`, the `ray-cluster-name` tag on every instance): lower-case
    letters, digits and '-', starting with a letter, at most 40 characters."""
    region: Annotated[str, Field(pattern=_REGION)]
    """AWS region, e.g. `us-east-1`."""
    availability_zones: list[Annotated[str, Field(pattern=r"^[a-z0-9-]+[a-z]$")]] = []
    """Zones nodes may launch in, in order of preference: Ray tries the first and moves to the next
    when a launch fails (e.g. no capacity). Default: any zone with a usable subnet."""
    subnet_ids: list[Annotated[str, Field(pattern=_SUBNET)]] = []
    """Subnets for every node (one VPC); default: Ray picks the region's subnets that give public IPs
    (or any, with `use_internal_ips`) in `availability_zones`."""
    use_internal_ips: bool = False
    """Reach the nodes at their private IPs (the launcher runs inside the VPC, or on a VPN into it);
    the subnets then need not give public IPs."""
    iam_instance_profile: IamName
    """Name of the IAM instance profile every node runs as: how the nodes reach S3 (no keys are
    copied to them). An admin creates it (docs/aws.md); the head's also needs EC2 rights, since
    Ray's autoscaler on the head launches the workers (use `head.iam_instance_profile` to keep them
    off the workers)."""
    security_group: SecurityGroup
    """The nodes' security group and who may SSH in."""
    ssh_user: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] = "ubuntu"
    """Login user of the AMI (`ubuntu` on Ubuntu AMIs, `ec2-user` on Amazon Linux)."""
    ssh_key: SshKey | None = None
    """Key pair to use; default: Ray's (it creates `ray-autoscaler_<region>` and `~/.ssh/ray-autoscaler_<region>.pem`)."""
    ami: Ami | None = None
    """AMI of every node type that sets none. Default: Ray's default Deep Learning AMI for the region
    (ray.autoscaler._private.aws.config.DEFAULT_AMI), which is old (Ubuntu 18.04, CUDA 11.2): for GPU
    nodes set a current Deep Learning Base AMI of the region (docs/aws.md says how to find it)."""
    root_device_name: str = Field("/dev/sda1", pattern=r"^/dev/[a-z0-9]+$")
    """Root device of the AMI, which `disk_size_gb` resizes (`/dev/sda1` on Ubuntu, `/dev/xvda` on Amazon Linux)."""
    image: str | None = Field(None, min_length=1)
    """Container image to run Ray in on every node (Ray's `docker` support): it must hold Ray 2.60 and
    `llmlaunch[train]` for the nodes' CUDA. Default: none, Ray runs on the AMI's Python, set up by
    `setup_commands`."""
    setup_commands: list[Annotated[str, Field(min_length=1)]] = []
    """Shell commands run on every node before Ray starts (inside `image` when set; Ray runs them in a
    login shell, again on every `launch up`, so make them idempotent). Without `image` they must
    install Ray 2.60 and `llmlaunch[train]`, e.g. from a wheel in S3 that the instance profile can read
    (llmlaunch is not on PyPI: a `pip install llmlaunch` there would fetch someone else's package)."""
    tags: dict[TagKey, TagValue] = {}
    """Tags on every instance, volume and the security group, for cost reports (`team`, `project`,
    `cost-centre`, ...). Ray adds `ray-cluster-name`, the launcher `llmlaunch-cluster`."""
    cache_stopped_nodes: bool = False
    """Stop idle or torn-down on-demand nodes instead of terminating them, to restart them faster
    (Ray's option; their disks keep costing). False: `launch down` terminates every node."""
    idle_timeout_minutes: int = Field(10, ge=1)
    """Minutes a worker may sit idle before the autoscaler removes it."""
    max_failures: int | None = Field(None, ge=-1)
    """How often a run on this cluster restarts its workers from the newest complete checkpoint after
    losing a node (Ray Train `FailureConfig(max_failures)`; -1: without limit), when the run spec
    sets none (`env.LLMLAUNCH_MAX_FAILURES`). Default: 3 if a worker type is spot, else 0."""
    head: HeadNode = HeadNode()
    """The head node."""
    workers: list[WorkerNodeType] = []
    """Worker node types; empty runs everything on the head (small CPU jobs only)."""

    @model_validator(mode="after")
    def _consistent(self) -> AwsCluster:
        names = [w.name for w in self.workers] + [w.fallback_name for w in self.workers if w.on_demand_fallback]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"worker node type names must be unique: {', '.join(dupes)}")
        for zone in self.availability_zones:
            if not re.fullmatch(re.escape(self.region) + r"(-[a-z0-9]+-\d)?[a-z]", zone):
                raise ValueError(f"availability zone {zone!r} is not in region {self.region}")
        if len(set(self.availability_zones)) != len(self.availability_zones):
            raise ValueError("availability_zones lists a zone twice")
        if self.image is None and not self.setup_commands:
            raise ValueError("set `image` (a container image with Ray 2.60 and llmlaunch[train]) or `setup_commands` "
                             "(that install them on the AMI): nodes need the training packages")
        return self

    @property
    def security_group_name(self) -> str:
        return self.security_group.name or f"llmlaunch-{self.name}"

    @property
    def effective_max_failures(self) -> int:
        """`max_failures`, or its default: 3 with spot workers (a preemption is expected), else 0."""
        if self.max_failures is not None:
            return self.max_failures
        return 3 if any(w.spot for w in self.workers) else 0

    def node_types(self) -> dict[str, tuple[str, _NodeType]]:
        """Every rendered node type: name -> (where in this definition it comes from, the model).
        Spot types with a fallback give two: `<name>` and `<name>-on-demand`."""
        types: dict[str, tuple[str, _NodeType]] = {HEAD_NODE_TYPE: ("head", self.head)}
        for i, w in enumerate(self.workers):
            types[w.name] = (f"workers[{i}]", w)
            if w.on_demand_fallback:
                types[w.fallback_name] = (f"workers[{i}].on_demand_fallback", w)
        return types
