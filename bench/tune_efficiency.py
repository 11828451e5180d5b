"""What early stopping saves: the same search run twice, ASHA against every trial run to the
full budget (FIFO), side by side.

Both searches go through the product's own path (`launch SPEC --cluster local`, a Ray head
on 127.0.0.1 started for this benchmark and stopped after it), on the LoRA quickstart, with
the same search space and the same seed, so they sample the same configurations (checked,
and printed). For each it reads `<run>/tune/results.csv`:

  compute    trial-steps: the optimizer steps every trial ran, summed
  best       the best final eval loss among the trials that ran to the full budget

and prints ASHA's compute and best as ratios of the full-budget search's. The goal of
issue 18: ASHA's best within 2 % of the full-budget best at 40 % of the compute or less.

A benchmark, not a test: nothing here asserts. Usage:

    python bench/tune_efficiency.py                        # 8 trials x 16 steps: ~10 min here
    python bench/tune_efficiency.py --trials 4 --steps 8   # smoke run, ~4 min
    python bench/tune_efficiency.py --json                 # machine-readable on stdout
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LORA = REPO / "configs" / "examples" / "lora.yaml"
LAUNCH = [sys.executable, "-m", "launcher.cli"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spec_for(scheduler: dict[str, Any], args, storage: Path) -> dict[str, Any]:
    return {
        "defaults": [str(LORA)],
        "name": f"bench-tune-{scheduler['type']}",
        "data": {"eval_fraction": 0.1},
        "train": {"max_steps": args.steps, "eval_every": args.eval_every, "micro_batch_size": 4,
                  "global_batch_size": 8},
        "resources": {"workers": 1},
        # One checkpoint at the end: the benchmark counts steps, not saves.
        "checkpoint": {"storage": str(storage), "every_n_steps": args.steps, "keep": 1},
        "tune": {"metric": "eval_loss", "mode": "min", "num_samples": args.trials, "seed": args.seed,
                 "scheduler": scheduler,
                 "search_space": {"train.lr": {"loguniform": [1.0e-4, 3.0e-2]},
                                  "model.peft.r": {"choice": [4, 8, 16]}}},
    }


def run_search(name: str, spec: dict[str, Any], env: dict[str, str], work: Path) -> dict[str, Any]:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log(f"{name}: launch {path} --cluster local")
    t0 = time.perf_counter()
    proc = subprocess.run([*LAUNCH, str(path), "--cluster", "local", "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{name}: the search failed (exit {proc.returncode})")
    runs = sorted((Path(spec["checkpoint"]["storage"]) / spec["name"]).iterdir())
    rows = list(csv.DictReader((runs[-1] / "tune" / "results.csv").open()))
    full = [r for r in rows if r["status"] == "completed"]
    return {
        "wall_s": round(wall, 1),
        "trials": len(rows),
        "compute_steps": sum(int(r["steps"]) for r in rows),
        "completed": len(full),
        "best_final_eval_loss": min(float(r["last_eval_loss"]) for r in full),
        "configs": sorted((round(float(r["train.lr"]), 10), int(r["model.peft.r"])) for r in rows),
        "steps_per_trial": sorted(int(r["steps"]) for r in rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16, help="the full budget of a trial (optimizer steps)")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--grace", type=int, default=2, help="ASHA's grace period (steps)")
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bt-", dir="/tmp") as tmp:
        work = Path(tmp)
        env = {**os.environ, "LLMLAUNCH_HOME": str(work / "home")}
        storage = work / "runs"
        load_before = os.getloadavg()[0]
        try:
            subprocess.run([*LAUNCH, "up", "local"], env=env, cwd=REPO, check=True, capture_output=True)
            asha = run_search("asha", spec_for({"type": "asha", "grace_period": args.grace,
                                                "reduction_factor": args.reduction_factor}, args, storage), env, work)
            fifo = run_search("full", spec_for({"type": "fifo"}, args, storage), env, work)
        finally:
            subprocess.run([*LAUNCH, "down", "local"], env=env, cwd=REPO, capture_output=True)

    compute = asha["compute_steps"] / fifo["compute_steps"]
    best = asha["best_final_eval_loss"] / fifo["best_final_eval_loss"]
    report = {"asha": asha, "full_budget": fifo, "compute_ratio": round(compute, 3),
              "best_ratio": round(best, 4), "same_configs": asha["configs"] == fifo["configs"],
              "goal_met": compute <= 0.40 and best <= 1.02, "load_before": round(load_before, 2),
              "args": vars(args)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.trials} trials of the LoRA quickstart, lr log-uniform [1e-4, 3e-2], r in {{4, 8, 16}}, "
          f"seed {args.seed}; full budget {args.steps} steps, evaluations every {args.eval_every}; "
          f"ASHA grace {args.grace}, reduction factor {args.reduction_factor:g}")
    print(f"same sampled configurations in both: {report['same_configs']}")
    print(f"{'':14}{'trial-steps':>12}{'completed':>11}{'best final eval loss':>22}{'wall (s)':>10}")
    for name, r in (("full budget", fifo), ("asha", asha)):
        print(f"{name:14}{r['compute_steps']:>12}{r['completed']:>11}{r['best_final_eval_loss']:>22.4f}"
              f"{r['wall_s']:>10.0f}")
    print(f"asha / full budget: compute {compute:.3f}, best final eval loss {best:.4f} "
          f"(goal: compute <= 0.40 and best <= 1.02: {'met' if report['goal_met'] else 'not met'})")
    print(f"asha steps per trial: {asha['steps_per_trial']}")
    print(f"load average before: {load_before:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
