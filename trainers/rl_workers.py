"""The workers of RL from feedback: one Ray actor class that plays any role
(`trainers.rl_placement.ROLES`), each with a DeepSpeed engine of its own.

The workers of one role form a torch.distributed group of their own (gloo on CPU, nccl on
GPU; rank 0's address is the rendezvous), so a trained role's ZeRO shards and all-reduces
stay within it. Worker i of every role handles the i-th share of each rollout: the actor's
worker i generates it, and the same share goes to worker i of the reference, reward and
critic groups. Tensors travel through Ray's object store, never through the driver's
distributed group (it has none).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from trainers import checkpoint, generation, models, rl_losses, secrets_env
from trainers.ds_config import deepspeed_config, precision
from trainers.engine import build_engine, frozen_engine, inference_config, quiet_workers
from trainers.spec import parse_spec


class RoleWorker:
    """One worker of one role. Created by `trainers.ppo` with `ray.remote(...)` and a seat
    in the run's placement group."""

    def __init__(self, role: str, spec: dict[str, Any], rank: int, world: int, optimizer_steps: int):
        secrets_env.load()
        quiet_workers()
        self.role, self.rank, self.world = role, rank, world
        self.spec = parse_spec(spec)
        self.optimizer_steps = optimizer_steps
        self.engine = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's are the group's rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the role's group, load the model and build the engine; returns what it holds."""
        import deepspeed

        use_gpu = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        torch.manual_seed(self.spec.train.seed + self.rank)
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)
        spec, p = self.spec, self.spec.ppo
        self.model_dir = models.local_model_dir(spec.model.path)
        self.tokenizer = models.load_tokenizer(self.model_dir, spec.model.trust_remote_code, spec.data.chat_template)
        self.dtype = precision(spec, use_gpu)
        config = deepspeed_config(spec, use_gpu=use_gpu, total_steps=self.optimizer_steps,
                                  hidden_size=models.hidden_size(self.model_dir, spec.model.trust_remote_code))
        # One engine.step() per mini-batch: the mini-batches are ours, not DeepSpeed's.
        config.update(gradient_accumulation_steps=1, train_batch_size=config["train_micro_batch_size_per_gpu"]
                      * self.world)
        self.ds_config = config
        pad = self.tokenizer.pad_token_id
        plain = spec.model_copy(update={"model": spec.model.model_copy(update={"peft": None, "freeze": []})})
        if self.role == "actor":
            self.engine = build_engine(models.load_model(spec, self.model_dir, self.dtype, config), spec, config,
                                       self.optimizer_steps)
        elif self.role == "critic":
            # From the reward model when there is one (OpenRLHF's default), else the policy's weights.
            source = models.local_model_dir(p.reward_model) if p.reward_model else self.model_dir
            critic = spec.model_copy(update={"train": spec.train.model_copy(update={"lr": p.critic_lr or spec.train.lr})})
            self.engine = build_engine(models.load_model(critic, source, self.dtype, config, pad_token_id=pad,
                                                         head="value"), critic, config, self.optimizer_steps)
        elif self.role == "reference":
            frozen = inference_config(config)
            self.engine = frozen_engine(models.load_model(plain, self.model_dir, self.dtype, frozen), frozen)
        elif self.role == "reward":
            frozen = inference_config(config)
            self.engine = frozen_engine(models.load_model(plain, models.local_model_dir(p.reward_model), self.dtype,
                                                          frozen, pad_token_id=pad, head="score"), frozen)
        else:
            raise ValueError(f"unknown role {self.role!r}")
        trainable, total = models.parameter_counts(self.engine.module)
        return {"role": self.role, "rank": self.rank, "pid": os.getpid(), "parameters": total,
                "trainable": trainable, "zero_stage": self.engine.zero_optimization_stage()}

    # ------------------------------------------------------------ rollouts (actor)

    def generate(self, prompts: list[list[int]], seed: int) -> tuple[generation.Rollout, torch.Tensor]:
        """Sample this worker's share of the iteration's responses, and their log-probs
        under the policy as it is now (the `old` log-probs of the PPO ratio)."""
        p, tok = self.spec.ppo, self.tokenizer
        torch.manual_seed(seed)
        rollout = generation.hf_generate(self.engine.module, prompts, samples_per_prompt=p.samples_per_prompt,
                                         max_new_tokens=p.max_new_tokens, pad_id=tok.pad_token_id,
                                         eos_id=tok.eos_token_id, temperature=p.temperature, top_p=p.top_p,
                                         synced_gpus=self.engine.zero_optimization_stage() == 3)
        return rollout, self.logps(rollout)

    def decode(self, rollout: generation.Rollout) -> tuple[list[str], list[str]]:
        """Prompts and responses as text, for a reward function."""
        tok = self.tokenizer
        prompts = tok.batch_decode(rollout.sequences[:, :rollout.prompt_width], skip_special_tokens=True)
        responses = tok.batch_decode(rollout.responses * rollout.response_mask + tok.pad_token_id
                                     * (1 - rollout.response_mask), skip_special_tokens=True)
        return prompts, responses

    # ------------------------------------------------------------ scoring (any role)

    @torch.no_grad()
    def logps(self, rollout: generation.Rollout, adapters_off: bool = False) -> torch.Tensor:
        """Per-token log-probs of the responses (N, R): the policy's, or with `adapters_off`
        the LoRA base's (the reference without a second copy), or a reference worker's."""
        self.engine.eval()
        try:
            if adapters_off:
                with self.engine.module.disable_adapter():
                    logp, _ = generation.response_logps(self.engine, rollout, self.spec.ppo.temperature)
            else:
                logp, _ = generation.response_logps(self.engine, rollout, self.spec.ppo.temperature)
        finally:
            self.engine.train(self.role in ("actor", "critic"))
        return logp.cpu()

    @torch.no_grad()
    def values(self, rollout: generation.Rollout) -> torch.Tensor:
        """The critic's value of each response token's state (N, R), 0 on padding."""
        self.engine.eval()
        try:
            values = self._values(rollout)
        finally:
            self.engine.train()
        return values.cpu()

    @torch.no_grad()
    def scores(self, rollout: generation.Rollout) -> torch.Tensor:
        """The reward model's score of each prompt + response (N,), read at its last token."""
        dev = self.engine.device
        mask = rollout.attention_mask.to(dev)
        out = self.engine(input_ids=rollout.sequences.to(dev), attention_mask=mask,
                          position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
        return out.logits.float().squeeze(-1).cpu()

    def _values(self, rollout: generation.Rollout) -> torch.Tensor:
        dev = self.engine.device
        mask = rollout.attention_mask.to(dev)
        out = self.engine(input_ids=rollout.sequences.to(dev), attention_mask=mask,
                          position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
        p = rollout.prompt_width
        # The state before response token t is the sequence up to t - 1: its value sits there.
        return out.logits[:, p - 1:-1, 0].float() * rollout.response_mask.to(dev)

    # ------------------------------------------------------------ training (actor, critic)

    def train_policy(self, rollout: generation.Rollout, old_logp: torch.Tensor, advantages: torch.Tensor,
                     ref_logp: torch.Tensor | None, kl_coef: float, seed: int) -> dict[str, float]:
        """PPO's epochs over this worker's share: the clipped surrogate, the entropy bonus,
        and with `kl_in: loss` the KL to the reference as a loss term."""
        p = self.spec.ppo
        dev = self.engine.device

        def loss(mb: generation.Rollout, index: torch.Tensor, mask: torch.Tensor):
            logp, logits = generation.response_logps(self.engine, mb, p.temperature)
            old = old_logp[index].to(dev)
            surrogate, clip_frac = rl_losses.policy_loss(logp, old, advantages[index].to(dev), mask, clip=p.clip,
                                                         dual_clip=p.dual_clip)
            entropy = rl_losses.entropy(logits, mask)
            total = surrogate - p.entropy_coef * entropy
            if p.kl_in == "loss" and ref_logp is not None and kl_coef:
                total = total + kl_coef * rl_losses.masked_mean(
                    rl_losses.kl_estimate(logp, ref_logp[index].to(dev), p.kl_estimator), mask)
            return total, {"policy_loss": surrogate, "clip_frac": clip_frac, "entropy": entropy,
                           "approx_kl": rl_losses.masked_mean(0.5 * (logp - old) ** 2, mask)}

        return self._train(rollout, seed, loss)

    def train_values(self, rollout: generation.Rollout, old_values: torch.Tensor, returns: torch.Tensor,
                     seed: int) -> dict[str, float]:
        """The critic's epochs over the same mini-batches: the clipped value loss."""
        dev = self.engine.device

        def loss(mb: generation.Rollout, index: torch.Tensor, mask: torch.Tensor):
            value_loss = rl_losses.value_loss(self._values(mb), old_values[index].to(dev), returns[index].to(dev),
                                              mask, clip=self.spec.ppo.value_clip)
            return value_loss, {"value_loss": value_loss}

        return self._train(rollout, seed, loss)

    def _train(self, rollout: generation.Rollout, seed: int, loss_fn) -> dict[str, float]:
        """`ppo.epochs` passes over the share in `ppo.mini_batches` seeded mini-batches (as
        many on every rank: each step all-reduces), one optimizer step each; returns the
        metrics averaged over the steps, and the learning rate."""
        p = self.spec.ppo
        g = torch.Generator().manual_seed(seed)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(p.epochs):
            for index in torch.randperm(rollout.sequences.shape[0], generator=g).chunk(p.mini_batches):
                mb = rollout.select(index)
                total, metrics = loss_fn(mb, index, mb.response_mask.to(self.engine.device).float())
                self.engine.backward(total)
                self.engine.step()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                steps += 1
        out = {k: v / steps for k, v in sums.items()}
        out["lr" if self.role == "actor" else f"{self.role}_lr"] = self.engine.get_lr()[0]
        return out

    # ------------------------------------------------------------ checkpoints and export

    def save(self, ckpt: str, step: int) -> None:
        checkpoint.save_part(self.engine, ckpt, self.role, step, lora=self.spec.model.peft is not None)

    def restore(self, ckpt: str) -> None:
        checkpoint.restore_part(self.engine, ckpt, self.role, lora=self.spec.model.peft is not None)

    def export(self, run: str) -> None:
        """The actor as a Hugging Face model at `<run>/model` (LoRA: merged, and the adapter)."""
        lora = self.spec.model.peft is not None
        checkpoint.export(self.engine, self.tokenizer, run, self.model_dir, models.torch_dtype(self.dtype), lora)
