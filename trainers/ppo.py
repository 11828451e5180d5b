"""PPO, GRPO and RLOO (`method: ppo`): the driver of RL from feedback, run inside the Ray
job in place of Ray Train's TorchTrainer.

Each role (`trainers.rl_placement`) is a group of `RoleWorker` Ray actors with a DeepSpeed
engine of its own, seated in one placement group (`ppo.placement`). One iteration:

  prompts (this iteration's share per actor worker, from the prepared `format: prompt` data)
  -> generate: the actor samples `samples_per_prompt` responses each, with their log-probs
  -> score: the reward model (or `ppo.reward_fn` on the decoded text, here in the driver),
     the reference's log-probs (with LoRA: the actor with adapters off), the critic's values
  -> advantages (`trainers.rl_experience`: gae | grpo | rloo, the KL in the reward or not)
  -> train: the actor's and the critic's PPO epochs, side by side
  -> one metrics line; an evaluation on held-out prompts every `train.eval_every`; a
     checkpoint every `checkpoint.every_n_steps` (actor, critic, and the driver's state)

`train.max_steps` counts iterations. A worker that dies makes the run start its groups
again from its newest complete checkpoint (`ppo.max_restarts` times).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from trainers import checkpoint, models, reward_fn, rl_placement, storage
from trainers.loop import PROGRESS
from trainers.spec import PpoRun

STATE = "state.json"  # the driver's part of a checkpoint
EVAL_SEED = 1_000_003  # the same samples at every evaluation: the changes are the policy's


@dataclass
class RunState:
    step: int = 0  # iterations done
    kl_coef: float = 0.0
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Groups:
    workers: dict[str, list]  # role -> Ray actor handles, by rank
    placement: Any

    def __getitem__(self, role: str) -> list:
        return self.workers.get(role, [])


def run(spec: PpoRun, run_uri: str, prepared, resume_from: str | None,
        report: Callable[[dict[str, Any]], None] | None = None, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, restarting from the newest complete checkpoint when a worker dies; export
    the actor. Returns the last metrics. `report` (a search's trial) receives each
    iteration's metrics, with `_checkpoint: True` once a complete checkpoint holds them;
    `tags` go on every metrics line (the trial's id)."""
    import ray

    prompts = _prompt_ids(prepared.train)
    eval_prompts = _prompt_ids(prepared.eval) if prepared.eval is not None else []
    restarts = 0
    while True:
        groups = None
        try:
            groups = start(spec)
            state = restore(spec, groups, resume_from)
            return train(spec, run_uri, groups, prompts, eval_prompts, state, report, tags or {})
        except ray.exceptions.RayActorError as e:
            if restarts >= spec.ppo.max_restarts:
                raise
            restarts += 1
            done = checkpoint.complete_checkpoints(run_uri)
            resume_from = done[-1] if done else resume_from
            print(f"a worker died ({type(e).__name__}); restart {restarts} of {spec.ppo.max_restarts}: from "
                  f"{resume_from or 'the start'}", flush=True)
        finally:
            if groups is not None:
                stop(groups)


def check(spec: PpoRun) -> None:
    """Before anything starts: the reward function imports and takes (prompts, responses);
    the reward model is there (a reward run's directory becomes its `model/`)."""
    from trainers.user_errors import JobUserError

    p = spec.ppo
    if p.reward_fn:
        try:
            reward_fn.load(p.reward_fn)
        except ValueError as e:
            raise JobUserError(str(e), hint="the module travels with the job from beside the spec; "
                                            "run `launch validate` on the spec") from None
        return
    exported = storage.join(p.reward_model, "model")
    if storage.exists(storage.join(exported, "config.json")):
        p.reward_model = exported
    elif not storage.exists(storage.join(p.reward_model, "config.json")):
        raise JobUserError(f"ppo.reward_model: {p.reward_model} holds no model (no config.json there or in its "
                           "model/)", hint="name the run directory of a finished `method: reward` run, or its model/")


# ---------------------------------------------------------------- the groups

def start(spec: PpoRun) -> Groups:
    """The placement group, and every role's workers set up in it (all groups at once)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from trainers.rl_workers import RoleWorker

    gpus = spec.resources.worker_gpus(ray.cluster_resources())
    bundles = rl_placement.bundles(spec, gpus)
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=300)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"ppo: the cluster cannot place {len(bundles)} bundles of {bundles[0]} "
                           f"(ppo.placement {spec.ppo.placement}) within 300 s")
    remote = ray.remote(RoleWorker)
    optimizer_steps = spec.train.max_steps * spec.ppo.epochs * spec.ppo.mini_batches
    spec_json = spec.model_dump(mode="json")
    workers: dict[str, list] = {}
    for seat in rl_placement.seats(spec, gpus):
        handle = remote.options(num_cpus=seat.cpus, num_gpus=seat.gpus, max_restarts=0,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(
                                    pg, placement_group_bundle_index=seat.bundle)).remote(
            seat.role, spec_json, seat.rank, spec.resources.workers, optimizer_steps)
        workers.setdefault(seat.role, []).append(handle)
    groups = Groups(workers, pg)
    setups = []
    for role, handles in workers.items():
        addr, port = ray.get(handles[0].rendezvous.remote())
        setups += [h.setup.remote(addr, port) for h in handles]
    infos = gather(setups)
    print(f"placement: {spec.ppo.placement}, {len(bundles)} bundles of {bundles[0]}", flush=True)
    for role in workers:
        mine = [i for i in infos if i["role"] == role]
        print(f"{role}: {len(mine)} workers (pids {', '.join(str(i['pid']) for i in mine)}), "
              f"{mine[0]['parameters']:,} parameters, {mine[0]['trainable']:,} trainable, ZeRO stage "
              f"{mine[0]['zero_stage']}", flush=True)
    if spec.ppo.kl_coef > 0 and "reference" not in workers:
        print("reference: the actor with its adapters disabled (no second copy)", flush=True)
    return groups


def stop(groups: Groups) -> None:
    import ray

    for handles in groups.workers.values():
        for h in handles:
            ray.kill(h, no_restart=True)
    ray.util.remove_placement_group(groups.placement)


def gather(refs: list) -> list:
    """ray.get of many results, failing as soon as any fails: the live workers of a group
    whose member died would otherwise wait in a collective for as long as gloo lets them."""
    import ray

    pending, index = list(refs), {r: i for i, r in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        out[index[ready[0]]] = ray.get(ready[0])
    return out


# ---------------------------------------------------------------- the iterations

def train(spec: PpoRun, run_uri: str, groups: Groups, prompts: list[list[int]], eval_prompts: list[list[int]],
          state: RunState, report=None, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from trainers.rl_experience import make_experience

    p, total = spec.ppo, spec.train.max_steps
    score_text = _reward_function(spec)
    tokenizer = models.load_tokenizer(models.local_model_dir(spec.model.path, weights=False),
                                      spec.model.trust_remote_code, spec.data.chat_template)
    n = spec.resources.workers
    tags = tags or {}
    if spec.train.eval_at_start and state.step == 0 and eval_prompts:
        _emit(state, evaluate(spec, groups, eval_prompts, score_text, tokenizer), tags)
    last: dict[str, Any] = {}
    while state.step < total:
        it = state.step
        batch = [prompts[i] for i in prompt_order(len(prompts), it, p.prompts_per_iteration, spec.train.seed)]
        t0 = time.perf_counter()
        rollouts = rollout(spec, groups, [batch[r::n] for r in range(n)], seed=spec.train.seed + 7919 * (it + 1))
        t1 = time.perf_counter()
        scored = score(spec, groups, rollouts, score_text, tokenizer)
        t2 = time.perf_counter()
        experiences = [make_experience(scores=s["scores"], group=s["rollout"].group, mask=s["rollout"].response_mask,
                                       old_logp=s["old_logp"], ref_logp=s["ref_logp"], values=s["values"],
                                       advantage=p.advantage, gamma=p.gamma, lam=p.lam,
                                       whiten=p.whiten_advantages, kl_coef=state.kl_coef,
                                       kl_estimator=p.kl_estimator, kl_in_reward=p.kl_in == "reward")
                       for s in scored]
        seed = spec.train.seed + 104729 * (it + 1)
        jobs = [w.train_policy.remote(ro, s["old_logp"], e.advantages, s["ref_logp"], state.kl_coef, seed + r)
                for r, (w, ro, s, e) in enumerate(zip(groups["actor"], rollouts["refs"], scored, experiences))]
        jobs += [w.train_values.remote(ro, s["values"], e.returns, seed + r)
                 for r, (w, ro, s, e) in enumerate(zip(groups["critic"], rollouts["refs"], scored, experiences))]
        results = gather(jobs)
        t3 = time.perf_counter()

        all_scores = torch.cat([s["scores"] for s in scored]).tolist()
        masks = [s["rollout"].response_mask.float() for s in scored]
        kl = torch.cat([e.kl.sum(1) for e in experiences])  # per response, summed over its tokens
        lengths = torch.cat([m.sum(1) for m in masks])
        trained = _mean_over(results[:n])
        if groups["critic"]:
            trained |= _mean_over(results[n:])
        line = {"epoch": (it * p.prompts_per_iteration) // max(1, len(prompts)),
                "loss": trained["policy_loss"], **trained,
                "reward_mean": statistics.fmean(all_scores), "reward_std": statistics.pstdev(all_scores),
                "kl": float(kl.mean()), "kl_coef": state.kl_coef, "response_length": float(lengths.mean()),
                "time_generate": round(t1 - t0, 3), "time_score": round(t2 - t1, 3), "time_train": round(t3 - t2, 3),
                "tokens_per_s": round(float(lengths.sum()) / max(t1 - t0, 1e-9), 1),
                "samples_per_s": round(len(all_scores) / max(t3 - t2, 1e-9), 2), "total_steps": total}
        state.step = it + 1
        if p.kl_target is not None and p.kl_coef > 0:
            state.kl_coef = _adapted(state.kl_coef, float(kl.mean()), len(all_scores), p)
        last = _emit(state, {k: round(v, 6) if isinstance(v, float) else v for k, v in line.items()}, tags)
        done = state.step == total
        if eval_prompts and (done or (spec.train.eval_every and state.step % spec.train.eval_every == 0)):
            last = last | _emit(state, evaluate(spec, groups, eval_prompts, score_text, tokenizer), tags)
        every = spec.checkpoint.every_n_steps
        saved = done or bool(every and state.step % every == 0)
        if saved:
            save(spec, run_uri, groups, state, last)
        if report is not None:
            report({k: v for k, v in last.items() if k != "eval_sample"} | ({"_checkpoint": True} if saved else {}))
    gather([w.export.remote(run_uri) for w in groups["actor"]])
    print(f"model exported to {run_uri}/model", flush=True)
    return last


def prompt_order(n: int, iteration: int, per_iteration: int, seed: int) -> list[int]:
    """Indices of this iteration's prompts: a seeded permutation per pass over the data,
    read from position iteration x per_iteration (so the data position is the iteration)."""
    import numpy as np

    out, start = [], iteration * per_iteration
    for pos in range(start, start + per_iteration):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng(seed + epoch).permutation(n)[i]))
    return out


def rollout(spec: PpoRun, groups: Groups, shares: list[list[list[int]]], seed: int) -> dict[str, Any]:
    """Each actor worker samples its share; the rollouts stay in Ray's object store for the
    other roles ("refs") and are fetched here for the advantages ("local")."""
    refs = [w.generate.options(num_returns=2).remote(share, seed + r)
            for r, (w, share) in enumerate(zip(groups["actor"], shares))]
    fetched = gather([ref for pair in refs for ref in pair])
    return {"refs": [pair[0] for pair in refs], "local": fetched[0::2], "old_logp": fetched[1::2]}


def score(spec: PpoRun, groups: Groups, rollouts: dict[str, Any], score_text, tokenizer) -> list[dict[str, Any]]:
    """Per actor worker's share: its rewards, the reference's log-probs, the critic's values."""
    import torch

    p, refs = spec.ppo, rollouts["refs"]
    jobs: dict[str, list] = {}
    if groups["reward"]:
        jobs["scores"] = [w.scores.remote(ro) for w, ro in zip(groups["reward"], refs)]
    if p.kl_coef > 0:
        jobs["ref_logp"] = ([w.logps.remote(ro) for w, ro in zip(groups["reference"], refs)] if groups["reference"]
                            else [w.logps.remote(ro, adapters_off=True) for w, ro in zip(groups["actor"], refs)])
    if groups["critic"]:
        jobs["values"] = [w.values.remote(ro) for w, ro in zip(groups["critic"], refs)]
    names = list(jobs)
    flat = gather([ref for name in names for ref in jobs[name]])
    n = len(refs)
    got = {name: flat[i * n:(i + 1) * n] for i, name in enumerate(names)}
    out = []
    for r, ro in enumerate(rollouts["local"]):
        scores = got["scores"][r] if "scores" in got else _function_scores(score_text, *decode(tokenizer, ro))
        out.append({"rollout": ro, "old_logp": rollouts["old_logp"][r], "scores": scores,
                    "ref_logp": got["ref_logp"][r] if "ref_logp" in got else None,
                    "values": got["values"][r] if "values" in got else None})
    return out


def decode(tokenizer, ro) -> tuple[list[str], list[str]]:
    """Prompts and responses as text (a reward function's arguments), without special tokens."""
    prompts = tokenizer.batch_decode(ro.sequences[:, :ro.prompt_width], skip_special_tokens=True)
    responses = tokenizer.batch_decode(ro.responses.masked_fill(ro.response_mask == 0, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
    return prompts, responses


def evaluate(spec: PpoRun, groups: Groups, eval_prompts: list[list[int]], score_text, tokenizer) -> dict[str, Any]:
    """Mean reward of the policy's responses to the held-out prompts, sampled with the same seed each time."""
    n = len(groups["actor"])
    rollouts = rollout(spec, groups, [eval_prompts[r::n] for r in range(n)], seed=EVAL_SEED)
    no_kl = spec.model_copy(update={"ppo": spec.ppo.model_copy(update={"kl_coef": 0.0})})
    scored = score(no_kl, Groups({"reward": groups["reward"]}, groups.placement), rollouts, score_text, tokenizer)
    values = [v for s in scored for v in s["scores"].tolist()]
    lengths = [float(x) for s in scored for x in s["rollout"].response_mask.sum(1).tolist()]
    ro = scored[0]["rollout"]  # one sample, as ids and text: what the reward was given
    sample = {"prompt_ids": ro.sequences[0, :ro.prompt_width][ro.attention_mask[0, :ro.prompt_width] == 1].tolist(),
              "response_ids": ro.responses[0][ro.response_mask[0] == 1].tolist(),
              "reward": round(float(scored[0]["scores"][0]), 6)}
    prompt, response = (tokenizer.decode(sample[k], skip_special_tokens=True) for k in ("prompt_ids", "response_ids"))
    print(f"sample: {prompt!r} -> {response!r}: reward {sample['reward']:.4f}", flush=True)
    return {"eval_reward": round(statistics.fmean(values), 6), "eval_reward_std": round(statistics.pstdev(values), 6),
            "eval_response_length": round(statistics.fmean(lengths), 3), "eval_sample": sample}


# ---------------------------------------------------------------- checkpoints

def save(spec: PpoRun, run_uri: str, groups: Groups, state: RunState, metrics: dict[str, Any]) -> None:
    """Actor and critic (weights, optimizer, schedule) and the driver's state; complete once
    the manifest is written, after every file is in storage."""
    ckpt = storage.join(run_uri, "checkpoints", checkpoint.step_dir_name(state.step))
    trained = [role for role in rl_placement.TRAINED if groups[role]]
    gather([w.save.remote(ckpt, state.step) for role in trained for w in groups[role]])
    storage.write_text(storage.join(ckpt, STATE), json.dumps(state.__dict__))
    n = spec.resources.workers
    checkpoint.write_manifest(ckpt, state.step, [f"{role}_rank_{r}.json" for role in trained for r in range(n)],
                              metrics, extra=[STATE], world=n)
    checkpoint.apply_retention(run_uri, spec.checkpoint.keep)
    checkpoint.write_metrics(run_uri, state.metrics)
    print(f"checkpoint saved: step {state.step}", flush=True)


def restore(spec: PpoRun, groups: Groups, ckpt: str | None) -> RunState:
    if ckpt is None:
        return RunState(kl_coef=spec.ppo.kl_coef)
    text = storage.read_text(storage.join(ckpt, STATE))
    if text is None:
        raise ValueError(f"checkpoint.resume: {ckpt} has no {STATE}: it is not a checkpoint of a ppo run")
    gather([w.restore.remote(ckpt) for role in rl_placement.TRAINED for w in groups[role]])
    state = RunState(**json.loads(text))
    print(f"restored iteration {state.step} from {ckpt}", flush=True)
    return state


# ---------------------------------------------------------------- internals

def _prompt_ids(ds) -> list[list[int]]:
    from trainers.data import PROMPT_COLUMN

    return [list(map(int, row[PROMPT_COLUMN])) for row in ds.iter_rows()]


def _function_scores(fn, prompts: list[str], responses: list[str]):
    """The reward function's scores of one share; what it got wrong is the user's to fix
    (exit 2 with its message), not a traceback."""
    import torch

    from trainers.user_errors import JobUserError

    try:
        return torch.tensor(reward_fn.scores(fn, prompts, responses), dtype=torch.float32)
    except ValueError as e:
        raise JobUserError(str(e), hint="a reward function returns one finite number per response") from None


def _reward_function(spec: PpoRun):
    return reward_fn.load(spec.ppo.reward_fn) if spec.ppo.reward_fn else None


def _adapted(coef: float, kl: float, n: int, p) -> float:
    from trainers.rl_losses import adaptive_kl_coef

    return adaptive_kl_coef(coef, kl, p.kl_target, p.kl_horizon, n)


def _mean_over(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in results) for k in results[0]}


def _emit(state: RunState, metrics: dict[str, Any], tags: dict[str, Any]) -> dict[str, Any]:
    line = {"step": state.step, **metrics, **tags}
    state.metrics.append(line)
    print(PROGRESS + json.dumps(line), flush=True)
    return line
