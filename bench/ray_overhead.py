"""What Ray Train + Ray Data cost per training step, compared with bare torchrun.

The same model, data, DeepSpeed config and step count, 2 workers (gloo on CPU, nccl on
GPU), trained two ways:

  torchrun  `torchrun --nproc-per-node 2 bench/ray_overhead.py --worker DIR`: each rank
            builds the engine with `trainers.engine.build_engine` and slices its rows out
            of tensors built before the run (no data loader at all);
  ray       a `TorchTrainer` with 2 workers whose loop builds the same engine and reads
            its rows from its shard of the driver's split (`trainers.data.split_for_workers`,
            `worker_shard`) through `trainers.data.micro_batches`: the data path
            `trainers/sft.py` uses.

Both skip `--warmup` steps, then time `--steps` steps between two barriers and report
tokens/s (non-pad tokens summed over the ranks). The pair runs `--repeats` times,
interleaved (the order alternates: torchrun first in odd repeats, ray first in even
ones). The fixed cost of each is the wall time of the whole command minus the timed
steady state: process/cluster start, model load, engine build, warmup steps, teardown.

A benchmark, not a test: nothing here asserts on time. Usage:

    python bench/ray_overhead.py                      # defaults: ZeRO-2, 5 + 100 steps, 2 repeats
    python bench/ray_overhead.py --steps 10 --warmup 2 --repeats 1   # smoke run
    python bench/ray_overhead.py --zero 3 --json      # machine-readable
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "configs" / "examples" / "tiny-llama"
DATA = REPO / "configs" / "examples" / "data" / "text.jsonl"
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # With this, every Ray listener binds 127.0.0.1 (single node only); see DESIGN.md.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- shared by both workers

def build(cfg: dict[str, Any]):
    """The DeepSpeed engine, built exactly as `trainers/sft.py` builds it."""
    import torch

    from trainers import models
    from trainers.engine import build_engine, quiet_workers
    from trainers.spec import parse_spec

    quiet_workers()
    spec = parse_spec(cfg["spec"])
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(spec.train.seed + rank)
    model = models.load_model(spec, cfg["model_dir"], cfg["dtype"], cfg["ds_config"])
    return build_engine(model, spec, cfg["ds_config"], cfg["total_steps"])


def timed_steps(engine, batches: Iterator[tuple[int, list[dict[str, Any]]]], warmup: int, steps: int,
                use_gpu: bool) -> dict[str, Any]:
    """The inner loop of `trainers/sft.py` (forward, backward, step per micro-batch), minus
    its logging/eval/checkpoint branches. The clock runs from a barrier before step `warmup`
    is fetched to a barrier after step `warmup + steps - 1`; fetching batches is inside it."""
    import torch
    import torch.distributed as dist

    from trainers import data

    attention = data.attn_implementation(engine.module)

    def sync() -> None:
        if use_gpu:
            torch.cuda.synchronize()
        dist.barrier()

    engine.train()
    t_loop = time.time()
    t_start = t0 = None
    tokens = 0
    it = iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t_start, t0, tokens = time.time(), time.perf_counter(), 0
        _, micro = next(it)
        loss_sum = torch.zeros((), dtype=torch.float32)
        for batch in micro:
            tokens += int(batch["attention_mask"].sum())
            loss = engine(**data.model_inputs(batch, engine.device, attention)).loss  # as trainers/sft.py
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float().cpu()
    sync()
    elapsed = time.perf_counter() - t0
    t_end = time.time()
    total = torch.tensor([float(tokens)], dtype=torch.float64, device=engine.device)
    dist.all_reduce(total)
    return {"tokens": int(total.item()), "seconds": elapsed, "tokens_per_s": float(total.item()) / elapsed,
            "last_loss": float(loss_sum) / len(micro), "torch_threads": torch.get_num_threads(),
            "t_loop": t_loop, "t_start": t_start, "t_end": t_end}


def tensor_batches(cfg: dict[str, Any], npz: Path, rank: int, world: int):
    """(step, micro-batches) sliced out of this rank's contiguous share of pre-built rows."""
    import torch

    arrays = np.load(npz)
    per_rank = len(arrays["input_ids"]) // world
    local = {k: torch.from_numpy(np.ascontiguousarray(arrays[k][rank * per_rank:(rank + 1) * per_rank]))
             for k in arrays.files}  # packed rows: their position and segment ids too
    mbs, gas, per_epoch = cfg["micro_batch_size"], cfg["grad_accum"], cfg["steps_per_epoch"]
    for step in range(cfg["total_steps"]):
        first = (step % per_epoch) * mbs * gas
        yield step, [{k: t[first + j * mbs:first + (j + 1) * mbs] for k, t in local.items()} for j in range(gas)]


# ---------------------------------------------------------------- (a) torchrun worker

def torchrun_worker(workdir: str) -> None:
    import torch
    import torch.distributed as dist

    cfg = json.loads((Path(workdir) / "config.json").read_text())
    use_gpu = cfg["use_gpu"]
    if use_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_gpu else "gloo")  # what Ray Train's torch backend does
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = tensor_batches(cfg, Path(workdir) / "data.npz", rank, world)
    engine = build(cfg)
    result = timed_steps(engine, batches, cfg["warmup"], cfg["steps"], use_gpu)
    if rank == 0:
        (Path(workdir) / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- (b) Ray Train loop

def ray_loop(cfg: dict[str, Any]) -> None:
    import ray.train

    from trainers import data

    engine = build(cfg)
    ctx = ray.train.get_context()
    if cfg.get("npz"):  # --ray-tensors: Ray Train without Ray Data, rows sliced as torchrun does
        batches = tensor_batches(cfg, Path(cfg["npz"]), ctx.get_world_rank(), ctx.get_world_size())
    else:
        shard = data.worker_shard(cfg, "train", ctx.get_world_rank())
        batches = data.micro_batches(shard, micro_batch_size=cfg["micro_batch_size"], grad_accum=cfg["grad_accum"],
                                     start_step=0, total_steps=cfg["total_steps"],
                                     steps_per_epoch=cfg["steps_per_epoch"], steps_per_fetch=cfg["steps_per_fetch"])
    result = timed_steps(engine, batches, cfg["warmup"], cfg["steps"], cfg["use_gpu"])
    if ctx.get_world_rank() == 0:
        Path(cfg["result_path"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- driver

def prepare(args, tmp: Path) -> dict[str, Any]:
    """Model dir, run spec, DeepSpeed config and packed rows: built once, used by both."""
    from transformers import AutoConfig

    from trainers import data, models
    from trainers.ds_config import deepspeed_config, precision
    from trainers.spec import parse_spec

    import torch

    use_gpu = torch.cuda.is_available()
    if args.model == "shipped":
        model_dir, model_note = str(SHIPPED_MODEL), "configs/examples/tiny-llama (shipped)"
    else:
        sys.path.insert(0, str(REPO))
        from tests.fixtures.tiny_models import build_tiny_llama

        tok = models.load_tokenizer(str(SHIPPED_MODEL))
        model_dir = str(build_tiny_llama(tmp / "model", tok, hidden_size=args.hidden, layers=args.layers,
                                         heads=args.heads, kv_heads=max(1, args.heads // 2),
                                         intermediate_size=4 * args.hidden))
        model_note = (f"Llama built with tests/fixtures/tiny_models.build_tiny_llama from the shipped tokenizer: "
                      f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads")

    workers, total_steps = 2, args.warmup + args.steps
    spec = parse_spec({
        "name": "ray-overhead", "method": "sft",
        "model": {"path": model_dir},
        "data": {"train": [{"path": str(DATA), "format": "text"}], "max_seq_len": args.seq_len, "packing": True},
        "train": {"max_steps": total_steps, "micro_batch_size": args.micro_batch_size,
                  "global_batch_size": args.micro_batch_size * args.grad_accum * workers,
                  "deepspeed": {"stage": args.zero}},
        "resources": {"workers": workers},
    })
    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    ds_config = deepspeed_config(spec, use_gpu=use_gpu, total_steps=total_steps, hidden_size=hidden)

    # Tokenize + pack once, as trainers.data.prepare does (same functions), without Ray.
    tok = models.load_tokenizer(model_dir)
    ds = spec.data.train[0]
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    packed = data.pack([data.tokenize_example(r, ds, tok) for r in rows], args.seq_len, tok.pad_token_id, True)
    n_packed = len(packed["input_ids"])
    rows_per_step = args.micro_batch_size * args.grad_accum
    # One pass ("epoch") of the data must cover every timed step on both paths, or the Ray
    # side also pays for restarting its shard iterator each epoch: repeat the packed rows
    # (a fresh seeded permutation per copy) until it does. --no-tile keeps the rows as they are.
    rng = np.random.default_rng(spec.train.seed)
    need = workers * rows_per_step * total_steps
    copies = 1 if args.no_tile else max(1, -(-need // n_packed))
    order = np.concatenate([rng.permutation(n_packed) for _ in range(copies)])
    arrays = {k: np.ascontiguousarray(v[order]) for k, v in packed.items()}
    per_epoch = data.steps_per_epoch(len(order), workers, args.micro_batch_size, args.grad_accum)
    if per_epoch == 0:
        raise SystemExit(f"{len(order)} rows are fewer than one optimizer step needs ({workers * rows_per_step})")

    cfg = {
        "spec": spec.model_dump(mode="json"), "model_dir": model_dir, "dtype": precision(spec, use_gpu),
        "ds_config": ds_config, "use_gpu": use_gpu, "warmup": args.warmup, "steps": args.steps,
        "total_steps": total_steps, "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum,
        "steps_per_epoch": per_epoch,
        # what trainers/loop.py fetches at once from its shard
        "steps_per_fetch": data.fetch_steps(rows_per_step, args.seq_len, per_epoch),
    }
    info = {
        "model": model_note, "parameters": _parameters(model_dir), "device": "cuda" if use_gpu else "cpu",
        "backend": "nccl" if use_gpu else "gloo", "workers": workers, "zero_stage": args.zero,
        "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum,
        "rows_per_step_per_worker": rows_per_step, "warmup": args.warmup, "steps": args.steps,
        "packed_rows": n_packed, "rows_used": len(order), "copies_of_data": copies,
        "steps_per_epoch": per_epoch, "epochs_in_run": round(total_steps / per_epoch, 2),
        "steps_per_fetch": cfg["steps_per_fetch"],
        "tokens_per_step": int(arrays["attention_mask"][: workers * rows_per_step].sum()),
        "ds_config": ds_config,
    }
    return {"cfg": cfg, "arrays": arrays, "info": info}


def _parameters(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def run_torchrun(prep: dict[str, Any], tmp: Path, idx: int, verbose: bool) -> dict[str, Any]:
    workdir = tmp / f"torchrun-{idx}"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(prep["cfg"]))
    np.savez(workdir / "data.npz", **prep["arrays"])
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                      "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--worker", str(workdir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MASTER_", "RANK", "LOCAL_RANK",
                                                                  "WORLD_SIZE"))}
    for attempt in (1, 2):
        logfile = workdir / f"torchrun-{attempt}.log"
        t0 = time.time()
        with open(logfile, "w") as out:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=None if verbose else out,
                                stderr=None if verbose else subprocess.STDOUT).returncode
        t1 = time.time()
        if rc == 0:
            break
        tail = "" if verbose else logfile.read_text()[-12000:]
        if attempt == 2:
            raise SystemExit(f"torchrun exited with {rc} twice; log tail:\n{tail}")
        log(f"torchrun exited with {rc} (a port taken meanwhile?); retrying once in 10 s. Log tail:\n{tail}")
        time.sleep(10)
        cmd[cmd.index("--master-port") + 1] = str(_free_port())
    return _timings(json.loads((workdir / "result.json").read_text()), t0, t1, {})


def run_ray(prep: dict[str, Any], tmp: Path, idx: int, verbose: bool, tensors: bool = False) -> dict[str, Any]:
    import ray
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers import data

    os.environ.pop("RAY_ADDRESS", None)
    for key, value in RAY_ENV.items():  # a value set in the shell wins, to try others
        os.environ.setdefault(key, value)
    name = "ray-tensors" if tensors else "ray"
    cfg = dict(prep["cfg"], result_path=str(tmp / f"{name}-result-{idx}.json"))
    arrays = prep["arrays"]
    if tensors:
        cfg["npz"] = str(tmp / f"{name}-{idx}.npz")
        np.savez(cfg["npz"], **arrays)
    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    t0 = time.time()
    phases: dict[str, float] = {}
    try:
        if not verbose:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
                 _node_ip_address="127.0.0.1", object_store_memory=1 << 30, log_to_driver=verbose,
                 logging_level="WARNING" if not verbose else "INFO")
        phases["ray_init_s"] = time.time() - t0
        # The rows as a materialized Ray Dataset of Arrow tensor blocks, converted from numpy by
        # Ray's own converter (the one that turns `map_batches(_tokenize_batch)` output into
        # blocks on the real path); 4 blocks, so the 2-way split has something to balance.
        from ray.data.block import BlockAccessor

        bounds = np.linspace(0, len(arrays["input_ids"]), 5).astype(int)
        dataset = None if tensors else ray.data.from_arrow([BlockAccessor.batch_to_block({k: v[a:b] for k, v in arrays.items()})
                                       for a, b in zip(bounds[:-1], bounds[1:])])
        if dataset is not None:  # split in the driver, one shard per rank, as trainers.entry.fit does
            cfg["shards"] = data.split_for_workers({"train": dataset}, 2)
        t_fit = time.time()
        phases["dataset_s"] = t_fit - t0 - phases["ray_init_s"]
        trainer = TorchTrainer(
            train_loop_per_worker=ray_loop,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=2, use_gpu=cfg["use_gpu"],
                                         resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg["use_gpu"] else {})}),
            run_config=RunConfig(name=f"{name}-{idx}-{os.getpid()}", storage_path=str(tmp / "ray-storage"),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        trainer.fit()
        phases["fit_s"] = time.time() - t_fit
    finally:
        t_shutdown = time.time()
        ray.shutdown()
        phases["shutdown_s"] = time.time() - t_shutdown
        shutil.rmtree(temp_dir, ignore_errors=True)
    t1 = time.time()
    return _timings(json.loads(Path(cfg["result_path"]).read_text()), t0, t1, phases)


def _timings(result: dict[str, Any], t0: float, t1: float, phases: dict[str, float]) -> dict[str, Any]:
    wall = t1 - t0
    return {
        "tokens_per_s": result["tokens_per_s"], "steady_s": result["seconds"], "tokens": result["tokens"],
        "wall_s": wall, "fixed_s": wall - result["seconds"],
        "to_first_step_s": result["t_loop"] - t0, "warmup_steps_s": result["t_start"] - result["t_loop"],
        "after_last_step_s": t1 - result["t_end"], "last_loss": result["last_loss"],
        "torch_threads": result["torch_threads"], **phases,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions() -> dict[str, str]:
    # From the package metadata: importing deepspeed here would print its accelerator
    # warning on stdout, which --json output must not contain.
    from importlib.metadata import version

    return {"python": sys.version.split()[0], **{name: version(name) for name in
                                                 ("torch", "ray", "deepspeed", "transformers")}}


def report(results: dict[str, Any]) -> str:
    info, reps = results["info"], results["repeats"]
    names = [n for n in ("torchrun", "ray", "ray-tensors") if n in reps[0]]
    tensors = "ray-tensors" in names
    lines = [
        f"model: {info['model']}, {info['parameters']:,} parameters",
        f"{info['workers']} workers, {info['device']}/{info['backend']}, ZeRO-{info['zero_stage']}, "
        f"seq {info['seq_len']}, micro-batch {info['micro_batch_size']} x grad-accum {info['grad_accum']} "
        f"per worker ({info['tokens_per_step']:,} non-pad tokens per step), "
        f"{info['warmup']} warmup + {info['steps']} timed steps",
        f"data: {info['packed_rows']} packed rows x {info['copies_of_data']} copies = {info['rows_used']} rows, "
        f"{info['steps_per_epoch']} steps per Ray Data epoch ({info['epochs_in_run']} epochs in the run)",
        "",
        f"{'repeat':>6}  {'order':<26} {'torchrun tok/s':>14} {'ray tok/s':>10} {'ray/torchrun':>12}"
        + (f" {'ray-tensors tok/s':>17} {'ratio':>6}" if tensors else "")
        + f"  load after (1 min; before: {results['load_1min_before']:.2f})",
    ]
    for r in reps:
        lines.append(f"{r['repeat']:>6}  {r['order']:<26} {r['torchrun']['tokens_per_s']:>14,.0f} "
                     f"{r['ray']['tokens_per_s']:>10,.0f} {r['ratio']:>12.3f}"
                     + (f" {r['ray-tensors']['tokens_per_s']:>17,.0f} {r['ratio_ray_tensors']:>6.3f}" if tensors else "")
                     + f"  {r['load_1min_after']:.2f}")
    lines.append(f"median ray/torchrun tokens/s: {results['median_ratio']:.3f}  "
                 f"(Ray takes {1 / results['median_ratio']:.2f}x the time per step)")
    if tensors:
        lines.append(f"median ray-tensors/torchrun tokens/s: {results['median_ratio_ray_tensors']:.3f}  "
                     "(Ray Train loop fed from pre-built tensors, no Ray Data)")
    lines += ["", "fixed cost = wall time of the whole command - timed steady state (s), medians:",
              f"{'':12}{'wall':>7}{'steady':>8}{'fixed':>7}  {'to 1st step':>11}{'warmup':>8}{'after last':>11}"]
    for name in names:
        m = {k: statistics.median(r[name][k] for r in reps)
             for k in ("wall_s", "steady_s", "fixed_s", "to_first_step_s", "warmup_steps_s", "after_last_step_s")}
        lines.append(f"{name:12}{m['wall_s']:>7.1f}{m['steady_s']:>8.1f}{m['fixed_s']:>7.1f}  "
                     f"{m['to_first_step_s']:>11.1f}{m['warmup_steps_s']:>8.1f}{m['after_last_step_s']:>11.1f}")
    ray_phases = {k: statistics.median(r["ray"][k] for r in reps)
                  for k in ("ray_init_s", "dataset_s", "fit_s", "shutdown_s")}
    lines.append("ray phases (s): " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in ray_phases.items()))
    lines.append("ray env: " + " ".join(f"{k}={v}" for k, v in results["ray_env"].items()))
    lines.append(f"torch threads per worker: torchrun {reps[0]['torchrun']['torch_threads']}, "
                 f"ray {reps[0]['ray']['torch_threads']}; {results['cpus']} CPUs")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="interleaved torchrun/ray pairs")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed row (data.max_seq_len)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward pass per worker")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--model", choices=("shipped", "larger"), default="shipped",
                   help="the shipped tiny-llama, or a larger Llama built from its tokenizer")
    p.add_argument("--hidden", type=int, default=256, help="--model larger: hidden size")
    p.add_argument("--layers", type=int, default=4, help="--model larger: layers")
    p.add_argument("--heads", type=int, default=8, help="--model larger: attention heads")
    p.add_argument("--no-tile", action="store_true",
                   help="keep the packed rows as they are (the Ray side then restarts its shard every epoch)")
    p.add_argument("--ray-tensors", action="store_true",
                   help="also run a third variant: the Ray Train loop fed from pre-built tensors (no Ray Data), "
                        "to split the overhead between Ray Train and Ray Data")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--verbose", action="store_true", help="show the workers' output")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)  # the torchrun worker, started by us
    args = p.parse_args(argv)
    if args.worker:
        torchrun_worker(args.worker)
        return 0
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")

    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    try:
        t = time.time()
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import-time warning; keep stdout for results
            prep = prepare(args, tmp)
        log(f"prepared model, DeepSpeed config and {prep['info']['rows_used']} rows in {time.time() - t:.1f}s")
        reps = []
        load_before = os.getloadavg()[0]
        if load_before > 0.5 * (os.cpu_count() or 1):
            log(f"warning: 1-min load average is {load_before:.1f} on {os.cpu_count()} CPUs before starting: "
                "something else is running and the figures will be noisy")
        for i in range(args.repeats):
            order = ("torchrun", "ray") + (("ray-tensors",) if args.ray_tensors else ())
            order = order if i % 2 == 0 else order[::-1]
            rep: dict[str, Any] = {"repeat": i + 1, "order": ",".join(order)}
            for name in order:
                log(f"repeat {i + 1}/{args.repeats}: {name} ...")
                if name == "torchrun":
                    rep[name] = run_torchrun(prep, tmp, i, args.verbose)
                else:
                    rep[name] = run_ray(prep, tmp, i, args.verbose, tensors=name == "ray-tensors")
                log(f"  {name}: {rep[name]['tokens_per_s']:,.0f} tokens/s over {rep[name]['steady_s']:.1f}s, "
                    f"wall {rep[name]['wall_s']:.1f}s")
            rep["ratio"] = rep["ray"]["tokens_per_s"] / rep["torchrun"]["tokens_per_s"]
            if args.ray_tensors:
                rep["ratio_ray_tensors"] = rep["ray-tensors"]["tokens_per_s"] / rep["torchrun"]["tokens_per_s"]
            rep["load_1min_after"] = os.getloadavg()[0]
            reps.append(rep)
        results = {"info": prep["info"], "versions": _versions(), "cpus": os.cpu_count(),
                   "load_1min_before": load_before, "repeats": reps,
                   "median_ratio": statistics.median(r["ratio"] for r in reps),
                   "ray_env": {k: os.environ.get(k, v) for k, v in RAY_ENV.items()},
                   "fixed_s": {n: statistics.median(r[n]["fixed_s"] for r in reps)
                               for n in ("torchrun", "ray", "ray-tensors") if n in reps[0]}}
        if args.ray_tensors:
            results["median_ratio_ray_tensors"] = statistics.median(r["ratio_ray_tensors"] for r in reps)
        print(json.dumps(results, indent=1) if args.json else report(results), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
