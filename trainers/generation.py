"""Rollouts for RL from feedback (issue 21): prompts in, sampled responses out, laid out for
scoring and for the PPO losses. `hf_generate` is the transformers `generate` backend that
runs everywhere; a vLLM backend (not built yet: it needs a GPU machine to be tested) is to
return the same `Rollout`.

Layout: prompts are left-padded to a common width P so every response starts at column P;
`sequences` (N, P + R) holds prompt + response, N = prompts x samples_per_prompt, the
samples of a prompt next to each other (`group`). `response_mask` (N, R) is 1 on the
response's tokens up to and including its first EOS, 0 after it (what the losses average
over); `attention_mask` (N, P + R) covers the real prompt tokens and the masked-in response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Rollout:
    sequences: torch.Tensor  # (N, P + R) int64
    attention_mask: torch.Tensor  # (N, P + R) int64
    response_mask: torch.Tensor  # (N, R) int64
    group: torch.Tensor  # (N,) int64: the prompt each sample answers
    prompt_width: int  # P

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width:]

    def select(self, index: torch.Tensor) -> "Rollout":
        """The samples at `index` (a mini-batch), in the same layout."""
        return Rollout(self.sequences[index], self.attention_mask[index], self.response_mask[index],
                       self.group[index], self.prompt_width)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, P): each prompt right-aligned, so generation continues
    every one of them at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def response_mask(responses: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """1 on each response's tokens up to and including its first EOS, 0 after (what
    `generate` pads with once a sequence has finished)."""
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=responses.device)
    is_eos = torch.isin(responses, eos).long()
    before_eos = is_eos.cumsum(1) - is_eos  # EOS tokens seen before this position
    return (before_eos == 0).long()


def hf_generate(model, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int, max_new_tokens: int,
                pad_id: int, eos_id: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                top_k: int = 0, synced_gpus: bool = False) -> Rollout:
    """Sample `samples_per_prompt` responses per prompt with transformers' `generate`
    (top_k 0: no top-k cut, unlike generate's default of 50, so that the sampling
    distribution is the policy's own and its log-probs are what the losses use).
    `synced_gpus`: ZeRO-3, whose every forward gathers weights from all ranks, so each rank
    goes on until all have finished."""
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.repeat_interleave(samples_per_prompt, 0), mask.repeat_interleave(samples_per_prompt, 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 pad_token_id=pad_id, eos_token_id=eos_id, synced_gpus=synced_gpus)
    finally:
        model.train(was_training)
    out = out.cpu()
    width = ids.shape[1]
    responses = out[:, width:]
    r_mask = response_mask(responses, eos_id)
    responses = torch.where(r_mask.bool(), responses, torch.full_like(responses, pad_id))
    group = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    return Rollout(torch.cat([ids, responses], 1), torch.cat([mask, r_mask], 1), r_mask, group, width)


def response_logps(model, rollout: Rollout, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the responses under `model` (N, R), and the logits that gave
    them (N, R, V), both in float32; the logits divided by `temperature`, as sampling did.
    Position ids follow the attention mask, so left padding does not shift the prompt."""
    device = next(model.parameters()).device
    mask = rollout.attention_mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=rollout.sequences.to(device), attention_mask=mask, position_ids=positions,
                   use_cache=False).logits
    p = rollout.prompt_width
    logits = logits[:, p - 1:-1].float() / temperature  # position t predicts token t + 1
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.responses.to(device)[..., None]).squeeze(-1)
    return logp * rollout.response_mask.to(device), logits
