"""Expert-Specialized Fine-Tuning (ESFT; Wang et al. 2024, "Let the Expert Stick to His
Last") of a mixture-of-experts model, in three stages on every Ray Train worker:

1. relevance: the base model reads a sample of the task's training data (`esft.sample_tokens`,
   sharded over the workers, sums all-reduced) and every routed expert gets a gate score and
   a token share per layer (`trainers.moe.RoutingStats`);
2. selection: per layer, the experts that carry `esft.top_p` of the chosen score;
3. training: those experts alone (`trainers.esft_params`), with the supervised step, eval,
   checkpoints and resume of `sft`; the export is the whole model in its own format plus
   the trained experts as a small delta (`<run>/esft/experts.safetensors`).

Stage 1 and 2 write `<run>/esft/`: `scores.json`, `scores-token.png`, `scores-gate.png`
(layers x experts heatmaps, selected experts outlined) and `selection.json`. A resumed run
takes the selection of the run it resumes (the checkpoint's tensors are laid out by it).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from functools import partial
from typing import Any

from trainers import checkpoint, data, esft_params, loop, models, moe, storage
from trainers.sft import lm_step, validate

SAMPLE = "esft_sample"  # the dataset the TorchTrainer gets for stage 1
DELTA = "experts.safetensors"


def extra_datasets(spec, prepared) -> dict[str, Any]:
    """Stage 1's sample: the first rows of the prepared training data, enough for
    `esft.sample_tokens` (at least one row per worker)."""
    rows = max(spec.resources.workers, math.ceil(spec.esft.sample_tokens / spec.data.max_seq_len))
    return {SAMPLE: prepared.train.limit(rows)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    s = loop.setup(config, load_model=partial(load_model, config))
    loop.train(s, lm_step, validate)
    export(s)


def load_model(config: dict[str, Any], spec, model_dir: str, dtype: str, ds_config: dict[str, Any], *,
               pad_token_id: int | None = None):
    """The base model with only the selected experts trainable (stages 1 and 2 first, or
    the resumed run's selection)."""
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    # Loaded whole on every rank (no zero.Init under ZeRO-3): the experts are split into
    # trainable and frozen parameters before DeepSpeed partitions them.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=models.torch_dtype(dtype),
                                                 trust_remote_code=spec.model.trust_remote_code)
    moe.check_supported(model.config)
    model.config.use_cache = False
    # With labels, Qwen-MoE and Mixtral add the router load-balancing loss: with frozen
    # routers it would only push the trained experts toward balance.
    model.config.output_router_logits = spec.esft.router_aux_loss
    rank = ray.train.get_context().get_world_rank()
    resumed = config.get("resume_from")
    if resumed:
        document = _resumed_selection(resumed)
        if rank == 0:
            print(f"esft: the selection of {_run_of(resumed)} ({_count(document['experts'])} experts)", flush=True)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        stats = score(model.to(device), data.worker_shard(config, SAMPLE, rank), spec.train.micro_batch_size)
        document = select(spec, stats)
    counts = esft_params.make_selected_trainable(model, document["experts"],
                                                 train_shared_experts=spec.esft.train_shared_experts,
                                                 train_non_expert_modules=spec.esft.train_non_expert_modules)
    document.update(trainable_parameters=counts["trainable"], total_parameters=counts["total"])
    if rank == 0:
        _write(config["run_uri"], document, resumed)
        layers = document["layers"]
        print(f"esft: training {_count(document['experts'])} of {len(layers) * len(document['gate'][0])} routed "
              f"experts in {len(layers)} MoE layers ({document['score']} score, top_p {document['top_p']:g}): "
              f"{counts['trainable']:,} of {counts['total']:,} parameters "
              f"({counts['trainable'] / counts['total']:.2%} of the model)", flush=True)
    return model


def score(model, shard, micro_batch_size: int) -> moe.RoutingStats:
    """Stage 1: both scores of every routed expert over this worker's shard of the sample,
    summed over all workers."""
    import torch

    stats = moe.RoutingStats(model)
    attention = data.attn_implementation(model)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size):
            stats.set_batch(moe.sample_ids(batch["input_ids"], batch.get("attention_mask"),
                                           batch.get("seq_ids")).to(device))
            inputs = data.model_inputs(batch, device, attention)
            inputs.pop("labels")
            model(**inputs)
    stats.remove()
    stats.all_reduce()
    model.train()
    return stats


def select(spec, stats: moe.RoutingStats) -> dict[str, Any]:
    """Stage 2: `selection.json`'s document (with both score tables, for the heatmaps)."""
    scores = stats.scores()
    top_p = spec.esft.threshold()
    experts = moe.select_experts(scores[spec.esft.score], top_p, spec.esft.max_experts_per_layer)
    return {"score": spec.esft.score, "top_p": top_p, "max_experts_per_layer": spec.esft.max_experts_per_layer,
            "layers": [layer.index for layer in stats.layers], "experts": experts,
            "examples": int(stats.examples), "tokens": int(stats.tokens), **scores}


def export(s: loop.Session) -> None:
    """The whole model in its own layout at `<run>/model`, and the delta at `<run>/esft/`."""
    import torch.distributed as dist

    state = checkpoint.export(s.engine, s.tokenizer, s.run, s.model_dir, models.torch_dtype(s.dtype), False,
                              state_dict_fn=esft_params.merged_state_dict)
    if s.rank == 0:
        tensors, selection = esft_params.delta_tensors(state, s.engine.module)
        with tempfile.TemporaryDirectory(prefix="esft-") as tmp:
            esft_params.save_delta(os.path.join(tmp, DELTA), tensors, selection, s.spec.model.path)
            storage.upload_dir(tmp, storage.join(s.run, "esft"))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"model exported to {s.run}/model; the trained experts alone ({size / 2**20:.2f} MiB) to "
              f"{s.run}/esft/{DELTA} (apply to the base with `launch apply-delta`)", flush=True)
    dist.barrier()


# ---------------------------------------------------------------- internals

def _count(experts: list[list[int]]) -> int:
    return sum(len(x) for x in experts)


def _run_of(ckpt: str) -> str:
    return ckpt.rstrip("/").rsplit("/checkpoints/", 1)[0]


def check_resumable(ckpt: str) -> None:
    """On the driver, before the workers start: the checkpoint's run kept the selection and
    scores that say which experts its weights train (checkpoint.resume names any directory)."""
    from trainers.user_errors import JobUserError

    for name in ("selection.json", "scores.json"):
        uri = storage.join(_run_of(ckpt), "esft", name)
        if not storage.exists(uri):
            raise JobUserError(f"checkpoint.resume: {uri} is missing: {ckpt} cannot be resumed without the "
                               "experts it trains", hint="resume a checkpoint of an ESFT run (its run directory "
                                                         "has esft/), or use checkpoint.resume: never")


def _resumed_selection(ckpt: str) -> dict[str, Any]:
    """The resumed run's selection.json with its scores.json's tables."""
    found = {}
    for name in ("selection.json", "scores.json"):
        uri = storage.join(_run_of(ckpt), "esft", name)
        text = storage.read_text(uri)
        if text is None:
            raise RuntimeError(f"{uri} is missing: {ckpt} cannot be resumed without the experts it trains")
        found[name] = json.loads(text)
    document = {k: v for k, v in found["selection.json"].items() if k != "resumed_from"}
    return document | {k: found["scores.json"][k] for k in ("gate", "token")}


def _write(run: str, document: dict[str, Any], resumed: str | None) -> None:
    """`<run>/esft/`: selection.json, scores.json and a heatmap per score."""
    with tempfile.TemporaryDirectory(prefix="esft-") as tmp:
        with open(os.path.join(tmp, "selection.json"), "w") as f:
            json.dump({k: v for k, v in document.items() if k not in ("gate", "token")}
                      | ({"resumed_from": resumed} if resumed else {}), f, indent=1)
        with open(os.path.join(tmp, "scores.json"), "w") as f:
            f.write(moe.scores_document({k: document[k] for k in ("gate", "token")}, document["layers"],
                                        document["examples"], document["tokens"]))
        for name in ("token", "gate"):
            chosen = document["experts"] if name == document["score"] else None
            moe.plot_scores(document[name], document["layers"], f"ESFT {name} score ({document['examples']} "
                            f"examples, {document['tokens']:,} tokens)", os.path.join(tmp, f"scores-{name}.png"),
                            chosen)
        storage.upload_dir(tmp, storage.join(run, "esft"))
