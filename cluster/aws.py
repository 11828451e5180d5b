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

This module is the provider interface (cluster/__init__.py) and what only `up` / `down` /
`status` use: the security group, the cluster's instances, Ray's launcher and its output.
The pieces it builds on: `cluster.aws_spec` (the definition), `cluster.aws_render` (the
rendered config), `cluster.aws_preflight` (the read-only lookups before `up`, and the boto3
client and call every AWS request goes through), `cluster.aws_errors` (AWS errors as
ProviderErrors with a hint) and `cluster.aws_tunnel` (the SSH tunnel to the Jobs API).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import sys
import threading
import time
from typing import Any, Callable

from cluster import ClusterStatus, ProviderError
from cluster.aws_errors import client_error, launch_error
from cluster.aws_preflight import call, client, instance_types, preflight
from cluster.aws_render import ConfigError, ingress_problems, ssh_ip_permissions, tags
from cluster.aws_spec import HEAD_NODE_TYPE, AwsCluster
from cluster.aws_tunnel import close_tunnels, reach

__all__ = ["READS_LOCAL_FILES", "USES_THIS_PYTHON", "CLUSTER_CREDENTIALS", "render", "validate", "documents",
           "job_address", "max_failures", "ensure_security_group", "up", "head_would_be_replaced", "address",
           "nodes", "status", "down", "capacity", "supports", "ConfigError"]

# The provider interface (cluster/__init__.py): nodes read no file of this machine, run their own
# Python (setup_commands or `image`), and reach S3 as their instance profile; no key is copied.
READS_LOCAL_FILES = False
USES_THIS_PYTHON = False
CLUSTER_CREDENTIALS = "the nodes' instance profile (`iam_instance_profile`)"

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


# ---------------------------------------------------------------- security group


def _vpc_ray_picks(definition: AwsCluster, config: dict[str, Any]) -> str:
    """The VPC Ray will launch the nodes in: the one of the first usable subnet, as chosen by
    Ray's own `_configure_subnet` (zones in order, public-IP subnets unless use_internal_ips)."""
    import click
    from ray.autoscaler._private.aws.config import _configure_subnet
    from ray.autoscaler._private.util import prepare_config

    if definition.subnet_ids:
        reply = call(client("ec2", definition).describe_subnets, "looking up subnet_ids", definition,
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
    reply = call(client("ec2", definition).describe_subnets, "looking up subnets", definition, SubnetIds=[subnet])
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
    ec2 = client("ec2", definition)
    name = definition.security_group_name
    vpc = _vpc_ray_picks(definition, config)
    found = call(ec2.describe_security_groups, f"looking up security group {name}", definition,
                  Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    if not found:
        tag_list = [{"Key": k, "Value": v} for k, v in tags(definition).items()]
        created = call(ec2.create_security_group, f"creating security group {name}", definition,
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
        call(ec2.revoke_security_group_ingress, f"updating security group {name}", definition,
              GroupId=group_id, IpPermissions=_as_perms(extra))
        say(f"security group {name}: removed {len(extra)} inbound rule(s) the definition no longer has")
    if missing := wanted - current:
        call(ec2.authorize_security_group_ingress, f"updating security group {name}", definition,
              GroupId=group_id, IpPermissions=_as_perms(missing, described=True))
    return group_id


# ---------------------------------------------------------------- nodes


def nodes(definition: AwsCluster) -> list[dict[str, Any]]:
    """The cluster's pending and running instances (Ray's `ray-cluster-name` tag), as dicts."""
    ec2 = client("ec2", definition)
    pages = call(ec2.describe_instances, "listing the cluster's instances", definition,
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
        return reach(definition, head, say)
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
    return reach(definition, head, say)


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
    close_tunnels(definition.name)
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
        ec2 = client("ec2", definition)
        info = call(ec2.describe_instance_types, "looking up instance types", definition,
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


def address(definition: AwsCluster) -> str | None:
    """The Jobs API address of a running cluster (an SSH tunnel this process opens to the
    head, reused while it lives), else None when no head is set up."""
    head = _head(definition)
    if head is None or head["ray_status"] != STATUS_UP_TO_DATE or head["state"] != "running":
        return None
    return reach(definition, head, _quiet)


def job_address(definition: AwsCluster, job_id: str) -> str | None:
    """Every job runs on the cluster's one head: `address`."""
    return address(definition)
