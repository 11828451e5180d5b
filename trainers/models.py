"""Load the model and tokenizer (hub id, local dir or s3://), wrap with LoRA, freeze."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from trainers import storage
from trainers.spec import AnyRun

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("LLMLAUNCH_HOME", "~/.cache/llmlaunch")).expanduser() / "models"


def local_model_dir(path: str, *, weights: bool = True) -> str:
    """A path `from_pretrained` can read. `s3://` models are copied once per node into the
    cache (without weight files when only the tokenizer/config is needed); hub ids and
    local directories are returned unchanged."""
    if not path.startswith("s3://"):
        return path
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    dest = cache_dir() / f"{key}{'' if weights else '-meta'}"
    done = dest / ".complete"
    if done.exists():
        return str(dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    storage.download_dir(path, str(tmp), skip_suffixes=() if weights else _WEIGHT_SUFFIXES)
    (tmp / ".complete").touch()
    try:
        tmp.rename(dest)
    except OSError:  # another process on this node finished first
        pass
    return str(dest)


def load_tokenizer(model_dir: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer, with `data.chat_template` (a built-in name, a file or template text)
    in place of its own template when one is given: the export saves it with the model."""
    from transformers import AutoTokenizer

    from trainers import chat_templates

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        tok.chat_template = chat_templates.resolve(chat_template)
    return tok


def hidden_size(model_dir: str, trust_remote_code: bool = False) -> int | None:
    """The model's hidden size (DeepSpeed's ZeRO-3 bucket sizes follow it)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return getattr(cfg, "hidden_size", None)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


HEADS = {"score": "SEQ_CLS", "value": "TOKEN_CLS"}  # scalar heads: a reward model's, a critic's (peft task types)


def model_class(spec: AnyRun, head: str | None = None):
    """The transformers auto class a method trains: a causal LM, or the same backbone with a
    scalar head: `score` (a reward model, and `method: reward`'s default) reads one value
    per sequence (`AutoModelForSequenceClassification`, one label), `value` (a PPO critic)
    one per token (`AutoModelForTokenClassification`, one label)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    head = head or ("score" if spec.method == "reward" else None)
    return {"score": AutoModelForSequenceClassification, "value": AutoModelForTokenClassification}.get(
        head, AutoModelForCausalLM)


def load_model(spec: AnyRun, model_dir: str, dtype: str, ds_config: dict[str, Any], *, pad_token_id: int | None = None,
               head: str | None = None):
    """The model ready for `deepspeed.initialize`: LoRA-wrapped or with frozen parameters.
    `head` as for `model_class`; a `score` head reads the score at the last token that is
    not `pad_token_id`."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    # With ZeRO-3 this makes from_pretrained build the model already partitioned over
    # the ranks (deepspeed.zero.Init), so no rank ever holds all weights. Keep a reference:
    # transformers only reads it while the object is alive.
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    _keepalive = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841
    quantize = spec.model.peft is not None and spec.model.peft.quantize == "4bit"
    head = head or ("score" if spec.method == "reward" else None)
    model = model_class(spec, head).from_pretrained(
        model_dir, dtype=torch_dtype(dtype), trust_remote_code=spec.model.trust_remote_code,
        **(_4bit_kwargs(dtype) if quantize else {}), **({"num_labels": 1} if head else {}),
    )
    model.config.use_cache = False
    if head:
        model.config.pad_token_id = pad_token_id
    if quantize:
        _prepare_4bit(model)
    if spec.model.peft is not None:
        from peft import LoraConfig, get_peft_model

        p = spec.model.peft
        model = get_peft_model(model, LoraConfig(
            r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
            task_type=HEADS.get(head, "CAUSAL_LM"),  # SEQ_CLS, TOKEN_CLS: the new head trains in full
        ))
    for pattern in spec.model.freeze:
        rx = re.compile(pattern)
        for name, param in model.named_parameters():
            if rx.search(name):
                param.requires_grad_(False)
    return model


def _4bit_kwargs(dtype: str) -> dict[str, Any]:
    """from_pretrained arguments for QLoRA: NF4 with double quantization, computing in the
    training dtype (bfloat16 on GPUs, float32 on CPUs), on this worker's device."""
    import torch
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch_dtype(dtype))
    # Quantized where it is loaded: on the GPU Ray Train gave this worker (the device DeepSpeed uses).
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


def _prepare_4bit(model) -> None:
    """peft's k-bit preparation (base frozen, its norms and embeddings in float32), without
    gradient checkpointing; and no CPU inference repacking of the 4-bit weights."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a Linear4bit's weights at its first
    # forward in eval mode without grad (an evaluation) for a faster inference kernel that
    # has no backward: training after that backpropagates through it without error but with
    # wrong gradients (and breaks ZeRO-3 and the state dict). Keep the layout training uses.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; ZeRO-3 partitions report their full size via ds_numel,
    4-bit weights (two per byte) the shape they were quantized from."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
