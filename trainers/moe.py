"""Mixture-of-experts models as ESFT sees them: which architectures, where their experts
are, how tokens were routed to them, and which experts a task uses most.

In transformers 5 every MoE layer keeps its routed experts in one `...Experts` module whose
parameters are fused 3-D tensors, one slice per expert (`gate_up_proj` (E, 2I, H),
`down_proj` (E, H, I)); its `forward(hidden_states, top_k_index, top_k_weights)` receives
the routing the layer's router chose. Routing is read there, not recomputed from router
logits: DeepSeek-V3 routes with sigmoid scores, a correction bias and group-limited top-k,
which softmax-top-k over `router_logits` does not reproduce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# model_type -> (the config field with the number of routed experts, the MoE block's
# attribute holding its shared experts, if any). All four use the same Experts interface.
SUPPORTED = {
    "qwen3_moe": ("num_experts", None),
    "qwen2_moe": ("num_experts", "shared_expert"),  # with its sigmoid `shared_expert_gate`
    "deepseek_v3": ("n_routed_experts", "shared_experts"),
    "mixtral": ("num_local_experts", None),
}


def check_supported(config: Any) -> str:
    """The model type of a transformers config (object or `config.json` dict), or a
    ValueError naming the supported ones."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"esft trains mixture-of-experts models; model_type {model_type!r} is not one it "
                         f"supports ({', '.join(sorted(SUPPORTED))})")
    return model_type


@dataclass
class MoeLayer:
    """One layer's routed experts (`experts`, its fused tensors sliced on dim 0) and its
    shared experts (a plain module, or None)."""

    index: int  # decoder layer
    block: Any  # the sparse MoE block (router `gate`, `experts`, shared experts)
    experts: Any
    shared: Any

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts


def moe_layers(model) -> list[MoeLayer]:
    """The model's MoE layers in order (dense layers, like DeepSeek's first ones, left out)."""
    model_type = check_supported(model.config)
    shared_attr = SUPPORTED[model_type][1]
    layers = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = layer.mlp
        experts = getattr(block, "experts", None)
        if experts is None or not hasattr(experts, "num_experts"):
            continue
        layers.append(MoeLayer(i, block, experts, getattr(block, shared_attr) if shared_attr else None))
    if not layers:
        raise ValueError(f"{model_type}: the model has no MoE layers to specialize")
    return layers


def _decoder_layers(model):
    base = model
    while not hasattr(base, "layers"):
        base = base.model  # ForCausalLM -> Model (a PEFT or DeepSpeed wrapper -> its module first)
    return base.layers


def sample_ids(input_ids, attention_mask=None, seq_ids=None):
    """(batch * seq,) int64: which example each token of a micro-batch belongs to, -1 for
    padding. Packed rows hold several examples (their `seq_ids` restart per row)."""
    import torch

    rows, length = input_ids.shape
    if seq_ids is not None:
        per_row = seq_ids.long().amax(dim=1) + 1
        offsets = torch.cumsum(per_row, 0) - per_row
        ids = seq_ids.long() + offsets[:, None]
    else:
        ids = torch.arange(rows, device=input_ids.device)[:, None].expand(rows, length).clone()
    if attention_mask is not None:
        ids = ids.masked_fill(attention_mask == 0, -1)
    return ids.reshape(-1)


class RoutingStats:
    """Sums, over the examples of a sample, of each example's per-layer expert scores
    (the paper's eq. 6-8), collected where each Experts module receives its routing.

    For an example of L tokens and a layer routing each token to its top K experts:
    gate score g_e = (1/L) sum_t w_{t,e} (w the gate weight the expert received, 0 when not
    routed), token share r_e = (1/L) sum_t 1[e in top-K(t)] / K. `scores()` averages over
    examples and normalises each layer to sum 1 (per layer, as the paper does; the
    reference code normalises across layers instead)."""

    def __init__(self, model):
        import torch

        self.layers = moe_layers(model)
        self.num_experts = self.layers[0].num_experts
        device = next(model.parameters()).device
        self.gate = torch.zeros(len(self.layers), self.num_experts, dtype=torch.float64, device=device)
        self.token = torch.zeros_like(self.gate)
        self.examples = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self._ids = None
        self._hooks = [layer.experts.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def set_batch(self, ids) -> None:
        """The example of every token of the next forward (`sample_ids`)."""
        import torch

        self._ids = ids
        self._n = int(ids.max()) + 1 if ids.numel() else 0
        self._length = torch.bincount(ids[ids >= 0], minlength=self._n).double()
        self.examples += int((self._length > 0).sum())
        self.tokens += int(self._length.sum())

    def _hook(self, layer: int):
        def collect(module, args):
            import torch

            _, index, weights = args[:3]
            if self._n == 0:  # nothing but padding
                return
            keep = self._ids >= 0
            ids, index, weights = self._ids[keep], index[keep].long(), weights[keep].double()
            k = index.shape[-1]
            per_token = ids[:, None].expand_as(index)
            flat = per_token.reshape(-1) * self.num_experts + index.reshape(-1)  # (example, expert) cells
            cells = self._n * self.num_experts
            gate = torch.bincount(flat, weights=weights.reshape(-1), minlength=cells).view(self._n, -1)
            token = torch.bincount(flat, minlength=cells).view(self._n, -1).double() / k
            length = self._length.clamp(min=1)[:, None]  # examples with no token add zeros
            self.gate[layer] += (gate / length).sum(0)
            self.token[layer] += (token / length).sum(0)
        return collect

    def all_reduce(self) -> None:
        import torch.distributed as dist

        for t in (self.gate, self.token, self.examples, self.tokens):
            dist.all_reduce(t)

    def scores(self) -> dict[str, list[list[float]]]:
        """{"gate": layers x experts, "token": ...}: the mean over examples, each layer
        normalised to sum 1."""
        out = {}
        for name, sums in (("gate", self.gate), ("token", self.token)):
            mean = sums / self.examples.clamp(min=1)
            out[name] = (mean / mean.sum(dim=1, keepdim=True).clamp(min=1e-30)).tolist()
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def select_experts(scores: list[list[float]], top_p: float, max_per_layer: int | None = None) -> list[list[int]]:
    """Per layer, experts in order of score (ties: lower index first) until their cumulative
    score reaches `top_p`, the expert that crosses it included; at most `max_per_layer`.
    Returned sorted by expert index."""
    selection = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        chosen, total = [], 0.0
        for e in order:
            if total >= top_p - 1e-12 or (max_per_layer is not None and len(chosen) >= max_per_layer):
                break
            chosen.append(e)
            total += row[e]
        selection.append(sorted(chosen))
    return selection


def scores_document(scores: dict[str, list[list[float]]], layers: list[int], examples: int, tokens: int) -> str:
    """`<run>/esft/scores.json`: both scores per MoE layer and expert, and what they were measured on."""
    return json.dumps({"layers": layers, "examples": examples, "tokens": tokens, **scores}, indent=1) + "\n"


def plot_scores(table: list[list[float]], layers: list[int], title: str, path: str,
                selection: list[list[int]] | None = None) -> None:
    """A layers-by-experts heatmap of one score (selected experts outlined) to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n_layers, n_experts = len(table), len(table[0])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n_experts + 2), max(2.5, 0.3 * n_layers + 1.5)))
    image = ax.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the layer's score")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers), [str(x) for x in layers])
    ax.set_title(title)
    for row, chosen in enumerate(selection or []):
        for e in chosen:
            ax.add_patch(Rectangle((e - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
