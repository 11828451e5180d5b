"""Only the selected experts as trainable parameters, and their weights as a small delta.

A gradient mask on a fused (E, ...) expert tensor is not freezing: AdamW's weight decay
still moves the masked experts, and the optimizer state and fp32 master copy stay the size
of all E. So each fused tensor of a layer with selected experts is split in two
parameters: `rest` (the other experts' slices, frozen) and `selected` (trainable), and the
Experts module reassembles the (E, ...) tensor under its own name for each forward. Its
forward code (eager, grouped_mm or batched) reads the same attribute it always did. The
frozen experts are never touched by the optimizer, so they stay bitwise as they were, and
only the selected slices have optimizer state.
"""

from __future__ import annotations

import json
from typing import Any

from trainers.moe import moe_layers

SLICES = "esft_slices"  # the Experts module's child holding the split tensors


def _slices_module():
    import torch
    from torch import nn

    class ExpertSlices(nn.Module):
        """One fused expert tensor as frozen `rest` + trainable `selected` slices; `order`
        puts expert e back at row e."""

        def __init__(self, full, chosen: list[int]):
            super().__init__()
            n = full.shape[0]
            others = [e for e in range(n) if e not in chosen]
            self.rest = nn.Parameter(full.data[others].clone(), requires_grad=False)
            self.selected = nn.Parameter(full.data[chosen].clone())
            position = {e: i for i, e in enumerate(others + list(chosen))}
            self.register_buffer("order", torch.tensor([position[e] for e in range(n)]))
            self.register_buffer("chosen", torch.tensor(list(chosen)))

        def forward(self):
            return torch.cat((self.rest, self.selected)).index_select(0, self.order)

    return ExpertSlices


def _assemble(module, args):
    for name, part in getattr(module, SLICES).items():
        object.__setattr__(module, name, part())  # a plain attribute, not a parameter: the forward reads it


def _release(module, args, output):
    for name in getattr(module, SLICES):
        module.__dict__.pop(name, None)  # the graph keeps what backward needs


def expert_tensor_names(experts) -> list[str]:
    """The Experts module's fused per-expert parameters (dim 0 = experts; biases included)."""
    return [name for name, p in experts.named_parameters(recurse=False) if p.dim() >= 1
            and p.shape[0] == experts.num_experts]


def make_selected_trainable(model, selection: list[list[int]], *, train_shared_experts: bool = False,
                            train_non_expert_modules: bool = False) -> dict[str, int]:
    """Freeze the model but the `selection` (experts per MoE layer, in `moe_layers` order),
    optionally the shared experts and the non-expert modules (routers always stay frozen).
    Returns {"trainable": n, "total": n} parameter counts."""
    from torch import nn

    ExpertSlices = _slices_module()
    layers = moe_layers(model)
    if len(selection) != len(layers):
        raise ValueError(f"the selection has {len(selection)} layers; the model has {len(layers)} MoE layers")
    total = sum(p.numel() for p in model.parameters())
    routed, shared, routers = set(), set(), set()
    for layer in layers:
        routed.update(id(p) for p in layer.experts.parameters())
        routers.update(id(p) for p in layer.block.gate.parameters())
        if layer.shared is not None:
            shared.update(id(p) for p in layer.shared.parameters())
        shared_gate = getattr(layer.block, "shared_expert_gate", None)  # Qwen2-MoE: part of its shared expert
        if shared_gate is not None:
            shared.update(id(p) for p in shared_gate.parameters())
    for p in model.parameters():
        trainable = ((id(p) in shared and train_shared_experts)
                     or (train_non_expert_modules and id(p) not in routed | shared | routers))
        p.requires_grad_(trainable)
    for layer, chosen in zip(layers, selection):
        experts = layer.experts
        if not chosen:
            continue
        if len(set(chosen)) != len(chosen) or any(not 0 <= e < experts.num_experts for e in chosen):
            raise ValueError(f"layer {layer.index}: experts {chosen} repeat one or are out of range 0..{experts.num_experts - 1}")
        if hasattr(experts, SLICES):
            raise ValueError(f"layer {layer.index}: its experts are split already")
        parts = nn.ModuleDict()
        for name in expert_tensor_names(experts):
            full = experts._parameters.pop(name)
            parts[name] = ExpertSlices(full, sorted(chosen))
        experts.add_module(SLICES, parts)
        experts.register_forward_pre_hook(_assemble)
        experts.register_forward_hook(_release)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def merged_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict of the model's own layout from one of a model with split experts (a
    module's or ZeRO-3's consolidated one): `...experts.esft_slices.NAME.{rest,selected,order}`
    become `...experts.NAME` again."""
    import torch

    out, split = {}, {}
    for key, value in state_dict.items():
        head, sep, tail = key.partition(f".{SLICES}.")
        if not sep:
            out[key] = value
            continue
        name, part = tail.rsplit(".", 1)
        split.setdefault(f"{head}.{name}", {})[part] = value
    for key, parts in split.items():
        out[key] = torch.cat((parts["rest"], parts["selected"])).index_select(0, parts["order"].long())
    return out


def delta_tensors(state_dict: dict[str, Any], model) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """What training changed, small: the selected slices of each split tensor (keyed by the
    fused tensor's own name, with the expert ids) and every other trainable tensor whole."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    tensors, selection = {}, {}
    for key, value in state_dict.items():
        head, sep, tail = key.partition(f".{SLICES}.")
        if sep:
            name, part = tail.rsplit(".", 1)
            if part == "selected":
                tensors[f"{head}.{name}"] = value
            elif part == "chosen":
                selection[f"{head}.{name}"] = [int(e) for e in value.tolist()]
        elif key in trainable:
            tensors[key] = value
    return tensors, selection


def save_delta(path: str, tensors: dict[str, Any], selection: dict[str, list[int]], base_model: str) -> None:
    """`experts.safetensors`: the delta's tensors, its selection and base model in the metadata."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
              metadata={"format": "pt", "esft_selection": json.dumps(selection), "base_model": base_model})


def load_delta(path: str) -> tuple[dict[str, Any], dict[str, list[int]], str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if "esft_selection" not in meta:
            raise ValueError(f"{path}: not an ESFT delta (no esft_selection in its metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta["esft_selection"]), meta.get("base_model", "")


def apply_delta(model, tensors: dict[str, Any], selection: dict[str, list[int]]) -> None:
    """Write a delta into a model of the base layout, in place: selected expert slices at
    their rows, whole tensors as they are."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key not in params:
                raise ValueError(f"the delta's tensor {key} is not in the model: was it trained from another base?")
            target = params[key]
            rows = selection.get(key)
            if rows is None:
                target.copy_(value.to(target.dtype))
            else:
                target[torch.tensor(rows)] = value.to(target.dtype)


def apply_delta_to_dir(base_dir: str, delta_path: str, out_dir: str, dtype=None) -> None:
    """The fine-tuned model from the base model's directory and a delta, saved to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tensors, selection, _ = load_delta(delta_path)
    model = AutoModelForCausalLM.from_pretrained(base_dir, **({"dtype": dtype} if dtype is not None else {}))
    apply_delta(model, tensors, selection)
    model.save_pretrained(out_dir)
    try:
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    except (OSError, ValueError):  # a base without a tokenizer: the weights are what matters
        pass
