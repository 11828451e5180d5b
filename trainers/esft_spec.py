"""The `esft:` section of a run spec (`method: esft`; torch-free, like `trainers.spec`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainers.spec_base import Strict

DEFAULT_TOP_P = {"gate": 0.1, "token": 0.2}  # the paper's settings (Wang et al. 2024, section 4)


class EsftSpec(Strict):
    """Expert-Specialized Fine-Tuning (DeepSeek, Wang et al. 2024) of a mixture-of-experts
    model: score every routed expert's relevance to the task on a sample of the training
    data, select per layer the experts that carry `top_p` of the score, and train those
    alone; everything else stays bitwise as it was. See docs/methods.md."""

    score: Literal["token", "gate"] = "token"
    """How relevance is measured on the sample: `token` (ESFT-Token), the share of the
    layer's routing choices that go to the expert; `gate` (ESFT-Gate), the expert's mean
    gate weight. Both averaged per example, then over examples, and normalised per layer."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Per layer, experts are taken in order of score until their cumulative score reaches
    this share (the expert that crosses it included). Default: 0.2 for `token`, 0.1 for
    `gate`, the paper's settings."""
    max_experts_per_layer: int | None = Field(None, ge=1)
    """At most this many experts per layer (the highest-scored), whatever `top_p` says."""
    sample_tokens: int = Field(131072, ge=1)
    """Tokens of training data the base model reads to score the experts (about 32 examples
    of 4096 tokens, as in the paper), split over the workers."""
    train_shared_experts: bool = False
    """Also train the always-on shared experts (Qwen2-MoE's shared expert and its gate,
    DeepSeek's shared experts). Off in the paper."""
    train_non_expert_modules: bool = False
    """Also train attention, norms, embeddings and the output head (routers stay frozen).
    Off in the paper: the point of ESFT is to leave them as they were."""
    router_aux_loss: bool = False
    """Add the model's router load-balancing loss (Qwen-MoE, Mixtral) to the LM loss. Off:
    with frozen routers it would only push the trained experts toward balance."""

    def threshold(self) -> float:
        return self.top_p if self.top_p is not None else DEFAULT_TOP_P[self.score]
