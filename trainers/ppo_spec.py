"""The `ppo:` section of a run spec (`method: ppo`; torch-free, like `trainers.spec`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from trainers.spec_base import Strict


class PpoSpec(Strict):
    """Reinforcement learning from a reward: PPO with a critic (`advantage: gae`), or the
    critic-free GRPO and RLOO. One iteration samples `prompts_per_iteration` prompts,
    generates `samples_per_prompt` responses to each with the policy, scores them, and
    trains the policy (and critic) `epochs` times over them; `train.max_steps` counts
    iterations."""

    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    """`gae`: PPO with a critic (value model) and generalised advantage estimation;
    `grpo`: each response's reward normalised within its prompt's group (DeepSeekMath);
    `rloo`: each response's reward less the mean of the other responses to its prompt."""
    reward_model: str | None = None
    """A reward model: the `model/` an earlier `method: reward` run exported (its run
    directory, local or `s3://`, or the model directory itself). It scores prompt + response
    with the policy's tokenizer. Set this or `reward_fn`."""
    reward_fn: str | None = None
    """A reward function by import path, `module:function` (`mypkg.rules:score`): called with
    lists of decoded prompts and responses, returns one float per response. The module is a
    `.py` file or package beside the spec (or importable by the launcher) and travels with
    the job."""
    prompts_per_iteration: int = Field(8, gt=0)
    """Prompts sampled per iteration, over all actor workers."""
    samples_per_prompt: int = Field(4, gt=0)
    """Responses generated per prompt (the group GRPO and RLOO compare within)."""
    max_new_tokens: int = Field(32, gt=0)
    """Longest response generated."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the log-probs the losses use are at the same temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling cut (1: none)."""
    epochs: int = Field(1, gt=0)
    """Passes over each iteration's rollouts."""
    mini_batches: int = Field(1, gt=0)
    """Optimizer steps per pass: the rollouts are split into this many mini-batches."""
    clip: float = Field(0.2, gt=0)
    """PPO's clip range of the probability ratio."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip bound c (Ye et al. 2020) for negative advantages; omit to leave it out."""
    value_clip: float = Field(0.2, gt=0)
    """Clip range of the value update around the values at sampling time (gae)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount (gae)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda (gae)."""
    whiten_advantages: bool = True
    """Normalise the advantages over each rollout batch (gae)."""
    kl_coef: float = Field(0.05, ge=0)
    """Weight of the KL to the reference (0: no reference at all)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman 2020): `k1` log-ratio, `k2` half its square, `k3`
    ratio - 1 - log-ratio (unbiased, non-negative; GRPO's)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL acts: subtracted from the reward (PPO/RLOO, InstructGPT) or added to the
    policy loss (GRPO)."""
    kl_target: float | None = Field(None, gt=0)
    """Adaptive KL coefficient (Ziegler et al. 2019): move `kl_coef` so that the KL per
    response tends to this; omit for a fixed coefficient."""
    kl_horizon: int = Field(10000, gt=0)
    """Adaptive KL: responses over which the coefficient adapts."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus in the policy loss."""
    critic_lr: float | None = Field(None, gt=0)
    """Learning rate of the critic (gae); default `train.lr`."""
    placement: Literal["colocate", "spread"] = "colocate"
    """`colocate`: worker i of every role shares bundle i of one placement group (the same
    GPU, each role a fraction); `spread`: every role's workers get bundles of their own."""
    max_restarts: int = Field(1, ge=0)
    """Times a run whose worker died is restarted from its newest complete checkpoint."""

    @model_validator(mode="after")
    def _one_reward(self) -> "PpoSpec":
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("set exactly one of ppo.reward_model (a reward run's exported model) or ppo.reward_fn "
                             "(module:function)")
        if self.reward_fn is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", self.reward_fn):
            raise ValueError(f"ppo.reward_fn {self.reward_fn!r}: use module:function, e.g. mypkg.rules:score")
        if self.advantage in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.samples_per_prompt: {self.advantage} compares the responses to one prompt; "
                             "use 2 or more")
        return self
