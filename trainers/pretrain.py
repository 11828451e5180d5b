"""Continued pre-training (domain adaptation): causal LM loss on every token of raw text.

The objective and the loop are those of supervised fine-tuning on `text` data (labels are
the input ids, nothing masked): the spec only differs in what it allows (raw text only,
checked in `trainers.spec.PretrainRun`). One loop, so the two cannot drift apart.
"""

from trainers.sft import train_loop_per_worker

__all__ = ["train_loop_per_worker"]
