"""Which roles a `ppo` run has and where their workers go (torch-free: the launcher checks
capacity with it before anything starts).

Roles: `actor` (the policy, trained; it also generates), `critic` (the value model, trained;
`advantage: gae` only), `reference` (the frozen starting policy; not with LoRA, whose
reference is the actor with its adapters disabled, nor with `kl_coef: 0`), `reward` (a
reward model; not with `reward_fn`, which the driver calls). Every role has
`resources.workers` workers; worker i of each role works on the i-th share of a rollout.

`colocate`: one placement group of `workers` bundles `{CPU: c, GPU: g}`; worker i of every
role goes in bundle i with c/roles CPUs and g/roles GPUs (the roles share a GPU and take turns).
`spread`: `workers x roles` bundles; each worker has a bundle of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("actor", "critic", "reference", "reward")
TRAINED = ("actor", "critic")


def roles(spec) -> list[str]:
    p = spec.ppo
    out = ["actor"]
    if p.advantage == "gae":
        out.append("critic")
    if p.kl_coef > 0 and spec.model.peft is None:
        out.append("reference")
    if p.reward_model is not None:
        out.append("reward")
    return out


@dataclass(frozen=True)
class Seat:
    """Where one worker of one role runs: a bundle of the placement group and its share."""

    role: str
    rank: int
    bundle: int
    cpus: float
    gpus: float


def bundles(spec, gpus_per_worker: int) -> list[dict[str, float]]:
    """The placement group's bundles."""
    r = spec.resources
    one = {"CPU": float(r.cpus_per_worker), **({"GPU": float(gpus_per_worker)} if gpus_per_worker else {})}
    n = r.workers if spec.ppo.placement == "colocate" else r.workers * len(roles(spec))
    return [dict(one) for _ in range(n)]


def seats(spec, gpus_per_worker: int) -> list[Seat]:
    """Every worker of every role, with its bundle and share of it."""
    r, names = spec.resources, roles(spec)
    colocate = spec.ppo.placement == "colocate"
    share = len(names) if colocate else 1
    return [Seat(role, rank, rank if colocate else i * r.workers + rank, r.cpus_per_worker / share,
                 gpus_per_worker / share)
            for i, role in enumerate(names) for rank in range(r.workers)]


def needs(spec, gpus_per_worker: int) -> dict[str, float]:
    """CPUs and GPUs the run reserves on the cluster."""
    total: dict[str, float] = {}
    for b in bundles(spec, gpus_per_worker):
        for k, v in b.items():
            total[k] = total.get(k, 0) + v
    return total
